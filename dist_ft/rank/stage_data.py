"""A stage's data on one rank: rows from the plan's data section, validation rows (a split of them, or
their own files), test rows, the rank's resumable batch stream and the bad-data report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_ft.plan import batching
from dist_ft.plan.plan import Plan, StagePlan
from . import engine as ds
from .data import BadRows, BatchStream, DataError, SourceRows, mixture_rows, pretraining_rows, sft_rows, split_rows
from .distributed import DistEnv


@dataclass
class StageData:
    train: BatchStream
    validation: list[dict[str, list[int]]]
    dp_rank: int
    dp_size: int
    steps_per_epoch: int
    report: str
    eval_copies: int = 1  # forward batch size for one validation row (see evaluate_loss)
    test: list[dict[str, list[int]]] = field(default_factory=list)


def load_stage_data(plan: Plan, stage: StagePlan, env: DistEnv, tokenizer, ds_config: dict[str, Any]) -> StageData:
    data = stage.data
    seed = data.seed + plan.seed
    mixture: list[SourceRows] = []
    def rows_of(paths) -> tuple[list[dict[str, list[int]]], BadRows]:
        """Rows from files as this stage reads its training data (validation and test files too)."""
        if stage.phase == "continued_pretraining":
            return pretraining_rows(paths, data.text_field, tokenizer, stage.seq_len, seed=seed,
                                    long_docs=data.long_documents)
        return sft_rows(paths, tokenizer, stage.data_format, stage.template, stage.seq_len, seed=seed,
                        packing=data.packing, text_field=data.text_field)

    try:
        if data.sources:  # split per source before drawing: a repeated row never lands on both sides
            train, validation, bad, mixture = mixture_rows(
                [(s.paths, s.weight, s.long_documents) for s in data.sources], data.text_field, tokenizer,
                stage.seq_len, seed=seed, validation_fraction=data.validation_fraction)
        else:
            rows, bad = rows_of(_local_paths(plan, stage, env))
            train, validation = split_rows(rows, data.validation_fraction, seed)
        if data.validation_paths:
            validation, held_bad = rows_of(data.validation_paths)
            bad.merge(held_bad)
        test = rows_of(data.test_paths)[0] if data.test_paths else []
    except DataError as err:
        raise SystemExit(f"error: [{stage.name}] {err}") from None
    sp = plan.sp
    dp_size = batching.data_parallel_size(env.world_size, sp)
    dp_rank = batching.data_parallel_rank(env.rank, sp)
    micro = ds_config["train_micro_batch_size_per_gpu"]
    per_step = batching.train_batch_size(micro, ds_config["gradient_accumulation_steps"], dp_size)
    if len(train) < per_step:
        raise SystemExit(f"error: [{stage.name}] {len(train)} training rows of {stage.seq_len} tokens cannot fill "
                         f"one step of {per_step} sequences: add data or lower the batch size")
    stream = BatchStream(train, micro, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
    return StageData(train=stream, validation=validation, dp_rank=dp_rank, dp_size=dp_size,
                     steps_per_epoch=batching.steps_per_epoch(len(train), per_step),
                     report=_report(stage, len(train), len(validation), len(test), bad) + _mixture_report(mixture),
                     eval_copies=micro if sp > 1 else 1, test=test)


def _mixture_report(mixture: list[SourceRows]) -> str:
    """The realised mixture: each source's share of the scored tokens, and how its rows were drawn."""
    total = sum(s.scored_tokens for s in mixture) or 1
    return "".join(f"\n    source {i} ({', '.join(Path(p).name for p in s.paths)}): weight {s.weight:g}, "
                   f"{s.taken} of {s.available} rows{' (up-sampled)' if s.taken > s.available else ''}, "
                   f"{100 * s.scored_tokens / total:.1f}% of the tokens"
                   for i, s in enumerate(mixture))



def _report(stage: StagePlan, train: int, validation: int, test: int, bad: BadRows) -> str:
    head = (f"[{stage.name}] data: {train} training rows"
            f"{f' + {validation} validation rows' if validation else ''}"
            f"{f' + {test} test rows' if test else ''} of {stage.seq_len} tokens")
    return head + (f"; skipped or changed: {bad}" if bad.total else "; no bad rows")


def _local_paths(plan: Plan, stage: StagePlan, env: DistEnv) -> list[str]:
    """Local paths as given; a hub dataset is exported once to JSONL in the run dir (online only)."""
    data = stage.data
    if data.paths:
        return list(data.paths)
    target = plan.run.data_cache(stage.name)
    if env.is_main and not target.exists():
        _export_hub_dataset(data.hub_dataset, data.hub_split, target)
    ds.barrier()
    return [str(target)]


def _export_hub_dataset(name: str, split: str, target: Path) -> None:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as err:  # offline compute nodes: say what to do instead
        raise SystemExit(f"error: could not load hub dataset {name!r} ({err}); download it where there is "
                         "network and give `data.paths` instead") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for row in dataset:
            handle.write(json.dumps(row) + "\n")
    tmp.rename(target)
