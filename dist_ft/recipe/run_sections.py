"""Where and how a recipe runs: the cluster, the parallelism, tracking, checkpointing, evaluation.

Split from config.py (re-exported there): the sections about the run's infrastructure, checked one
object at a time, as the model, data and stage sections are in config.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .hostfile import host_problem
from .launch_script import env_key_problem, secret_key_problem
from .limits import MAX_GPUS_PER_NODE, MAX_NODES, MAX_PROCS_PER_NODE, MAX_SEQ_LEN, MAX_STEPS
from .strict import Invalid, spec


def printable_line(text: str) -> bool:
    """No line break or control character: the text becomes a script line, a path or a directive."""
    return all(ch.isprintable() for ch in text)


@dataclass(frozen=True)
class Cluster:
    nodes: int = spec(1, min=1, max=MAX_NODES)
    gpus_per_node: int = spec(0, min=0, max=MAX_GPUS_PER_NODE, doc="0 means CPU ranks (then procs_per_node).")
    procs_per_node: int = spec(1, min=1, max=MAX_PROCS_PER_NODE, doc="CPU ranks per node when gpus_per_node is 0.")
    gpu_memory_gb: float = spec(80.0, min=1.0, max=4096.0, doc="Per-GPU memory the plan must fit in.")
    cpu_memory_gb: float | None = spec(None, min=1.0, max=65536.0,
                                       doc="CPU ranks: a node's memory, shared by its procs_per_node ranks. "
                                           "Unset: the memory of the machine that plans.")
    partition: str | None = spec(None, doc="SLURM partition.")
    account: str | None = spec(None, doc="SLURM account.")
    qos: str | None = spec(None, doc="SLURM QOS.")
    time_limit: int | str | None = spec(None, doc="SLURM time: minutes (90), MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS.")
    constraint: str | None = spec(None, doc="SLURM --constraint (node features).")
    mem: str | None = spec(None, doc="SLURM --mem, e.g. 0 or 480G.")
    cpus_per_task: int | None = spec(None, min=1, max=4096)
    exclusive: bool = spec(False, doc="Whole nodes (--exclusive).")
    setup: list[str] = spec(factory=list, doc="Shell lines run before training (module load, venv activate).")
    env: dict[str, str] = spec(factory=dict, doc="Environment for every rank (NCCL_*, ...).")
    python: str | None = spec(None, doc="Interpreter the ranks train with (`PYTHON -m torch.distributed.run`), "
                                        "a path or a name the setup lines put on PATH. Unset: the interpreter "
                                        "that rendered the run, so its venv works without activation.")
    rdzv_port: int | None = spec(None, min=1024, max=65535, doc="Rendezvous port. Unset: derived from the SLURM "
                                                               "job id; a free port for local runs.")
    signal_grace_s: int = spec(120, min=10, max=86400, doc="Seconds before the time limit to signal a checkpoint.")
    requeue: bool = spec(True, doc="Requeue the job after a pre-limit checkpoint.")
    max_restarts: int = spec(3, min=0, max=1000)
    collective_timeout_minutes: float = spec(
        60.0, min=0.25, max=1440, doc="How long a rank waits in a collective before the job fails (DeepSpeed's "
                                      "default is 10): the other ranks wait in a barrier while rank 0 alone "
                                      "converts a checkpoint or exports a merged model, which takes longer on a "
                                      "big model. Also how long the launchers let a rank's heartbeat (every 5 s) "
                                      "stay silent. Fractions are for tests; real runs want 10 or more.")
    job_name: str | None = spec(None, doc="Defaults to the recipe name.")
    hostfile: str | None = spec(None, doc="ssh backend: DeepSpeed-style hostfile (`HOST slots=N` per line, # comments), "
                                         "relative to the recipe; one node per host, in order (the first hosts "
                                         "the rendezvous).")
    hosts: list[str] = spec(factory=list, doc="ssh backend: the hosts, instead of a hostfile (`[node-a, node-b]`).")
    ssh_options: list[str] = spec(factory=list, doc="Extra ssh arguments, e.g. `[-p, \"2222\", -F, ~/.ssh/cluster]`; "
                                                    "ssh always runs with BatchMode=yes (no password prompts).")

    def __post_init__(self) -> None:
        if self.gpus_per_node and self.procs_per_node != 1:  # GPU nodes run one rank per GPU
            raise Invalid("procs_per_node", f"is for CPU ranks; with gpus_per_node {self.gpus_per_node} a node runs "
                          "one rank per GPU (procs_per_node would be ignored)",
                          "remove procs_per_node, or set gpus_per_node: 0 for CPU ranks")
        for i, host in enumerate(self.hosts):
            if (why := host_problem(host)) is not None:
                raise Invalid(f"hosts[{i}]", why, "use the host's name or address (an ~/.ssh/config alias works)")
        if len(set(self.hosts)) != len(self.hosts):
            raise Invalid("hosts", "lists a host twice", "one entry per node; ranks per node is procs_per_node")
        for i, option in enumerate(self.ssh_options):
            if not option or not printable_line(option):
                raise Invalid(f"ssh_options[{i}]", f"{option!r} is empty or contains a control character",
                              "one ssh argument per entry, on one line")
        if self.hostfile is not None and (not self.hostfile.strip() or not printable_line(self.hostfile)):
            raise Invalid("hostfile", f"{self.hostfile!r} is not a usable path", "give the hostfile's path")
        for name in ("partition", "account", "qos", "constraint", "mem", "job_name", "time_limit", "python"):
            value = getattr(self, name)
            if isinstance(value, str) and not printable_line(value):
                raise Invalid(name, f"{value!r} contains a line break or control character",
                              "write it on one line; it becomes an #SBATCH directive or a script line")
        if self.python is not None and not self.python.strip():
            raise Invalid("python", "is empty", "unset it (the rendering interpreter) or name an interpreter")
        for key in self.env:
            if not key.isidentifier() or not key.isascii():
                raise Invalid(f"env.{key}", "is not a valid environment variable name",
                              "use letters, digits and '_' (not starting with a digit)")
            if env_key_problem(key):
                raise Invalid(f"env.{key}", env_key_problem(key),
                              "choose another name; shell settings belong in `cluster.setup` lines")
            if secret_key_problem(key):
                raise Invalid(f"env.{key}", secret_key_problem(key),
                              f"remove it and export {key} in the environment the job starts from (sbatch and "
                              "the local backend pass it on; for ssh, the hosts' shell profile)")

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.procs_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass(frozen=True)
class Parallelism:
    zero_stage: Literal[1, 2, 3] = spec(2, doc="What DeepSpeed shards: 1 optimizer, 2 +gradients, 3 +weights.")
    offload_optimizer: Literal["none", "cpu", "nvme"] = spec("none", doc="Optimizer states off the GPU (ZeRO 2/3).")
    offload_params: Literal["none", "cpu", "nvme"] = spec("none", doc="Weights off the GPU (ZeRO 3).")
    nvme_path: str | None = spec(None, doc="Local NVMe folder for nvme offload.")
    sequence_parallel: int = spec(1, min=1, max=MAX_GPUS_PER_NODE * MAX_NODES,
                                  doc="Ulysses degree: ranks sharing one sequence.")

    def __post_init__(self) -> None:
        if self.offload_params != "none" and self.zero_stage != 3:
            raise Invalid("offload_params", "parameter offload needs ZeRO stage 3", "set `zero_stage: 3`")
        if self.offload_optimizer != "none" and self.zero_stage == 1:
            raise Invalid("offload_optimizer", "optimizer offload needs ZeRO stage 2 or 3", "set `zero_stage: 2`")
        if "nvme" in (self.offload_optimizer, self.offload_params) and not self.nvme_path:
            raise Invalid("nvme_path", "nvme offload needs a path", "set `nvme_path: /local/nvme`")


@dataclass(frozen=True)
class Tracking:
    mode: Literal["online", "offline", "disabled", "auto"] = spec("auto", doc="auto: online with a key, else offline.")
    project: str = spec("dist-ft", doc="W&B project.")
    entity: str | None = spec(None, doc="W&B entity (team or user).")
    group: str | None = spec(None, doc="Defaults to the recipe name: one group per pipeline.")
    tags: list[str] = spec(factory=list, doc="W&B tags.")
    run_name: str | None = spec(None, doc="W&B run name prefix (stage appended); defaults to the recipe name.")


@dataclass(frozen=True)
class Checkpointing:
    every_steps: int | None = spec(None, min=1, max=MAX_STEPS,
                                   doc="Also checkpoint every N steps (always at stage end).")
    keep_last: int = spec(2, min=1, max=1000)
    output_root: str = spec("runs", doc="Run dirs are created under this folder.")
    run_dir_access: Literal["private", "group", "everyone"] = spec(
        "group", doc="Who may read the run dir the launcher writes (its folders and rendered files): private "
                     "0700, group 0750 (a team reading each other's logs on a shared file system), everyone 0755. "
                     "Files the ranks write later follow their umask.")

    def __post_init__(self) -> None:
        if not printable_line(self.output_root):
            raise Invalid("output_root", "contains a line break or control character", "use a plain path")


@dataclass(frozen=True)
class Evaluation:
    after_each_stage: bool = spec(False, doc="Run `dist-ft eval` on each stage's export when it finishes "
                                             "(results under RUN/eval/<stage>): what each stage bought.")
    lengths: list[int] = spec(factory=lambda: [1024, 2048], doc="Perplexity window lengths (tokens).")
    passkey_lengths: list[int] | None = spec(None, doc="Passkey prompt lengths; default: `lengths`.")
    depths: list[float] = spec(factory=lambda: [0.0, 0.5, 1.0], doc="Relative needle depths in [0, 1].")
    trials: int = spec(2, min=1, max=1000, doc="Passkeys per (length, depth) cell.")
    windows: int = spec(4, min=1, max=1000, doc="Perplexity windows per length (the table shows their "
                                                "range; one window is one passage of text, an anecdote).")
    text: list[str] = spec(factory=list, doc="Held-out text files or folders; default: Python stdlib source.")

    def __post_init__(self) -> None:
        for name in ("lengths", "passkey_lengths"):
            short = [n for n in getattr(self, name) or [] if n < 16]
            if short:
                raise Invalid(name, f"{short} are below 16 tokens", "use lengths of at least 16 tokens")
            if any(n > MAX_SEQ_LEN for n in getattr(self, name) or []):
                raise Invalid(name, f"has a length above {MAX_SEQ_LEN} tokens", "evaluate shorter lengths")
        if self.after_each_stage and not self.lengths:
            raise Invalid("lengths", "is empty, so the evaluation after each stage would measure no perplexity",
                          "list lengths, e.g. [1024, 2048], or set after_each_stage: false")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise Invalid("depths", f"{self.depths} has a depth outside [0, 1]", "use fractions like 0, 0.5, 1")
