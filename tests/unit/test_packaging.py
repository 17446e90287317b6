"""`pip install -e .` and a wheel build are quiet (no setuptools warning of any kind), and the wheel
carries the ZeRO presets, the sbatch template and the local cluster scripts `assets.asset` looks for."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

BUILD = """
import sys, warnings
warnings.simplefilter("error")  # any setuptools warning (deprecation, ambiguous package, ...) fails
from setuptools import build_meta
print(getattr(build_meta, sys.argv[1])(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The packaged parts of the checkout, symlinks kept, so builds leave no trace in it."""
    copy = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    for name in ("dist_ft", "ds_configs", "slurm"):
        shutil.copytree(ROOT / name, copy / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return copy


@pytest.mark.parametrize("hook", ["build_editable", "build_wheel"])
def test_builds_are_quiet_and_the_wheel_carries_the_assets(hook, project, tmp_path):
    result = subprocess.run([sys.executable, "-c", BUILD, hook, str(tmp_path)], cwd=project,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]  # (distutils' "warning: byte-compiling" is a log line)
    if hook == "build_wheel":
        names = set(zipfile.ZipFile(tmp_path / result.stdout.split()[-1]).namelist())
        assert {"dist_ft/ds_configs/zero3.json", "dist_ft/slurm_templates/stage.sbatch.tmpl",
                "dist_ft/slurm_templates/local_cluster/up.sh"} <= names
        # every package of the checkout, so a new folder missing from pyproject's list fails here, not at a user's
        packages = {str(p.relative_to(ROOT)) for p in (ROOT / "dist_ft").rglob("__init__.py")}
        assert sorted(packages - names) == []


def test_test_modules_have_unique_basenames():
    """The test folders are not packages: pytest imports each test module by its basename, so two files of
    one name (tests/unit/x.py, tests/integration/x.py) stop the whole run at collection."""
    from collections import Counter
    from pathlib import Path

    names = Counter(path.name for path in (Path(__file__).resolve().parents[1]).rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
