"""One typed contract from recipe to rank: plan.json comes back as the recipe's own sections, every
derived batch number has one source, and the pure plan stays apart from the CLI and eval."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ft.plan import batching
from dist_ft.rank import trainer
from dist_ft.cli import main
from dist_ft.recipe.config import Checkpointing, Cluster, Data, MethodOptions, Model, Parallelism, Tracking
from dist_ft.launcher.deepspeed_config import render_ds_config
from dist_ft.rank.distributed import read_env
from dist_ft.recipe.model_shape import ModelShape
from dist_ft.plan.plan import Plan
from dist_ft.rank.stage_data import load_stage_data
from dist_ft.rank.stage_model import stage_tokenizer
from tests.conftest import LAUNCH, ROOT
from tests.unit.test_plan import plan_of

PACKAGE = ROOT / "dist_ft"


def test_plan_json_round_trips_to_the_recipes_typed_sections():
    plan = plan_of(["evaluation.after_each_stage=true", "parallelism.sequence_parallel=2",
                    "cluster.procs_per_node=2"])
    again = Plan.from_json(plan.to_json())
    assert again == plan
    sections = (again.model, again.cluster, again.parallelism, again.tracking, again.checkpointing)
    assert [type(s) for s in sections] == [Model, Cluster, Parallelism, Tracking, Checkpointing]
    assert isinstance(again.model_shape, ModelShape)
    sft = again.stage("sft")
    assert isinstance(sft.data, Data) and isinstance(sft.method_options, MethodOptions)
    assert (again.dp, again.sp, again.world_size) == (1, 2, 2)


def test_plan_json_is_read_by_the_recipes_strict_loader():
    raw = json.loads(plan_of().to_json())
    raw["model"]["dtyp"] = raw["model"].pop("dtype")
    raw["cluster"]["nodes"] = 0
    with pytest.raises(ValueError) as err:
        Plan.from_json(json.dumps(raw))
    assert "model.dtyp: unknown key" in str(err.value) and "did you mean `dtype`" in str(err.value)
    assert "cluster.nodes: must be >= 1" in str(err.value)


def test_a_plan_of_another_version_asks_for_a_re_render():
    raw = json.loads(plan_of().to_json())
    with pytest.raises(ValueError, match="re-render the run dir"):
        Plan.from_json(json.dumps({**raw, "version": 1}))


@pytest.fixture
def spied(monkeypatch):
    """Which modules call each batching function (they must reach it as `batching.NAME`)."""
    callers: dict[str, set[str]] = {}
    for name in ("data_parallel_size", "data_parallel_rank", "train_batch_size", "exact_grad_accum", "steps_per_epoch",
                 "rank_batch"):
        real = getattr(batching, name)

        def spy(*args, _real=real, _name=name):
            callers.setdefault(_name, set()).add(sys._getframe(1).f_globals["__name__"])
            return _real(*args)

        monkeypatch.setattr(batching, name, spy)
    return callers


def test_plan_deepspeed_config_data_and_world_size_change_share_one_batch_arithmetic(tmp_path, spied, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((LAUNCH / "demo.yaml").read_text().replace("[data/", f"[{LAUNCH}/data/"))
    args = [str(recipe), "--out", str(tmp_path / "run"), "--set", "cluster.procs_per_node=2",
            "--set", f"checkpointing.output_root={tmp_path}"]
    assert main(["render", *args]) == 0 and main(["prepare", *args, "--workers", "1"]) == 0
    plan = Plan.from_json((tmp_path / "run" / "plan.json").read_text())
    stage = plan.stage("sft")
    cfg = render_ds_config(plan, stage)
    batch = trainer._rank_batch(plan, stage, read_env({"RANK": "1", "WORLD_SIZE": "2"}, cuda_available=False))
    data = load_stage_data(plan, stage, batch, stage_tokenizer(plan))
    one_rank = trainer._rank_batch(plan, stage, read_env({}, cuda_available=False))
    resumed = trainer._ds_config(plan, stage, one_rank)
    assert trainer._ds_config(plan, stage, batch) == cfg  # the planned world: the rendered numbers
    assert (batch.dp_rank, batch.dp, data.train.rows_per_step) == (1, 2, 2 * cfg["train_micro_batch_size_per_gpu"])
    assert resumed["train_batch_size"] == cfg["train_batch_size"] == stage.global_batch_size
    assert resumed["gradient_accumulation_steps"] == 2 * cfg["gradient_accumulation_steps"] == 2 * batch.accum
    assert "world size 1 differs from the plan's 2" in capsys.readouterr().out
    assert spied["data_parallel_size"] == {"dist_ft.plan.plan", "dist_ft.plan.micro_batch", "dist_ft.plan.batching"}
    assert {"dist_ft.plan.micro_batch", "dist_ft.launcher.deepspeed_config", "dist_ft.plan.batching",
            "dist_ft.rank.data.batches"} <= spied["train_batch_size"]
    assert spied["rank_batch"] == {"dist_ft.plan.plan"}  # Plan.rank_batch, which the trainer calls
    assert spied["data_parallel_rank"] == spied["exact_grad_accum"] == {"dist_ft.plan.batching"}
    assert spied["steps_per_epoch"] == {"dist_ft.rank.stage_data"}


def test_a_rank_batch_keeps_the_global_batch_on_any_world_that_can():
    assert batching.rank_batch(2, 16, world_size=4, rank=3, sequence_parallel=1) == batching.RankBatch(2, 2, 4, 3)
    assert batching.rank_batch(2, 16, world_size=4, rank=3, sequence_parallel=2) == batching.RankBatch(2, 4, 2, 1)
    assert batching.RankBatch(2, 4, 2, 1).global_batch == 16
    for world, sp in ((3, 1), (16, 1), (3, 2)):  # 16 is not 2 x 3 x accum; 32 ranks of 2 overshoot; sp splits no 3
        with pytest.raises(ValueError, match=f"world size {world} cannot keep the planned 16 sequences"):
            batching.rank_batch(2, 16, world_size=world, rank=0, sequence_parallel=sp)


def test_ranks_take_micro_batch_accumulation_and_zero_stage_from_the_plan_not_the_deepspeed_dict():
    """The rendered DeepSpeed dict is written once (trainer._ds_config); no rank module reads a batch number or
    the ZeRO stage back out of it (engine.py checks the dict's own reduce_scatter against its stage)."""
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "stage")
    allowed = {'dist_ft/rank/engine.py: zero["stage"]'}
    found = []
    for path in sorted((PACKAGE / "rank").rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in keys \
                    and isinstance(node.ctx, ast.Load) and \
                    f"{path.relative_to(ROOT)}: {ast.get_source_segment(source, node)}" not in allowed:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.get_source_segment(source, node)}")
    assert found == []


BATCH_WORDS = ("world_size", "micro_batch_size", "grad_accum", "gradient_accumulation", "dp_size", "global_batch")
# Products and quotients of those names that are other numbers: a loss mean, DeepSpeed's gradient factor.
NOT_BATCH_ARITHMETIC = {("loop.py", "total / grad_accum"), ("engine.py", "torch.distributed.get_world_size()")}


def test_no_module_but_batching_computes_batch_numbers():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.FloorDiv, ast.Mult, ast.Div)):
                text = ast.get_source_segment(source, node)
                if any(word in text for word in BATCH_WORDS) and path.name != "batching.py" and \
                        not any(path.name == name and part in text for name, part in NOT_BATCH_ARITHMETIC):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
    assert found == []


# ---- imports ------------------------------------------------------------------------------------

CLI_AND_EVAL = ("dist_ft.cli", "dist_ft.evaluation.evaluate", "dist_ft.evaluation.eval_model",
                "dist_ft.evaluation.eval_nll", "dist_ft.evaluation.eval_report", "dist_ft.evaluation.generate",
                "dist_ft.rank.trainer", "dist_ft.rank.engine")


def test_the_pure_plan_imports_no_cli_eval_or_rank_module():
    code = "import sys, dist_ft.plan.plan; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                cwd=ROOT).stdout.split())
    assert "dist_ft.plan.plan" in loaded
    assert loaded.isdisjoint(CLI_AND_EVAL) and loaded.isdisjoint({"torch", "deepspeed", "transformers"})


def module_imports() -> dict[str, set[str]]:
    """{module: package modules it imports at import time (type-checking imports included)}."""
    modules = {_name(p): p for p in PACKAGE.rglob("*.py") if not {"ds_configs", "slurm_templates"} & set(p.parts)}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        top += [n for block in tree.body if isinstance(block, ast.If) for n in ast.walk(block)
                if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = {t for n in top for t in _targets(name, path, n) if t in modules and t != name}
    return graph


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(module: str, path: Path, node) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
    target = ".".join(base + ([node.module] if node.module else []))
    return [target, *(f"{target}.{alias.name}" for alias in node.names)]


def test_no_import_cycles():
    graph = module_imports()
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert cycles == []



def test_the_recipe_and_the_plan_import_only_down_the_flow():
    """recipe/ imports nothing else from dist_ft; plan/ imports only recipe/ (launcher, ranks and evaluation
    build on both, never the other way)."""
    allowed = {"dist_ft.recipe": ("dist_ft.recipe",), "dist_ft.plan": ("dist_ft.recipe", "dist_ft.plan")}
    found = [f"{module} imports {target}" for module, targets in sorted(module_imports().items())
             for side, ok in allowed.items() if module.startswith(side + ".") or module == side
             for target in sorted(targets) if target != "dist_ft" and not target.startswith(ok)]
    assert found == []

def test_the_token_store_sits_below_the_launcher_and_the_ranks():
    """dist_ft.store (which `dist-ft prepare` writes and the ranks read) imports only recipe/, durable.py and
    itself: neither side it serves, nor the plan, CLI or evaluation."""
    ok = ("dist_ft.store", "dist_ft.recipe", "dist_ft.durable")
    found = [f"{module} imports {target}" for module, targets in sorted(module_imports().items())
             if module.startswith("dist_ft.store") for target in sorted(targets)
             if target != "dist_ft" and not target.startswith(ok)]
    assert found == []
    graph = module_imports()
    assert "dist_ft.store" in graph["dist_ft.launcher.prepare"] and "dist_ft.store" in graph["dist_ft.rank.stage_data"]


LAYOUT_NAMES = {"plan.json", "jobs.json", "stages", "DONE", "export", "adapter", "merged", "checkpoints", "universal",
                "control", "logs", "eval", "ranks", "metrics.jsonl", "loss.png", "data_cache", "wandb", "heartbeats",
                "nodes", "ssh.json", "ssh.token"}


def test_only_run_dir_spells_the_run_dir_layout():
    """Every path of a run dir comes from run_dir.RunDir / StageDir (`folder / "DONE"` nowhere else)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "run_dir.py":
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and \
                    isinstance(node.right, ast.Constant) and node.right.value in LAYOUT_NAMES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.get_source_segment(source, node)}")
    assert found == []


# Folders whose file names their own module owns, not RunDir: token stores (store/format.py, and prepare's
# summary beside them) and checkpoint tags (rank/checkpoint.py).
OWN_LAYOUT = ("dist_ft/store/", "dist_ft/launcher/prepare.py", "dist_ft/rank/checkpoint.py")
# A run dir file's name spelled in a string: a log (`.log`, `.out`, `.attempt`), a node record or heartbeat file.
RUN_DIR_FILE_NAME = re.compile(r"\.(log|out)\b|\.attempt|\.node[{*]|rank[{*]|heartbeats/")


def test_only_run_dir_builds_run_dir_file_names():
    """No `folder / f"..."` path part, no glob or string spelling a log, heartbeat or node-record name outside
    run_dir.py (the sbatch template gets its attempt log rendered in)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(ROOT))
        if path.name == "run_dir.py" or where.startswith(OWN_LAYOUT):
            continue
        source = path.read_text()
        tree = ast.parse(source)
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.JoinedStr):
                found.append(f"{where}:{node.lineno}: {ast.get_source_segment(source, node)}")
            elif id(node) not in docstrings and RUN_DIR_FILE_NAME.search(_literal_text(node)):
                found.append(f"{where}:{node.lineno}: {ast.get_source_segment(source, node)}")
    template = (PACKAGE / "slurm_templates" / "stage.sbatch.tmpl").read_text()
    assert not RUN_DIR_FILE_NAME.search(template) and "attempt_log=@@ATTEMPT_LOG@@" in template
    assert found == []


def _literal_text(node) -> str:
    """A string's text, an f-string's with `{}` for each value it formats; '' for anything else."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else ""
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return ""


def test_the_training_interpreter_is_resolved_by_the_commands_alone():
    """`training_python` runs in cli.py, once per command; renderers and launchers take the result."""
    callers = sorted(str(path.relative_to(ROOT)) for path in PACKAGE.rglob("*.py")
                     for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "training_python")
    assert callers == ["dist_ft/cli.py"] * 3
