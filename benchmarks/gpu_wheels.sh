#!/usr/bin/env bash
# Fetch, here, the wheels that gpu_check.sh installs on the device machine, which reaches no registry.
#
#   benchmarks/gpu_wheels.sh [DEST]      # default: REPO/.whl (added to .git/info/exclude)
#
# Run it in a session that has a device, before the device call; then call the device tool with
# carry [".whl"] and `benchmarks/gpu_check.sh "$OUT"` (gpu_check.sh installs .whl/*.whl with
# pip --no-index --target and puts them first on PYTHONPATH).
#
# What the device image lacks, for the tests and steps (its package list: the device tool's KINDS.md;
# torch 2.11+cu130, transformers 5.17, triton, accelerate, peft and pytest are there): DeepSpeed and its
# pydantic, datasets and its dill/multiprocess, bitsandbytes, liger-kernel, gguf, rouge-score/nltk; and
# transformers/peft/accelerate at the versions tested here (transformers 5.25 wants huggingface-hub 2.4
# and kernels). wandb is not carried: every step runs with tracking disabled.
# Versions are the ones installed in this checkout's .venv (what CI tests), else the newest.
# Limits (device tool README): the tree plus wheels travel in at most 64 MiB per call. bitsandbytes'
# wheel holds a library per CUDA/ROCm/XPU version; only the CUDA 13.0 one (the device's torch is cu130)
# and the CPU one are kept. flash-attn has no wheel on PyPI (an sdist that needs CUDA and ~1 h to build):
# its tests skip on the device with that reason. SmolLM2's GGUF (94 MB) cannot travel: step 6 skips.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$REPO/.whl}
PY=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
mkdir -p "$DEST"
if [ "$DEST" = "$REPO/.whl" ]; then
  exclude=$(git -C "$REPO" rev-parse --git-path info/exclude)
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
fi

BINARY="hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess transformers
        huggingface-hub kernels peft accelerate bitsandbytes liger-kernel gguf nltk"
SOURCE_ONLY="deepspeed rouge-score"   # sdists of pure Python: built into wheels here

pinned() {  # NAME==VERSION as installed here, or NAME for the newest
  "$PY" - "$1" <<'EOF'
import importlib.metadata, sys
name = sys.argv[1]
try:
    print(f"{name}=={importlib.metadata.version(name)}")
except importlib.metadata.PackageNotFoundError:
    print(name)
EOF
}

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
for name in $BINARY; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$DEST" "$(pinned "$name")"
done
for name in $SOURCE_ONLY; do
  # DS_BUILD_OPS=0: DeepSpeed compiles its ops just in time on the device (nvcc is there), none here.
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$(pinned "$name")"
done

# bitsandbytes: keep libbitsandbytes_cuda130 and _cpu only (pip does not check RECORD hashes on install).
"$PY" - "$DEST" <<'EOF'
import pathlib, re, sys, zipfile
for wheel in pathlib.Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            lib = re.search(r"libbitsandbytes_(\w+)\.so$", item.filename)
            if lib is None or lib.group(1) in ("cuda130", "cpu"):
                dst.writestr(item, src.read(item))
    slim.replace(wheel)
EOF

total=$(du -sm "$DEST" | cut -f1)
ls -l "$DEST"
echo "wheels: ${total} MiB in $DEST (the device call carries at most 64 MiB with the tree)"
if [ "$total" -gt 56 ]; then echo "too large to carry with the tree: drop what the check can skip" >&2; exit 1; fi
