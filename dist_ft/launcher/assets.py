"""Files shipped beside the code: ZeRO presets (`ds_configs/`) and sbatch templates (`slurm/`).

In a checkout they sit at the repository's top level; an installed wheel carries
them inside the package (see pyproject's package-dir), so look in both places.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # dist_ft/, which holds the ds_configs and slurm_templates links
_INSTALLED = {"ds_configs": "ds_configs", "slurm": "slurm_templates"}


def asset(folder: str, name: str) -> Path:
    for candidate in (_PACKAGE / _INSTALLED[folder] / name, _PACKAGE.parent / folder / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder}/{name} is missing from the dist-ft installation")
