"""A stage's checkpoint policy on the ranks, in one place: which checkpoint to resume (chosen on rank 0,
converted when it was saved at another data-parallel size), what a checkpoint holds (the engine's
state, the loop's and the data stream's), how it is saved (a clean tag, every rank's shards on disk,
then committed), and how many stay (`checkpointing.keep_last`). checkpoint.py keeps the files' own
bookkeeping; when the loop asks for a checkpoint is loop.py's (at `every_steps`, on a stop request,
at the end; never inside a run of non-finite steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_ft.plan.run_dir import StageDir
from dist_ft.recipe.config import Checkpointing
from . import engine as ds
from .checkpoint import best_tag, clear_tag, commit, ensure_universal, read_meta, resume_choice, tag_for
from .data import BatchStream
from .distributed import DistEnv
from .loop import LoopState

CLIENT_KEY = "dist_ft"  # our part of DeepSpeed's client state


@dataclass(frozen=True)
class ResumePoint:
    folder: Path  # the stage's checkpoints, or their universal conversion
    tag: str
    universal: bool


@dataclass
class StageCheckpoints:
    stage_dir: StageDir
    policy: Checkpointing
    env: DistEnv
    dp_size: int
    frozen_excluded: bool  # adapters and frozen layers: only the trainable weights are saved
    resumed_at: int | None = None

    def resume_point(self) -> ResumePoint | None:
        """The latest complete checkpoint, chosen by rank 0 for every rank; converted to DeepSpeed's universal
        format when it was saved at another data-parallel size (DeepSpeed refuses to load it directly)."""
        choice = ds.broadcast_from_main(resume_choice(self.stage_dir.checkpoints) if self.env.is_main else None)
        return None if choice is None else self._point(*choice)

    def best_point(self, step: int) -> ResumePoint:
        """The checkpoint of the best evaluation (at `step`), as `resume_point` finds a checkpoint."""
        folder = self.stage_dir.checkpoints

        def choose() -> tuple[str, int] | None:
            tag = best_tag(folder)
            return (tag, read_meta(folder, tag)["dp"]) if tag == tag_for(step) else None

        choice = ds.broadcast_from_main(choose() if self.env.is_main else None)
        if choice is None:
            raise RuntimeError(f"the best evaluation was at step {step}, but {folder} has no complete best "
                               f"checkpoint {tag_for(step)}")
        return self._point(*choice)

    def load_weights(self, engine, point: ResumePoint) -> None:
        """Put the engine back to a checkpoint's weights (all ranks); the loop's state stays as it is."""
        ds.load_checkpoint(engine, point.folder, point.tag, universal=point.universal)
        self.env.say(f"loaded the best checkpoint {point.folder / point.tag}")

    def _point(self, tag: str, saved_dp: int) -> ResumePoint:
        folder, universal = self.stage_dir.checkpoints, self.stage_dir.universal
        if saved_dp == self.dp_size:
            return ResumePoint(folder, tag, universal=False)
        self.env.say(f"{tag} was saved at data-parallel {saved_dp}; this run has {self.dp_size}: converting it to "
                       f"DeepSpeed's universal checkpoint in {universal}")
        if self.env.is_main:  # the others wait in the barrier, under the recipe's collective timeout
            ensure_universal(folder, tag, universal, ds.convert_to_universal)
        ds.barrier()
        return ResumePoint(universal, tag, universal=True)

    def restore(self, engine, point: ResumePoint | None, stream: BatchStream) -> LoopState:
        """The loop's state at `point` (a fresh one without), with the engine and the data stream put back."""
        if point is None:
            return LoopState()
        saved = ds.load_checkpoint(engine, point.folder, point.tag)[CLIENT_KEY]
        stream.load_state_dict(saved["data"])
        self.resumed_at = saved["step"]
        self.env.say(f"resumed from {point.folder / point.tag} at step {saved['step']}")
        return LoopState.from_state_dict(saved)

    def save(self, engine, state: LoopState, stream: BatchStream, best: bool = False) -> None:
        """Every rank saves its shards into a clean tag; rank 0 commits it once all are on disk, then prunes.
        `best`: the checkpoint of the best evaluation, kept out of keep_last rotation."""
        if state.step == self.resumed_at:  # a restart after the last step: that checkpoint is this very state
            return
        folder, tag = self.stage_dir.checkpoints, tag_for(state.step)
        if self.env.is_main:
            clear_tag(folder, tag)
        ds.barrier()
        ds.save_checkpoint(engine, folder, tag, {CLIENT_KEY: self.client_state(state, stream)}, self.frozen_excluded)
        ds.barrier()
        if self.env.is_main:
            commit(folder, tag, {"step": state.step, "dp": self.dp_size, "world_size": self.env.world_size,
                                 "time": time.time(), "restart": self.env.restart_count}, self.policy.keep_last,
                   best=best)
        ds.barrier()

    @staticmethod
    def client_state(state: LoopState, stream: BatchStream) -> dict[str, Any]:
        return {**state.state_dict(), "data": stream.state_dict()}
