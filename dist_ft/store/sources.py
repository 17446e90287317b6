"""Which stores a stage reads: the one mapping from a data section to store specs, used by `dist-ft prepare`
(to build them) and by the ranks (to open them), so the two cannot disagree."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dist_ft.recipe.config import Data
from .format import DOCUMENTS, EXAMPLES
from .key import SourceSpec

HUB_FOLDER = "hub"


def hub_file(data: Data) -> Path:
    """Where prepare exports `data.hub_dataset` (its split) as JSON Lines, under the cache dir. A local folder
    (`datasets.save_to_disk` output, an absolute path once the plan resolved it) is named by a hash of its path."""
    name = data.hub_dataset.replace('/', '__')
    if is_saved_dataset(data.hub_dataset):
        name = f"local-{hashlib.sha256(data.hub_dataset.encode()).hexdigest()[:16]}"
    return Path(data.cache_dir) / HUB_FOLDER / f"{name}.{data.hub_split}.jsonl"


def is_saved_dataset(name: str) -> bool:
    """Whether `hub_dataset` names a local folder (written by `datasets.save_to_disk`), not a hub repository."""
    return name.startswith("/")


def source_spec(paths: list[str] | tuple[str, ...], data: Data, phase: str, fmt: str | None,
                template: str | None) -> SourceSpec:
    """Documents for continued pre-training; fine-tuning examples (format, template) otherwise."""
    if phase == "continued_pretraining":
        return SourceSpec(DOCUMENTS, tuple(paths), data.text_field)
    return SourceSpec(EXAMPLES, tuple(paths), data.text_field, fmt, template, tuple(sorted(data.columns.items())))


def training_paths(data: Data) -> list[str]:
    """A stage's training files when it has no `sources`: its paths, or its exported hub dataset."""
    return list(data.paths) if data.paths else [str(hub_file(data))]


def stage_specs(data: Data, phase: str, fmt: str | None, template: str | None) -> list[SourceSpec]:
    """Every store a stage reads: training (each source of a mixture), validation and test files."""
    def spec(paths):
        return source_spec(paths, data, phase, fmt, template)

    specs = [spec(s.paths) for s in data.sources] if data.sources else [spec(training_paths(data))]
    specs += [spec(data.validation_paths)] if data.validation_paths else []
    return specs + ([spec(data.test_paths)] if data.test_paths else [])
