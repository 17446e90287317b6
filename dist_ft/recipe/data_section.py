"""The data section of a stage: local paths or a weighted mixture of sources, splits, packing, and where
its token store lives.

Split from config.py (re-exported there), checked one object at a time like the other sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .limits import MAX_SEED, MAX_SEQ_LEN
from .strict import Invalid, spec

MAX_SOURCES = 64


@dataclass(frozen=True)
class UpsampleLong:
    min_tokens: int = spec(min=1, max=MAX_SEQ_LEN, doc="Documents of at least this many tokens count as long.")
    factor: int = spec(min=1, max=1000, doc="Each long document appears this many times in the source's shuffled "
                                            "documents (1: as is).")


@dataclass(frozen=True)
class Source:
    paths: list[str] = spec(doc="Local files or directories of this source (jsonl, json, parquet, txt).")
    weight: float = spec(1.0, min=1e-6, max=1e6, doc="Share of the stage's training rows relative to the other "
                                                   "sources' weights; more rows than the source has repeats them "
                                                   "(up-sampling), fewer leaves some out.")
    long_documents: Literal["split", "truncate", "skip", "only"] = spec(
        "split", doc="Documents over seq_len: split, truncate or skip them; `only`: keep only those, split.")
    upsample_long: UpsampleLong | None = spec(None, doc="Raise long documents' share inside this source (its weight, "
                                                        "i.e. the domain mixture, is unchanged); the realised share "
                                                        "of tokens in long documents is reported per stage.")

    def __post_init__(self) -> None:
        if not self.paths:
            raise Invalid("paths", "a source needs at least one path", "list its files or folders")
        for index, path in enumerate(self.paths):
            if not path.strip():
                raise Invalid(f"paths[{index}]", "is empty", "give a data file or folder, or remove the entry")


@dataclass(frozen=True)
class Data:
    paths: list[str] = spec(factory=list, doc="Local files or directories (jsonl, json, parquet, txt).")
    sources: list[Source] = spec(factory=list, doc="Long-context stages: a mixture of sources by weight instead "
                                                   "of `paths` (deterministic and resumable; the realised mixture "
                                                   "is reported per stage).")
    hub_dataset: str | None = spec(None, doc="Hub dataset name; used only when online.")
    hub_split: str = spec("train", doc="Split of the hub dataset.")
    text_field: str = spec("text", doc="Field holding the text in json/jsonl/parquet rows.")
    packing: bool = spec(True, doc="Pack documents into full rows (per-document positions, no cross attention).")
    packing_method: Literal["next_fit", "best_fit_decreasing"] = spec(
        "next_fit", doc="Fine-tuning: how examples fill rows (never split): next_fit keeps the shuffled order; "
                        "best_fit_decreasing packs tighter (fewer rows; the efficiency is reported).")
    long_documents: Literal["split", "truncate", "skip"] = spec("split", doc="What to do with documents over seq_len.")
    validation_fraction: float = spec(0.0, min=0.0, max=0.5, doc="Share of the rows held out for validation "
                                                                  "(seeded); or give `validation_paths`.")
    validation_paths: list[str] = spec(factory=list, doc="Validation files or folders, read like `paths` (instead "
                                                         "of `validation_fraction`).")
    test_paths: list[str] = spec(factory=list, doc="Test files or folders, read like `paths`: evaluated once "
                                                   "after the stage, on the exported weights (test_metrics.json).")
    seed: int = spec(0, min=0, max=MAX_SEED, doc="Added to the recipe seed for shuffling and the validation split.")
    prepare: Literal["launcher", "job"] = spec(
        "launcher", doc="Where `launch --backend slurm` runs `dist-ft prepare`: on the submitting machine "
                        "(launcher), or as a CPU job (prepare.sbatch) that the first stage waits for (afterok). "
                        "The local and ssh backends always prepare where they run.")
    cache_dir: str | None = spec(None, doc="Folder of the token stores `dist-ft prepare` writes and the ranks "
                                           "memory-map (default: checkpointing.output_root/token_store); shared "
                                           "by runs and recipes with the same sources and tokenizer.")

    def __post_init__(self) -> None:
        for name in ("paths", "validation_paths", "test_paths"):
            for index, path in enumerate(getattr(self, name)):
                if not path.strip():  # an empty path would read the recipe's own folder
                    raise Invalid(f"{name}[{index}]", "is empty", "give a data file or folder, or remove the entry")
        if self.validation_paths and self.validation_fraction:
            raise Invalid("validation_paths", "give either `validation_paths` or `validation_fraction`, not both",
                          "keep the validation files and remove validation_fraction (or the other way round)")
        if self.sources and (self.paths or self.hub_dataset):
            raise Invalid("sources", "give either `sources` or `paths`/`hub_dataset`, not both",
                          "move the paths into a source of their own")
        if len(self.sources) > MAX_SOURCES:
            raise Invalid("sources", f"{len(self.sources)} sources are more than {MAX_SOURCES}", "merge some")
        if not self.paths and not self.hub_dataset and not self.sources:
            raise Invalid("paths", "no data: neither local paths, sources nor a hub dataset",
                          "add `paths: [data/train.jsonl]` or `hub_dataset: org/name`")
        if self.paths and self.hub_dataset:  # the ranks read the paths and would never fetch the hub dataset
            raise Invalid("hub_dataset", "give either local `paths` or a `hub_dataset`, not both (the paths "
                          "would be read and the hub dataset ignored)", "remove one of them")
        if self.hub_split != "train" and not self.hub_dataset:
            raise Invalid("hub_split", f"{self.hub_split!r} is set without a hub_dataset (it would be ignored)",
                          "add `hub_dataset: org/name`, or remove hub_split")

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_fraction or self.validation_paths)

    def all_paths(self) -> list[tuple[str, str]]:
        """(dotted field below the data section, path) of every local path, sources', validation and test ones
        included."""
        return [(f"{name}[{i}]", p) for name in ("paths", "validation_paths", "test_paths")
                for i, p in enumerate(getattr(self, name))] + \
            [(f"sources[{i}].paths[{j}]", p) for i, s in enumerate(self.sources) for j, p in enumerate(s.paths)]
