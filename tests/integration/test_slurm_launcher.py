"""The launcher against the real single-host SLURM cluster (slurm/local_cluster/up.sh).

- Every rendered sbatch passes `sbatch --test-only`.
- Recipe strings full of shell syntax reach SLURM exactly as written: submitted with --hold and
  read back with squeue; one job is run for real, so the --output path, the environment and the
  run dir are checked where SLURM and bash put them.
- `dist-ft launch --backend slurm` chains the stages with afterok, a failed first stage cancels the
  rest, `dist-ft status` names it and `dist-ft cancel` stops a chain. No training: a stand-in
  interpreter (`cluster.python`) in place of `python -m torch.distributed.run` writes DONE (or fails).

Skips with the reason when the cluster is not up; every wait is bounded (60 s).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from dist_ft.cli import main
from dist_ft.plan.plan import Plan
from tests.conftest import LAUNCH, demo_raw

try:
    import slurm_helpers as sh
except ImportError:  # e.g. --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import slurm_helpers as sh

pytestmark = pytest.mark.slurm

JOB_TIMEOUT = 60.0
DEMO = LAUNCH / "demo.yaml"
NASTY = "x$(touch PWNED1)`touch PWNED2`'\";touch PWNED3 && # hetjob \\ end"
NASTY_DIRS = {  # run dirs: SLURM expands %j in --output unless the path holds a backslash
    "dollar": "run dir $HOME %j 'q' \"dq\" `touch PWNED4` $(touch PWNED5)",
    "backslash": "run dir $HOME %j \\n back\\slash",
}


@pytest.fixture(scope="module", autouse=True)
def _require_cluster() -> None:
    reason = sh.cluster_skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _slurm_environ(monkeypatch) -> None:
    """dist-ft runs in this process: give its SLURM commands the cluster's config."""
    env = sh.slurm_env()
    for key in [k for k in os.environ if k not in env]:
        monkeypatch.delenv(key)
    if "SLURM_CONF" in env:
        monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])


@pytest.fixture
def job_ids():
    ids: list[int] = []
    yield ids
    sh.cancel(*ids)


def fake_torchrun(tmp_path: Path, fail_stage: str = "", gated: bool = False) -> tuple[Path, Path, Path]:
    """A `python` (run as `python -m torch.distributed.run ...`) that records its call and, unless it fails, writes the stage's DONE and metrics.
    Gated: it waits (at most 30 s) for the `go` file first, and stops early (exit 0, no DONE) when
    the sbatch script touches the stage's stop file. Returns (bin dir, calls dir, go file)."""
    bin_dir, calls, go = tmp_path / "bin", tmp_path / "calls", tmp_path / "go"
    bin_dir.mkdir()
    calls.mkdir()
    if not gated:
        go.touch()
    script = f"""#!/bin/bash
calls={shlex.quote(str(calls))}; go={shlex.quote(str(go))}; fail_stage={shlex.quote(fail_stage)}
printf '%s\\n' "$@" > "$calls/$SLURM_JOB_ID.$SLURMD_NODENAME.args"
env > "$calls/$SLURM_JOB_ID.$SLURMD_NODENAME.env"
while [ $# -gt 0 ]; do case "$1" in --run-dir=*) run=${{1#*=}} ;; --stage=*) stage=${{1#*=}} ;; esac; shift; done
echo "fake torchrun: stage $stage on $SLURMD_NODENAME"
if [ "$stage" = "$fail_stage" ]; then echo "boom: simulated failure of $stage" >&2; exit 1; fi
for _ in $(seq 300); do
  if [ -e "$run/control/$stage.stop" ]; then echo "fake torchrun: stop file seen, checkpoint written"; exit 0; fi
  [ -e "$go" ] && break
  sleep 0.1
done
[ -e "$go" ] || {{ echo "no go file after 30 s" >&2; exit 1; }}
if [ "$SLURM_PROCID" = 0 ]; then
  mkdir -p "$run/stages/$stage"
  echo '{{"step": 12, "loss": 1.25}}' >> "$run/stages/$stage/metrics.jsonl"
  echo '{{"step": 12}}' > "$run/stages/$stage/DONE"
fi
exit 0
"""
    (bin_dir / "python").write_text(script)
    (bin_dir / "python").chmod(0o755)
    return bin_dir, calls, go


def python_override(bin_dir: Path) -> str:
    return f"cluster.python={bin_dir / 'python'}"


def stages_of(run: Path) -> list[str]:
    return [s.name for s in Plan.from_json((run / "plan.json").read_text()).stages]


def wait_all(ids: list[int]) -> list[str]:
    return [sh.wait_for_job(job, timeout=JOB_TIMEOUT) for job in ids]


def squeue_field(job: int, field: str) -> str:
    return sh.run_slurm(["squeue", "-h", "-j", str(job), "-o", field]).stdout.rstrip("\n")


def assert_nothing_executed(*folders: Path) -> None:
    for folder in folders:
        assert not list(folder.rglob("PWNED*")), f"a recipe string was executed (in {folder})"


# ---- #SBATCH lines as real sbatch reads them ---------------------------------------------------

def test_every_rendered_sbatch_passes_test_only(tmp_path):
    out = tmp_path / "run"
    assert main(["render", str(DEMO), "--out", str(out), "--set", "cluster.nodes=2"]) == 0
    scripts = sorted(out.glob("*.sbatch"))
    assert len(scripts) == len(stages_of(out)) >= 2
    for script in scripts:
        proc = sh.run_slurm(["sbatch", "--test-only", str(script)], cwd=tmp_path)
        report = proc.stderr + proc.stdout
        assert "to start at" in report and "node[1-2]" in report, (script.name, report)


@pytest.fixture
def nasty_recipe(recipe_file, tmp_path):
    def write(partition: str = "debug") -> Path:
        bin_dir, _, _ = fake_torchrun(tmp_path)
        raw = demo_raw()
        raw["cluster"].update(nodes=2, partition=partition, account=NASTY, qos=NASTY, job_name=NASTY,
                              env={"NASTY": NASTY, "SPACES": "a b  c"}, python="python",
                              setup=[f"export PATH={shlex.quote(str(bin_dir))}:$PATH"])
        return recipe_file(raw)
    return write


@pytest.mark.parametrize("kind", sorted(NASTY_DIRS))
def test_nasty_recipe_strings_reach_slurm_and_bash_exactly(kind, nasty_recipe, tmp_path, job_ids):
    out = tmp_path / NASTY_DIRS[kind]
    assert main(["render", str(nasty_recipe()), "--out", str(out)]) == 0
    stages = stages_of(out)
    for stage in stages:
        proc = sh.run_slurm(["sbatch", "--test-only", str(out / f"{stage}.sbatch")], cwd=tmp_path)
        assert "to start at" in proc.stderr + proc.stdout
    submitted = {}
    for stage in stages:
        submitted[stage] = sh.sbatch(["--hold", str(out / f"{stage}.sbatch")], cwd=tmp_path)
        job_ids.append(submitted[stage])
        assert squeue_field(submitted[stage], "%j") == f"{NASTY}-{stage}"
        # slurmctld lower-cases account names; the quoting kept every other character.
        assert squeue_field(submitted[stage], "%a") == NASTY.lower()
    # Run the first stage for real: two nodes, the stand-in torchrun on each.
    first, job = stages[0], submitted[stages[0]]
    sh.run_slurm(["scontrol", "release", str(job)])
    assert sh.wait_for_job(job, timeout=JOB_TIMEOUT) == "COMPLETED", sh.show_job(job)
    output = out / "logs" / (f"{first}.out" if "\\" in str(out) else f"{first}.{job}.out")
    assert output.is_file(), sorted(p.name for p in (out / "logs").iterdir())
    assert f"dist-ft: stage {first} attempt 0 on 2 node(s), head node1 (127.0.0.1)" in output.read_text()
    assert (out / "stages" / first / "DONE").is_file()
    calls = tmp_path / "calls"
    args = (calls / f"{job}.node1.args").read_text().splitlines()
    assert f"--run-dir={out}" in args and f"--stage={first}" in args
    assert (calls / f"{job}.node2.args").is_file()
    env = (calls / f"{job}.node2.env").read_text()
    assert f"NASTY={NASTY}\n" in env and "SPACES=a b  c\n" in env
    assert_nothing_executed(tmp_path, Path.cwd())


def test_a_nasty_partition_reaches_sbatch_whole(nasty_recipe, tmp_path):
    out = tmp_path / "run"
    assert main(["render", str(nasty_recipe(partition=NASTY)), "--out", str(out)]) == 0
    scripts = sorted(out.glob("*.sbatch"))
    assert scripts
    for script in scripts:
        proc = sh.run_slurm(["sbatch", "--test-only", str(script)], cwd=tmp_path, check=False)
        assert proc.returncode != 0
        assert f"invalid partition specified: {NASTY}\n" in proc.stderr, proc.stderr
    assert_nothing_executed(tmp_path)


# ---- dist-ft launch --backend slurm, status, cancel ---------------------------------------------

def launch(tmp_path: Path, bin_dir: Path, job_ids: list[int]) -> tuple[Path, list[str], list[int]]:
    out = tmp_path / "run"
    code = main(["launch", str(DEMO), "--backend", "slurm", "--out", str(out), "--set", "cluster.nodes=1",
                 "--set", python_override(bin_dir), "--set", f"checkpointing.output_root={tmp_path}"])
    jobs_file = out / "jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else {}
    job_ids.extend(int(job) for job in jobs.values())  # cancelled at the end of the test
    assert code == 0
    stages = stages_of(out)
    assert list(jobs) == stages and len(set(jobs.values())) == len(stages), jobs  # one job per stage
    ids = [int(jobs[stage]) for stage in stages]
    return out, stages, ids


def test_launch_chains_stages_with_afterok(tmp_path, job_ids, capsys):
    bin_dir, _, go = fake_torchrun(tmp_path, gated=True)
    out, stages, ids = launch(tmp_path, bin_dir, job_ids)
    sh.wait_for_state(ids[0], {"RUNNING"}, timeout=JOB_TIMEOUT)
    for before, job in zip(ids, ids[1:]):
        info = sh.show_job(job)
        assert info["JobState"] == "PENDING" and info["Dependency"] == f"afterok:{before}(unfulfilled)", info
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split()[:3] == [stages[0], str(ids[0]), "RUNNING"]
    assert table[3].endswith(f"waiting for {stages[0]}")
    go.touch()
    assert wait_all(ids) == ["COMPLETED"] * len(ids)
    assert all((out / "stages" / stage / "DONE").is_file() for stage in stages)
    assert main(["status", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()[2:]
    assert [line.split()[2:5] for line in table] == [["COMPLETED", "0", "yes"]] * len(stages)
    assert all("step 12 loss 1.2500" in line for line in table)


def test_a_failed_first_stage_cancels_the_rest_and_status_names_it(tmp_path, job_ids, capsys):
    bin_dir, _, _ = fake_torchrun(tmp_path, fail_stage=demo_stages(tmp_path)[0])
    out, stages, ids = launch(tmp_path, bin_dir, job_ids)
    assert wait_all(ids) == ["FAILED"] + ["CANCELLED"] * (len(ids) - 1)
    for job in ids[1:]:
        assert sh.show_job(job)["Reason"] == "DependencyNeverSatisfied"
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    report = capsys.readouterr().out
    first = stages[0]
    assert f"{first}: FAILED, exit code 1 [NonZeroExitCode]" in report
    assert f"boom: simulated failure of {first}" in report
    assert f"DependencyNeverSatisfied: {first} failed\n" in report
    assert f"DependencyNeverSatisfied: {first} failed via {stages[1]}" in report
    assert main(["cancel", str(out)]) == 0
    assert "nothing to cancel" in capsys.readouterr().out


def test_cancel_stops_a_running_chain(tmp_path, job_ids, capsys):
    bin_dir, _, _ = fake_torchrun(tmp_path, gated=True)  # never let go
    out, stages, ids = launch(tmp_path, bin_dir, job_ids)
    sh.wait_for_state(ids[0], {"RUNNING"}, timeout=JOB_TIMEOUT)
    capsys.readouterr()
    assert main(["cancel", str(out)]) == 0
    report = capsys.readouterr().out
    assert f"[{stages[0]}] cancelled job {ids[0]} (was RUNNING)" in report
    assert all(f"[{stage}] cancelled job {job} (was PENDING)" in report for stage, job in zip(stages[1:], ids[1:]))
    assert wait_all(ids) == ["CANCELLED"] * len(ids)
    # The batch shell got SIGTERM: it asks for a checkpoint but must not requeue a cancelled job.
    output = out / "logs" / f"{stages[0]}.{ids[0]}.out"
    wait_for_text(output, "will not requeue")
    assert "requeueing" not in output.read_text()
    info = sh.show_job(ids[0])
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), info
    assert main(["status", str(out)]) == 0
    report = capsys.readouterr().out
    assert report.count("cancelled before it started") == len(ids) - 1


def test_usr1_before_the_time_limit_checkpoints_and_requeues(tmp_path, job_ids, capsys):
    bin_dir, calls, go = fake_torchrun(tmp_path, gated=True)
    out, stages, ids = launch(tmp_path, bin_dir, job_ids)
    wait_for_text(calls / f"{ids[0]}.node1.args", "--stage")  # srun runs: the trap is set
    # What SLURM sends at `time - signal_grace_s` (--signal=B:USR1@...), sent now.
    sh.run_slurm(["scancel", "--batch", "--signal=USR1", str(ids[0])])
    output = out / "logs" / f"{stages[0]}.{ids[0]}.out"
    wait_for_text(output, f"requeueing job {ids[0]}")
    go.touch()
    assert wait_all(ids) == ["COMPLETED"] * len(ids)  # the requeued job starts after cred_expire (~11 s)
    assert sh.show_job(ids[0])["Restarts"] == "1"
    assert (out / "logs" / f"{stages[0]}.{ids[0]}.attempt1.log").is_file()
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[2].split()
    assert first[:5] == [stages[0], str(ids[0]), "COMPLETED", "1", "yes"]


def wait_for_text(path: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} not in {path} after {timeout:.0f} s"
        time.sleep(0.2)


def demo_stages(tmp_path: Path) -> list[str]:
    assert main(["render", str(DEMO), "--out", str(tmp_path / "names")]) == 0
    return stages_of(tmp_path / "names")
