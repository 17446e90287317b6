"""The layout of a run dir, in one place. Pure: paths only; nothing here writes them, and only the
listings (`*_files`, `stage_logs`, `node_log_attempts`) read a folder.

    RUN/plan.json  recipe.resolved.yaml  local.sh  nodes.sh  jobs.json   what the launcher renders and submits
    RUN/ds_config.<stage>.json  RUN/<stage>.sbatch                  one of each per stage
    RUN/prepare.sbatch                                              with data.prepare: job (SLURM)
    RUN/ssh.json  RUN/control/ssh.token  RUN/control/nodes/<stage>.node<N>.json   the ssh backend's record
    RUN/heartbeats/<stage>/rank<N>.json                             each rank's (step, time), every few seconds
    RUN/logs/<stage>.<job>.out  <stage>.<job>.attempt<restart>.log   SLURM: a job's output, each attempt's ranks
    RUN/logs/<stage>.node<N>.<host>.attempt<A>.log                  ssh: one host's part of an attempt
    RUN/control/<stage>.stop  RUN/wandb/
    RUN/eval/<stage>/                                               `dist-ft eval` after a stage
    RUN/stages/<stage>/DONE  metrics.jsonl  loss.png  ranks/rank<N>.json
    RUN/stages/<stage>/samples.jsonl  test_metrics.json              evaluation during and after fine-tuning
    RUN/stages/<stage>/checkpoints/  universal/                      see checkpoint.py
    RUN/stages/<stage>/export/  (adapter/, merged/ for adapter methods)
    RUN/stages/<stage>/adapter/                                     a long-context adapter stage's adapter; its
                                                                    export/ is the adapter merged (the next stage's start)

Token stores live outside any run dir, shared by runs and recipes: data.cache_dir, by default
token_store_root(checkpointing.output_root); dist_ft/store/format.py describes one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PLAN_FILE = "plan.json"
RECIPE_FILE = "recipe.resolved.yaml"
LOCAL_SCRIPT = "local.sh"
NODES_SCRIPT = "nodes.sh"  # one node's part of a multi-node run, for orchestrators other than SLURM
JOBS_FILE = "jobs.json"
SSH_FILE = "ssh.json"  # the ssh backend's record: hosts, launcher, each stage's state and attempt
PREPARE_SBATCH = "prepare.sbatch"  # with data.prepare: job, the CPU job the first stage depends on
SUBDIRS = ("logs", "control", "stages")  # created with the run dir
TOKEN_STORE = "token_store"


def token_store_root(output_root: str) -> Path:
    """The default data.cache_dir: beside the runs (on the shared file system), not inside one."""
    return Path(output_root) / TOKEN_STORE


def ds_config_name(stage: str) -> str:
    return f"ds_config.{stage}.json"


def sbatch_name(stage: str) -> str:
    return f"{stage}.sbatch"


@dataclass(frozen=True)
class StageDir:
    """RUN/stages/<stage>: what one stage's ranks write."""
    path: Path

    @property
    def done(self) -> Path:
        """Written by rank 0 once the stage's export is complete."""
        return self.path / "DONE"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def universal(self) -> Path:
        """Checkpoints converted for another data-parallel size."""
        return self.path / "universal"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def adapter(self) -> Path:
        return self.export / "adapter"

    @property
    def merged(self) -> Path:
        return self.export / "merged"

    @property
    def merged_from(self) -> Path:
        """A long-context adapter stage's adapter (its export holds the adapter merged into the base)."""
        return self.path / "adapter"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def samples(self) -> Path:
        """Generated samples, one JSON row each: step, prompt, output, reference."""
        return self.path / "samples.jsonl"

    @property
    def test_metrics(self) -> Path:
        """The test set's metrics on the exported weights."""
        return self.path / "test_metrics.json"

    def rank_info(self, rank: int) -> Path:
        return self.path / "ranks" / f"rank{rank}.json"

    def model(self) -> Path:
        """Where the finished stage's model is: the adapter directory, or the full one."""
        return self.adapter if self.adapter.is_dir() else self.export

    def finished(self) -> bool:
        return self.done.exists() and self.export.is_dir()


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def plan_file(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def recipe_file(self) -> Path:
        """The resolved recipe: what `dist-ft prepare` reads to (re)build the run's token stores."""
        return self.path / RECIPE_FILE

    @property
    def prepare_sbatch(self) -> Path:
        return self.path / PREPARE_SBATCH

    @property
    def jobs_file(self) -> Path:
        return self.path / JOBS_FILE

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def slurm_output(self, stage: str, job: str | None) -> Path:
        """SLURM's --output of a stage's job: one per job id (`%j` as rendered), or one for all (None)."""
        return self.logs / (f"{stage}.{job}.out" if job else f"{stage}.out")

    def attempt_log(self, stage: str, job: str, restart: str) -> Path:
        """What the ranks of one SLURM attempt print (stage.sbatch renders it with its shell variables)."""
        return self.logs / f"{stage}.{job}.attempt{restart}.log"

    def stage_logs(self, stage: str) -> tuple[list[Path], list[Path]]:
        """(the stage's SLURM attempt logs, its SLURM job outputs) there are (reads the folder)."""
        if not self.logs.is_dir():
            return [], []
        names = [p for p in self.logs.glob(f"{stage}.*")]
        name = re.escape(stage)
        return ([p for p in names if re.fullmatch(rf"{name}\.\d+\.attempt.*\.log", p.name)],
                [p for p in names if re.fullmatch(rf"{name}(\.\d+)?\.out", p.name)])

    def node_log(self, stage: str, node_rank: int, host: str, attempt: int) -> Path:
        """What one host's node agent and ranks print for one ssh attempt of a stage."""
        return self.logs / f"{stage}.node{node_rank}.{host}.attempt{attempt}.log"

    def node_log_attempts(self, stage: str) -> list[int]:
        """The ssh attempts of `stage` that left a node log (reads the folder)."""
        found = (re.fullmatch(rf"{re.escape(stage)}\.node\d+\..*\.attempt(\d+)\.log", p.name)
                 for p in self.logs.glob(f"{stage}.node*.attempt*.log"))
        return sorted({int(m.group(1)) for m in found if m})

    @property
    def control(self) -> Path:
        return self.path / "control"

    @property
    def wandb(self) -> Path:
        """Where W&B keeps the ranks' runs (WANDB_DIR is the run dir; W&B adds `wandb/`)."""
        return self.path / "wandb"

    def wandb_under(self, wandb_dir: str | None) -> Path:
        """The ranks' W&B runs when a WANDB_DIR (cluster.env) moves them out of the run dir."""
        return Path(wandb_dir) / "wandb" if wandb_dir else self.wandb

    def stage(self, name: str) -> StageDir:
        return StageDir(self.path / "stages" / name)

    @property
    def ssh_file(self) -> Path:
        return self.path / SSH_FILE

    @property
    def ssh_token(self) -> Path:
        """Written by `launch --backend ssh`; every host must read the same text back (a shared run dir)."""
        return self.control / "ssh.token"

    def node_record(self, stage: str, node_rank: int) -> Path:
        """Written by the ssh node agent: its host, pid and start time."""
        return self.control / "nodes" / f"{stage}.node{node_rank}.json"

    def node_record_files(self, stage: str) -> list[Path]:
        """Every node's `node_record` file of the stage there is (reads the folder)."""
        return sorted((self.control / "nodes").glob(f"{stage}.node*.json"))

    def heartbeats(self, stage: str) -> Path:
        """The stage's heartbeat folder: one `heartbeat(stage, rank)` file per rank."""
        return self.path / "heartbeats" / stage

    def heartbeat(self, stage: str, rank: int) -> Path:
        return self.heartbeats(stage) / f"rank{rank}.json"

    def heartbeat_files(self, stage: str) -> list[Path]:
        """Every rank's `heartbeat` file there is (reads the folder)."""
        folder = self.heartbeats(stage)
        return sorted(folder.glob("rank*.json")) if folder.is_dir() else []

    def stop_file(self, stage: str) -> Path:
        """Touched (by the sbatch script on a signal, or by hand) to make a stage checkpoint and stop."""
        return self.control / f"{stage}.stop"

    def eval(self, stage: str) -> Path:
        return self.path / "eval" / stage

    def ds_config(self, stage: str) -> Path:
        return self.path / ds_config_name(stage)

    def sbatch(self, stage: str) -> Path:
        return self.path / sbatch_name(stage)
