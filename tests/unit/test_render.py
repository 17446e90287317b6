"""Every shipped recipe plans and renders; DeepSpeed's own parser accepts every config;
every sbatch passes `bash -n` and runs against stand-in srun/scontrol/torchrun."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from dist_ft.cli import main
from dist_ft.deepspeed_config import find_auto
from dist_ft.plan import Plan
from tests.conftest import RECIPES


@pytest.fixture(params=RECIPES, ids=lambda p: p.stem)
def rendered(request, tmp_path):
    out = tmp_path / "run"
    assert main(["render", str(request.param), "--out", str(out)]) == 0
    return out


def test_render_writes_every_artifact(rendered):
    plan = Plan.from_json((rendered / "plan.json").read_text())
    names = {p.name for p in rendered.iterdir()}
    assert {"plan.json", "recipe.resolved.yaml", "local.sh"} <= names
    for stage in plan.stages:
        assert stage.ds_config in names and stage.sbatch in names


def test_deepspeed_accepts_every_config(rendered, monkeypatch):
    from deepspeed.runtime import config as ds_config

    plan = Plan.from_json((rendered / "plan.json").read_text())
    # The parser asks torch.distributed for the rank; no process group is needed to check a config.
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda: 0)
    for stage in plan.stages:
        cfg = json.loads((rendered / stage.ds_config).read_text())
        assert find_auto(cfg) == []
        parsed = ds_config.DeepSpeedConfig(cfg, mpu=_DataParallel(plan.dp))
        assert parsed.train_batch_size == stage.micro_batch_size * stage.grad_accum * plan.dp
        assert parsed.zero_optimization_stage == stage.zero_stage
        if stage.zero_stage == 3:
            assert parsed.zero_config.gather_16bit_weights_on_model_save


class _DataParallel:
    def __init__(self, dp):
        self.dp = dp

    def get_data_parallel_world_size(self):
        return self.dp


def test_every_sbatch_is_valid_bash_with_real_sbatch_values(rendered):
    for script in rendered.glob("*.sbatch"):
        subprocess.run(["bash", "-n", str(script)], check=True)
        directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
        assert not [d for d in directives if "$" in d], "never $VAR in #SBATCH: it does not expand"
        assert any(d.startswith("#SBATCH --nodes=") for d in directives)


def test_rendering_twice_is_harmless_and_a_different_plan_is_refused(tmp_path):
    recipe = RECIPES[0]
    out = tmp_path / "run"
    assert main(["render", str(recipe), "--out", str(out)]) == 0
    assert main(["render", str(recipe), "--out", str(out)]) == 0
    assert main(["render", str(recipe), "--out", str(out), "--set", "seed=7"]) == 2
    assert main(["render", str(recipe), "--out", str(out), "--set", "seed=7", "--force"]) == 0


def test_launch_dry_run_prints_commands_for_both_backends(tmp_path, capsys):
    demo = next(r for r in RECIPES if r.stem == "demo")
    assert main(["launch", str(demo), "--dry-run", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run" in out and "--nproc_per_node=2" in out and "--stage sft" in out
    assert main(["launch", str(demo), "--backend", "slurm", "--dry-run", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "sbatch --parsable" in out and "--dependency=afterok:" in out
    assert not (tmp_path / "b" / "jobs.json").exists()


# ---- the sbatch script executed against stand-ins -----------------------------------------

STANDINS = {
    "scontrol": """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node1; echo node2 ;;
  "show node") echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=10.0.0.1 NodeHostName=$3" ;;
  *) echo "$@" >> "$STANDIN_LOG/scontrol.calls" ;;
esac
""",
    "srun": """#!/bin/bash
echo "$@" > "$STANDIN_LOG/srun.args"
while [[ "$1" == --* ]]; do shift; done
exec "$@"
""",
    "torchrun": """#!/bin/bash
printf '%s\\n' "$@" > "$STANDIN_LOG/torchrun.args"
env > "$STANDIN_LOG/torchrun.env"
""",
}


def run_sbatch(script: Path, tmp: Path, extra_env=None) -> subprocess.CompletedProcess:
    bin_dir, log = tmp / "bin", tmp / "log"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    for name, body in STANDINS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp), "STANDIN_LOG": str(log),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
           **(extra_env or {})}
    return subprocess.run(["bash", str(script)], env=env, cwd=tmp, capture_output=True, text=True, timeout=60)


def test_sbatch_runs_one_torchrun_per_node_with_c10d_on_the_head(tmp_path):
    demo = next(r for r in RECIPES if r.stem == "demo")
    out = tmp_path / "run"
    assert main(["render", str(demo), "--out", str(out), "--set", "cluster.nodes=2"]) == 0
    result = run_sbatch(out / "ctx512.sbatch", tmp_path)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "log" / "torchrun.args").read_text().split("\n")
    assert "--nnodes=2" in args and "--nproc_per_node=2" in args
    assert "--rdzv_endpoint=10.0.0.1:29500" in args and "--rdzv_id=4242" in args
    assert args[args.index("--run-dir") + 1] == str(out) and args[args.index("--stage") + 1] == "ctx512"
    srun = (tmp_path / "log" / "srun.args").read_text()
    assert "--ntasks-per-node=1" in srun and "--nodes=2" in srun


NASTY = "x$(touch PWNED)`touch PWNED2`'\";touch PWNED3 &&"


def test_recipe_strings_with_shell_syntax_execute_nothing(tmp_path, recipe_file):
    from tests.conftest import demo_raw

    raw = demo_raw()
    raw["cluster"]["env"] = {"NASTY": NASTY, "SPACES": "a b  c"}
    raw["cluster"]["partition"] = NASTY
    raw["cluster"]["account"] = "my account"
    out = tmp_path / f"run dir {NASTY}"
    path = recipe_file(raw)
    assert main(["render", str(path), "--out", str(out)]) == 0
    script = out / "ctx512.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert '#SBATCH --account="my account"' in text
    result = run_sbatch(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("PWNED*")), "a recipe string was executed"
    env = (tmp_path / "log" / "torchrun.env").read_text()
    assert f"NASTY={NASTY}" in env and "SPACES=a b  c" in env
    args = (tmp_path / "log" / "torchrun.args").read_text().split("\n")
    assert args[args.index("--run-dir") + 1] == str(out)


def test_a_finished_stage_is_not_run_again(tmp_path):
    demo = next(r for r in RECIPES if r.stem == "demo")
    out = tmp_path / "run"
    assert main(["render", str(demo), "--out", str(out)]) == 0
    (out / "stages" / "ctx512").mkdir(parents=True)
    (out / "stages" / "ctx512" / "DONE").write_text("")
    result = run_sbatch(out / "ctx512.sbatch", tmp_path)
    assert result.returncode == 0 and "already complete" in result.stdout
    assert not (tmp_path / "log" / "torchrun.args").exists()


def test_too_many_restarts_stop_with_a_clear_message(tmp_path):
    demo = next(r for r in RECIPES if r.stem == "demo")
    out = tmp_path / "run"
    assert main(["render", str(demo), "--out", str(out), "--set", "cluster.max_restarts=2"]) == 0
    result = run_sbatch(out / "ctx512.sbatch", tmp_path, {"SLURM_RESTART_COUNT": "3"})
    assert result.returncode == 3 and "giving up" in result.stderr


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_launch_dry_run_works_for_every_recipe(recipe, tmp_path, capsys):
    import yaml

    assert main(["launch", str(recipe), "--backend", "slurm", "--dry-run", "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.count("sbatch --parsable") == len(Plan.from_json(
        (tmp_path / "s" / "plan.json").read_text()).stages)
    single_node = yaml.safe_load(recipe.read_text()).get("cluster", {}).get("nodes", 1) == 1
    expected = 0 if single_node else 2  # the local backend refuses several nodes, with the reason
    assert main(["launch", str(recipe), "--dry-run", "--out", str(tmp_path / "l")]) == expected
