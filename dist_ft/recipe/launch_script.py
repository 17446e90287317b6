"""What the generated launch scripts (stage.sbatch, local runs) own, and which Python they train with.

Pure, and free of other dist_ft imports: config.py checks `cluster.env` keys against these names.
"""

from __future__ import annotations

import re
import sys

#: Variables slurm/stage.sbatch.tmpl sets and reads itself (tests/unit/test_render.py keeps this list in
#: step with the template). A recipe value for one of them would be ignored or would redirect the job.
SCRIPT_VARIABLES = frozenset({
    "RUN_DIR", "STAGE", "DIST_FT_PYTHON", "RDZV_PORT", "RANKS_PER_NODE", "MAX_RESTARTS", "REQUEUE",
    "DIST_FT_RESTART_COUNT",
    "control", "stop_file", "done_file", "attempt_log", "head_node", "head_addr", "time_up", "srun_pid",
    "status",
})
#: Names bash, the dynamic loader or SLURM give a meaning of their own: exporting them changes how the
#: script itself runs (word splitting, what `srun` or `python` resolve to, which job `scontrol requeue` hits).
SHELL_VARIABLES = frozenset({
    "PATH", "IFS", "SHELLOPTS", "BASHOPTS", "ENV", "CDPATH", "GLOBIGNORE", "PS4", "PROMPT_COMMAND",
    "POSIXLY_CORRECT", "PWD", "OLDPWD", "UID", "EUID", "PPID", "SHLVL", "RANDOM", "SECONDS", "LINENO",
    "OPTIND", "OPTARG", "OPTERR", "TMOUT", "HOSTNAME", "FUNCNAME", "GROUPS",
})
SHELL_PREFIXES = ("BASH", "LD_", "SLURM_", "SRUN_", "SBATCH_")
#: Names of credentials (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...): cluster.env is written in plain
#: text into every rendered script, so a secret there would sit on the shared file system for anyone to read.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY|_KEY$|^KEY$")


def env_key_problem(key: str) -> str | None:
    """Why `key` may not be a `cluster.env` name, or None when it may."""
    if key in SCRIPT_VARIABLES:
        return "is a variable of the generated launch script: a recipe value would redirect or be ignored"
    if key in SHELL_VARIABLES or key.startswith(SHELL_PREFIXES):
        return "has a special meaning to bash, the loader or SLURM and would change how the launch script runs"
    return None


def secret_key_problem(key: str) -> str | None:
    """Why `key` looks like a credential that cluster.env would write to disk, or None."""
    if SECRET_NAME.search(key.upper()):
        return ("looks like a secret, and cluster.env is written in plain text into the rendered *.sbatch and "
                "local.sh in the run dir")
    return None


def omp_threads_line(ranks_per_node: int, cpus: str = "$(nproc)") -> str:
    """The one OMP_NUM_THREADS rule of every launch script (sbatch, local.sh, ssh, nodes.sh): the user's value
    when the environment or cluster.env sets one, else the node's CPUs for this job (`cpus`, a shell
    expression) shared by its ranks, at least 1. torchrun would otherwise set 1 for every rank."""
    share = f"{cpus} / {int(ranks_per_node)}"
    return f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( {share} > 1 ? {share} : 1 ))}}"'


def training_python(cluster_python: str | None) -> str:
    """The interpreter every node trains with (`PYTHON -m torch.distributed.run`): `cluster.python`
    when the recipe sets it (a path, or a name the `setup` lines put on PATH), else the interpreter
    that rendered the run, so a venv works without being activated on the nodes."""
    return cluster_python or sys.executable or "python3"
