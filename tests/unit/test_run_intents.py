"""A run dir that holds another plan: the user says --continue or --fresh, and is told what each keeps;
a change of where the run trains (cluster) resumes with no flag."""

from pathlib import Path

from dist_ft.cli import main
from dist_ft.launcher.run_changes import Change, recipe_changes
from dist_ft.plan.run_dir import RunDir
from tests.conftest import LAUNCH

DEMO = str(LAUNCH / "demo.yaml")


def render(out: Path, *args: str) -> int:
    return main(["render", DEMO, "--out", str(out), *args])


def half_done_run(tmp_path: Path) -> tuple[Path, Path]:
    """The demo's run dir with ctx512 finished and ctx1k checkpointed at step 2."""
    out = tmp_path / "run"
    assert render(out) == 0
    ctx512 = RunDir(out).stage("ctx512")
    ctx512.export.mkdir(parents=True)
    ctx512.done.write_text("{}")
    shard = RunDir(out).stage("ctx1k").checkpoints / "step_00000002" / "mp_rank_00_model_states.pt"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"weights")
    return out, shard


def test_the_changed_keys_are_listed_in_the_new_recipes_order():
    old = "seed: 1\nmodel: {dtype: fp32, config: {hidden_size: 64}}\ncluster: {nodes: 1}\n"
    new = "seed: 7\nmodel: {dtype: fp32, config: {hidden_size: 96}}\ncluster: {nodes: 1, partition: gpu}\n"
    assert recipe_changes(old, new) == [Change("seed", 1, 7), Change("model.config.hidden_size", 64, 96),
                                        Change("cluster.partition", None, "gpu")]
    assert str(Change("cluster.partition", None, "gpu")) == "cluster.partition: (unset) -> 'gpu'"


def test_another_plan_without_an_intent_is_refused_naming_what_changed(tmp_path, capsys):
    out, shard = half_done_run(tmp_path)
    plan = (out / "plan.json").read_text()
    assert render(out, "--set", "seed=7", "--set", "finetune.lr=0.0005") == 2
    err = capsys.readouterr().err
    assert "these settings changed: seed: 0 -> 7; finetune.lr: 0.003 -> 0.0005." in err
    assert "--continue keeps its finished stages" in err and "--fresh starts over" in err
    assert (out / "plan.json").read_text() == plan and shard.read_bytes() == b"weights"


def test_continue_keeps_finished_stages_and_checkpoints_and_says_so(tmp_path, capsys):
    out, shard = half_done_run(tmp_path)
    capsys.readouterr()
    assert render(out, "--set", "seed=7", "--continue") == 0
    said = capsys.readouterr().out.splitlines()
    assert said[:4] == ["continuing under a changed plan (seed: 0 -> 7)",
                        "ctx512: finished under the old plan; kept and skipped",
                        "ctx1k: resumes from its checkpoint step_00000002 with the new settings",
                        "sft: starts from the beginning"]
    assert '"seed": 7' in (out / "plan.json").read_text()
    assert RunDir(out).stage("ctx512").finished() and shard.read_bytes() == b"weights"


def test_fresh_moves_the_old_run_aside_and_deletes_nothing(tmp_path, capsys):
    out, shard = half_done_run(tmp_path)
    assert render(out, "--set", "seed=7", "--fresh") == 0
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert f"started over: the old run dir is now {old} (nothing was deleted)" in capsys.readouterr().out
    assert (old / shard.relative_to(out)).read_bytes() == b"weights" and '"seed": 0' in (old / "plan.json").read_text()
    assert '"seed": 7' in (out / "plan.json").read_text() and not RunDir(out).stage("ctx512").done.exists()
    assert not RunDir(out).stage("ctx1k").checkpoints.exists()


def test_a_change_of_cluster_shape_resumes_without_a_flag(tmp_path, capsys):
    out, shard = half_done_run(tmp_path)
    capsys.readouterr()
    assert render(out, "--set", "cluster.procs_per_node=1") == 0
    said = capsys.readouterr().out.splitlines()
    assert said[:2] == ["the plan changed only where it runs (cluster.procs_per_node: 2 -> 1): the run goes on "
                        "from where it was", "ctx512: finished under the old plan; kept and skipped"]
    assert '"procs_per_node": 1' in (out / "plan.json").read_text() and shard.read_bytes() == b"weights"


def test_force_is_gone_and_says_which_flag_to_use(tmp_path, capsys):
    out, _ = half_done_run(tmp_path)
    assert render(out, "--set", "seed=7", "--force") == 2
    assert "--force is gone" in capsys.readouterr().err and '"seed": 0' in (out / "plan.json").read_text()
