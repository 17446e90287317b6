"""The only reader of RANK / LOCAL_RANK / WORLD_SIZE / SLURM_* variables."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    backend: str  # "nccl" | "gloo"
    device: str  # "cuda:N" | "cpu"
    restart_count: int
    slurm_job_id: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, text: str, err: bool = False) -> None:
        """A line for the person running the job, once (rank 0), not once per rank."""
        if self.is_main and text:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)


def read_env(environ: Mapping[str, str] | None = None, cuda_available: bool | None = None) -> DistEnv:
    """Ranks from torchrun's variables, else from srun's (one task per GPU), else a single process."""
    env = os.environ if environ is None else environ
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()

    def pick(*names: str, default: str) -> int:
        for name in names:
            if env.get(name, "").isdigit():
                return int(env[name])
        return int(default)

    rank = pick("RANK", "SLURM_PROCID", default="0")
    local_rank = pick("LOCAL_RANK", "SLURM_LOCALID", default="0")
    world = pick("WORLD_SIZE", "SLURM_NTASKS", default="1")
    local_world = pick("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default="1")
    return DistEnv(
        rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
        backend="nccl" if cuda_available else "gloo",
        device=f"cuda:{local_rank}" if cuda_available else "cpu",
        restart_count=pick("DIST_FT_RESTART_COUNT", "SLURM_RESTART_COUNT", default="0")
        + pick("TORCHELASTIC_RESTART_COUNT", default="0"),  # a requeued job's torchrun may restart too
        slurm_job_id=env.get("SLURM_JOB_ID"),
    )


def quiet_process_env(cuda_available: bool, environ: dict[str, str] | None = None) -> None:
    """Name the accelerator for DeepSpeed (it warns while guessing) before it is imported."""
    target = os.environ if environ is None else environ
    target.setdefault("DS_ACCELERATOR", "cuda" if cuda_available else "cpu")


# A job's rendezvous port is derived from its id, so two jobs sharing a node do not collide
# (unless their ids differ by a multiple of the span). The range stays below Linux's ephemeral
# ports (32768+), which the kernel hands out to outgoing connections. slurm.py renders the same
# formula into the sbatch script.
RDZV_PORT_BASE = 20000
RDZV_PORT_SPAN = 12000
FALLBACK_PORT = 29500


def job_rendezvous_port(job_id: str | None) -> int:
    if job_id and job_id.isdigit():
        return RDZV_PORT_BASE + int(job_id) % RDZV_PORT_SPAN
    return FALLBACK_PORT

