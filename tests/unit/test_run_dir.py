"""The run dir is written all at once or not at all, never through planted links, never into a
folder that is not a run dir."""

import resource
from pathlib import Path

from dist_ft.cli import main
from tests.conftest import LAUNCH

DEMO = str(LAUNCH / "demo.yaml")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_while_rerendering_leaves_the_run_dir_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["render", DEMO, "--out", str(out)]) == 0
    before = snapshot(out)
    # A file-size limit fails writes past 4000 bytes (EFBIG, as ENOSPC would): the new
    # recipe.resolved.yaml (~2.9 kB) still fits, the new plan.json (~7.6 kB) does not.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, limits[1]))
    try:
        status = main(["render", DEMO, "--out", str(out), "--set", "seed=7", "--continue"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert status == 2 and "nothing in it was changed" in capsys.readouterr().err
    assert snapshot(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_planted_links_in_the_run_dir_redirect_no_write(tmp_path):
    out = tmp_path / "run"
    assert main(["render", DEMO, "--out", str(out)]) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name in ("plan.json", "recipe.resolved.yaml", "local.sh"):
        (out / f".{name}.tmp").symlink_to(victim)
    (out / "local.sh").unlink()
    (out / "local.sh").symlink_to(victim)
    assert main(["render", DEMO, "--out", str(out), "--set", "seed=7", "--continue"]) == 0
    assert victim.read_text() == "keep me"
    assert not (out / "local.sh").is_symlink() and '"seed": 7' in (out / "plan.json").read_text()


def test_a_foreign_folder_is_refused_and_left_alone(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "local.sh").write_text("mine")
    assert main(["render", DEMO, "--out", str(foreign)]) == 2
    assert "not a dist-ft run dir" in capsys.readouterr().err
    assert snapshot(foreign) == {"local.sh": b"mine"}
    assert main(["render", DEMO, "--out", str(foreign), "--fresh"]) == 2  # --fresh moves run dirs, not folders
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["render", DEMO, "--out", str(empty)]) == 0 and (empty / "plan.json").is_file()


def test_rerendering_a_run_with_checkpoints_keeps_them(tmp_path):
    out = tmp_path / "run"
    assert main(["render", DEMO, "--out", str(out)]) == 0
    shard = out / "stages" / "ctx512" / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"weights")
    (out / "jobs.json").write_text("{}")
    assert main(["render", DEMO, "--out", str(out)]) == 0
    assert shard.read_bytes() == b"weights" and (out / "jobs.json").read_text() == "{}"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
