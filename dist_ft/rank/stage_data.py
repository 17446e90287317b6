"""A stage's data on one rank: rows from the plan's data section, validation rows (a split of them, or
their own files), test rows, the rank's resumable batch stream and the bad-data report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dist_ft.plan import batching
from dist_ft.plan.plan import Plan, StagePlan
from dist_ft.store import DOCUMENTS, BadRows, DataError, SourceSpec, StoreError, TokenStore, open_source
from dist_ft.store.sources import source_spec, training_paths
from .data import BatchStream
from .data.packed import PackedDocuments, PackedExamples, RowSet
from .data.select import SourceRows, mix, split_set


@dataclass
class StageData:
    train: BatchStream
    validation: Sequence[dict[str, list[int]]]  # read from the memory map row by row
    steps_per_epoch: int
    report: str
    eval_copies: int = 1  # forward batch size for one validation row (see evaluate_loss)
    test: Sequence[dict[str, list[int]]] = field(default_factory=list)


def load_stage_data(plan: Plan, stage: StagePlan, batch: batching.RankBatch, tokenizer) -> StageData:
    """The stage's rows from its token stores (built by `dist-ft prepare`; a rank never tokenizes), and this
    rank's stream of them (`batch`: `Plan.rank_batch` for the live world)."""
    data = stage.data
    seed = data.seed + plan.seed
    reader = _StoreReader(plan, stage, tokenizer, seed)
    mixture: list[SourceRows] = []
    try:
        if data.sources:  # split per source before drawing: a repeated row never lands on both sides
            sources = [(s.paths, s.weight, reader.source(s, seed + i)) for i, s in enumerate(data.sources)]
            train, validation, mixture = mix(sources, seed, data.validation_fraction)
        else:
            train, validation = split_set(reader.rows(training_paths(data)), data.validation_fraction, seed)
        if data.validation_paths:
            validation = reader.rows(data.validation_paths)
        test = reader.rows(data.test_paths) if data.test_paths else []
    except (DataError, StoreError) as err:
        raise SystemExit(f"error: [{stage.name}] {err}") from None
    bad, efficiency = reader.bad, reader.efficiency
    per_step = batch.global_batch
    if len(train) < per_step:
        raise SystemExit(f"error: [{stage.name}] {len(train)} training rows of {stage.seq_len} tokens cannot fill "
                         f"one step of {per_step} sequences: add data or lower the batch size")
    stream = BatchStream(train, batch.micro, seed=seed, dp_rank=batch.dp_rank, dp_size=batch.dp)
    return StageData(train=stream, validation=validation,
                     steps_per_epoch=batching.steps_per_epoch(len(train), per_step),
                     report=_report(stage, len(train), len(validation), len(test), bad) + _mixture_report(mixture)
                     + (f"; packing efficiency {100 * efficiency[0]:.1f}%" if efficiency else ""),
                     eval_copies=batch.micro if plan.sp > 1 else 1, test=test)


def _mixture_report(mixture: list[SourceRows]) -> str:
    """The realised mixture: each source's share of the scored tokens, and how its rows were drawn."""
    total = sum(s.scored_tokens for s in mixture) or 1
    return "".join(f"\n    source {i} ({', '.join(Path(p).name for p in s.paths)}): weight {s.weight:g}, "
                   f"{s.taken} of {s.available} rows{' (up-sampled)' if s.taken > s.available else ''}, "
                   f"{100 * s.scored_tokens / total:.1f}% of the tokens"
                   + (f", {100 * s.long_share:.1f}% of its own in long documents" if s.long_share is not None
                      else "")
                   for i, s in enumerate(mixture))



def _report(stage: StagePlan, train: int, validation: int, test: int, bad: BadRows) -> str:
    head = (f"[{stage.name}] data: {train} training rows"
            f"{f' + {validation} validation rows' if validation else ''}"
            f"{f' + {test} test rows' if test else ''} of {stage.seq_len} tokens")
    return head + (f"; skipped or changed: {bad}" if bad.total else "; no bad rows")


class _StoreReader:
    """Opens a stage's stores and packs their rows, gathering the bad rows (prepare's and packing's)."""

    def __init__(self, plan: Plan, stage: StagePlan, tokenizer, seed: int) -> None:
        self.stage, self.tokenizer, self.seed = stage, tokenizer, seed
        self.rebuild = f"dist-ft prepare {plan.run.recipe_file}"
        self.bad = BadRows()
        self.efficiency: list[float] = []  # fine-tuning rows: real tokens / row tokens, per store read

    def _open(self, paths) -> tuple[SourceSpec, TokenStore]:
        stage = self.stage
        spec = source_spec(paths, stage.data, stage.phase, stage.data_format, stage.template)
        store = open_source(spec, self.tokenizer, Path(stage.data.cache_dir), self.rebuild)
        self.bad.merge(_prepare_bad(store))
        return spec, store

    def rows(self, paths) -> RowSet:
        """Rows from files as this stage reads its training data (validation and test files too)."""
        data, seq_len = self.stage.data, self.stage.seq_len
        spec, store = self._open(paths)
        if spec.kind == DOCUMENTS:
            packed = PackedDocuments(store, seq_len, seed=self.seed, long_docs=data.long_documents, bad=self.bad)
        else:
            packed = PackedExamples(store, seq_len, seed=self.seed, packing=data.packing, bad=self.bad,
                                    method=data.packing_method)
            self.efficiency.append(packed.efficiency)
        return RowSet.of(self._some(packed, paths))

    def source(self, source, seed: int) -> PackedDocuments:
        """One mixture source's rows, packed with its own long_documents policy and seed."""
        _, store = self._open(source.paths)
        up = source.upsample_long
        return self._some(PackedDocuments(store, self.stage.seq_len, seed=seed, long_docs=source.long_documents,
                                          bad=self.bad, upsample=(up.min_tokens, up.factor) if up else None),
                          source.paths)

    def _some(self, packed, paths):
        if not len(packed):
            raise DataError(f"no rows left to train on from {', '.join(map(str, paths))}: {self.bad}")
        return packed


def _prepare_bad(store: TokenStore) -> BadRows:
    """The rows prepare left out of the store, by reason (counted once, when it read the files)."""
    bad = BadRows()
    for reason, count in store.manifest["bad_rows"].items():
        bad.counts[reason] += count
        bad.examples[reason] = list(store.manifest["bad_examples"].get(reason, []))
    return bad
