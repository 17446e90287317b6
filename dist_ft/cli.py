"""`dist-ft` command line: plan, prepare, render, launch (launcher side) and train (rank side)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from dist_ft.launcher.artifacts import RunDirConflict, render_files, write_run_dir
from dist_ft.launcher.local_launch import run_stages
from dist_ft.launcher.slurm import needs_prepare_job
from dist_ft.plan.plan import Plan
from dist_ft.plan.plan_report import format_plan
from dist_ft.plan.plan_recipe import plan_recipe
from dist_ft.plan.preflight import host_memory_gib
from dist_ft.plan.run_dir import RunDir
from dist_ft.recipe.config import apply_overrides
from dist_ft.recipe.launch_script import training_python
from dist_ft.recipe.recipe_yaml import read_recipe
from dist_ft.recipe.strict import Problem, RecipeError

EXIT_BAD_INPUT = 2
NAME_MAX, PATH_MAX = 255, 4096  # bytes per path component and per path on Linux file systems


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, RunDirConflict) as err:
        if getattr(args, "debug", False):
            traceback.print_exc()
        _report_error(err, getattr(args, "recipe", None))
        return EXIT_BAD_INPUT


def _report_error(err: Exception, recipe: str | None) -> None:
    if isinstance(err, RecipeError):
        where = f"recipe {recipe}" if recipe else "the recipe"
        print(f"error: {where} has {len(err.problems)} problem(s); nothing was written or submitted.",
              file=sys.stderr)
        for problem in err.problems:
            print("  " + str(problem).replace("\n", "\n  "), file=sys.stderr)
    else:
        print(f"error: {err}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-ft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("recipe", help="YAML recipe, e.g. launch/demo.yaml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set cluster.nodes=4 (repeatable)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        return p

    p = recipe_command("plan", "validate a recipe and print the resolved plan")
    p.add_argument("--json", action="store_true", help="print plan.json instead of the table")
    p.set_defaults(func=cmd_plan)

    p = recipe_command("prepare", "tokenize every data source of every stage once into token stores (data.cache_dir) "
                                  "that the ranks memory-map; reuses stores that exist")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: the usable cores)")
    p.add_argument("--out", help="run dir, as for launch (only where the error messages point)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_prepare)

    p = recipe_command("render", "write the run dir (plan, DeepSpeed configs, sbatch scripts); submit nothing")
    p.add_argument("--out", help="run dir (default: checkpointing.output_root/name)")
    _intent_flags(p)
    p.set_defaults(func=cmd_render)

    p = recipe_command("launch", "render, then run locally with torchrun or submit to SLURM")
    p.add_argument("--backend", choices=("local", "slurm", "ssh"), default="local",
                   help="local: this machine; slurm: sbatch per stage; ssh: one torchrun per host of "
                        "cluster.hostfile / cluster.hosts")
    p.add_argument("--dry-run", action="store_true", help="render and print the commands; run nothing")
    p.add_argument("--out", help="run dir (default: checkpointing.output_root/name)")
    _intent_flags(p)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("status", help="each stage of a run: job state or hosts, restarts, DONE, last metrics, "
                                                "stale rank heartbeats")
    p.add_argument("run_dir", help="run dir written by render/launch")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="scancel the run's pending or running jobs; for ssh runs, stop every "
                                                "host's ranks (they checkpoint first)")
    p.add_argument("run_dir", help="run dir written by render/launch")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("train", help="(per rank) train one stage of a rendered run")
    p.add_argument("--run-dir", "--run", dest="run", required=True, help="run dir written by render/launch")
    p.add_argument("--stage", required=True)
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="after training: fold a stage's adapter into its base (--merge)")
    p.add_argument("run_dir", help="run dir written by render/launch")
    p.add_argument("--stage", help="the stage (default: the last finished fine-tuning stage)")
    p.add_argument("--merge", action="store_true", required=True,
                   help="write a full model: base + adapter, RoPE scaling in config.json")
    p.add_argument("--out", help="where to write it (default: RUN/stages/STAGE/export/merged)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample an export (model, adapter, run dir) with transformers' generate")
    from dist_ft.evaluation.generate import add_arguments as add_generate_arguments
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity by position at long context lengths, and passkey retrieval")
    from dist_ft.evaluation.evaluate import add_arguments as add_eval_arguments
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)
    return parser


def _load_plan(args: argparse.Namespace) -> tuple[object, Plan]:
    recipe_path = Path(args.recipe)
    raw = apply_overrides(read_recipe(recipe_path), args.overrides)
    out = getattr(args, "out", None)

    def run_dir_of(recipe) -> str:
        run_dir = Path(out) if out else Path(recipe.checkpointing.output_root) / recipe.name
        if not all(ch.isprintable() for ch in str(run_dir)):
            raise RecipeError([Problem("--out", "the run dir path contains a control character",
                                       "use a plain path")])
        _check_run_dir_path(run_dir, "--out" if out else "checkpointing.output_root")
        return str(run_dir.resolve())

    return plan_recipe(raw, recipe_path.resolve().parent, run_dir_of, host_memory_gib())


def _check_run_dir_path(run_dir: Path, field: str) -> None:
    """A run dir the file system can create, refused before planning rather than half-written later."""
    too_long = [part for part in run_dir.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long or len(os.fsencode(str(run_dir))) > PATH_MAX:
        what = f"a part of the run dir path is longer than {NAME_MAX} bytes" if too_long else \
            f"the run dir path is longer than {PATH_MAX} bytes"
        raise RecipeError([Problem(field, what, "use a shorter path")])
    for folder in (run_dir, *run_dir.parents):
        if os.path.exists(folder) and not os.path.isdir(folder):  # os.path never raises (no permission)
            raise RecipeError([Problem(field, f"{folder} is a file, not a folder", "give a folder for the run dir")])


def cmd_plan(args: argparse.Namespace) -> int:
    _, plan = _load_plan(args)
    if args.json:
        print(plan.to_json())
        return 0
    from dist_ft.launcher.prepare import data_budget

    print(format_plan(plan, training_python(plan.cluster.python)) + "\n" + "\n".join(data_budget(plan)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import json

    from dist_ft.launcher.prepare import format_summary, load_plan_tokenizer, prepare
    from dist_ft.store import DataError

    _, plan = _load_plan(args)
    if not _fetch_hub_model(plan):
        return EXIT_BAD_INPUT
    _, plan = _load_plan(args)  # a fetched model is now planned from its local snapshot
    try:
        summary = prepare(plan, load_plan_tokenizer(plan), workers=args.workers)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


def _fetch_hub_model(plan: Plan) -> bool:
    """`prepare` is the one command that may touch the network: a hub model the cache lacks is fetched here."""
    from dist_ft.plan.hub_model import fetch, looks_like_hub_id

    name = plan.model.name_or_path
    if not looks_like_hub_id(name):
        return True
    try:
        print(f"model {name}: {fetch(name, plan.model.revision)}", flush=True)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return False
    return True


def _intent_flags(p: argparse.ArgumentParser) -> None:
    """What to do with a run dir that holds a different plan (launcher/run_changes.py); a change of
    `cluster` alone (nodes, GPUs, ranks) needs neither flag."""
    intent = p.add_mutually_exclusive_group()
    intent.add_argument("--continue", dest="intent", action="store_const", const="continue",
                        help="keep the finished stages and resume the others from their checkpoints under the "
                             "changed plan")
    intent.add_argument("--fresh", dest="intent", action="store_const", const="fresh",
                        help="start over: the old run dir is moved aside (RUN.replaced-DATE), nothing is deleted")
    intent.add_argument("--force", dest="intent", action="store_const", const="force", help=argparse.SUPPRESS)


def _write(plan: Plan, files: dict[str, str], intent: str | None) -> None:
    if intent == "force":
        raise RunDirConflict("--force is gone: it kept finished stages and checkpoints without saying so. Choose "
                             "--continue (keep them, resume under the changed plan) or --fresh (start over; the old "
                             "run dir is moved aside)")
    for note in write_run_dir(Path(plan.run_dir), files, intent=intent, access=plan.checkpointing.run_dir_access,
                               stages=tuple(stage.name for stage in plan.stages)):
        print(note)


def cmd_render(args: argparse.Namespace) -> int:
    recipe, plan = _load_plan(args)
    files = render_files(recipe, plan, training_python(plan.cluster.python))
    _write(plan, files, args.intent)
    print(f"wrote {plan.run_dir}: " + ", ".join(sorted(files)))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    recipe, plan = _load_plan(args)
    if args.backend == "local" and plan.nodes > 1:
        raise RecipeError([Problem("cluster.nodes", f"the local backend runs one node, the recipe asks for "
                                    f"{plan.nodes}", "use --backend slurm or ssh, or --set cluster.nodes=1")])
    if args.backend == "ssh" and not plan.cluster.hosts:
        raise RecipeError([Problem("cluster.hosts", "the ssh backend needs the hosts to run on",
                                   "set cluster.hostfile (`HOST slots=N` per line) or cluster.hosts: [a, b]")])
    python = training_python(plan.cluster.python)  # once: the scripts written and the stages run agree
    files = render_files(recipe, plan, python)
    if args.dry_run:  # nothing written: a second dry run with other settings must not meet this one's plan
        print(f"dry run: nothing written; the run dir would be {plan.run_dir} (`dist-ft render` writes it)")
    else:
        _write(plan, files, args.intent)
        print(f"run dir: {plan.run_dir}")
    in_a_job = args.backend == "slurm" and needs_prepare_job(plan)  # data.prepare: job: prepare.sbatch does it
    if not args.dry_run and not in_a_job:  # ranks never tokenize: build the missing stores here
        from dist_ft.launcher.prepare import ensure_prepared
        from dist_ft.store import DataError

        try:
            ensure_prepared(plan)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.backend == "slurm":
        from dist_ft.launcher.slurm_jobs import submit_stages

        return submit_stages(plan, dry_run=args.dry_run)
    return _run_local(plan, python, dry_run=args.dry_run, backend=args.backend)


def _run_local(plan: Plan, python: str, dry_run: bool, backend: str = "local") -> int:
    if backend == "ssh":
        from dist_ft.launcher.ssh_launch import run_stages_ssh

        status = run_stages_ssh(plan, python, dry_run)
    else:
        status = run_stages(plan, python, dry_run)
    if status == 0 and not dry_run:
        from dist_ft.launcher.summary import pipeline_summary

        print(pipeline_summary(plan))
    return status


def cmd_status(args: argparse.Namespace) -> int:
    """The run's stages (SLURM jobs, or the ssh backend's hosts), then the heartbeats of every rank of an
    unfinished stage, stale ones flagged, whatever the backend."""
    from dist_ft.launcher.heartbeat_status import heartbeat_report
    from dist_ft.launcher.slurm_jobs import load_run, run_status
    from dist_ft.launcher.ssh_control import is_ssh_run, print_ssh_status

    def status(run_dir: Path) -> int:
        plan, _ = load_run(run_dir)
        code = print_ssh_status(run_dir, plan) if is_ssh_run(run_dir) else run_status(run_dir)
        unfinished = [s.name for s in plan.stages if not RunDir(run_dir).stage(s.name).finished()]
        lines = heartbeat_report(run_dir, unfinished)
        if lines:
            print("\n".join(lines))
        return code

    return _on_run_dir(status, args.run_dir)


def cmd_cancel(args: argparse.Namespace) -> int:
    from dist_ft.launcher.slurm_jobs import load_run, run_cancel
    from dist_ft.launcher.ssh_control import is_ssh_run, ssh_cancel

    def cancel(run_dir: Path) -> int:
        if is_ssh_run(run_dir):
            return ssh_cancel(run_dir, load_run(run_dir)[0])
        return run_cancel(run_dir)

    return _on_run_dir(cancel, args.run_dir)


def _on_run_dir(action, run_dir: str) -> int:
    from dist_ft.launcher.slurm_jobs import NotARunDir

    try:
        return action(Path(run_dir))
    except NotARunDir as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def cmd_train(args: argparse.Namespace) -> int:
    plan = Plan.from_json(RunDir(Path(args.run)).plan_file.read_text())
    stage = plan.stage(args.stage)
    _quiet_libraries(plan.device == "cuda")
    from dist_ft.rank.engine import shutdown_distributed
    from dist_ft.rank.trainer import train_stage

    status = train_stage(plan, stage)
    shutdown_distributed()  # only after a clean return: a rank that raised must not wait on the others
    return status


def cmd_export(args: argparse.Namespace) -> int:
    run = RunDir(Path(args.run_dir))
    if not run.plan_file.is_file():
        print(f"error: {args.run_dir} is not a run dir (no {run.plan_file.name}); give the folder "
              "`dist-ft launch` wrote", file=sys.stderr)
        return EXIT_BAD_INPUT
    plan = Plan.from_json(run.plan_file.read_text())
    stage = _stage_to_export(plan, args.stage)
    if stage is None:
        return EXIT_BAD_INPUT
    _quiet_libraries(False)
    from dist_ft.rank.stage_model import merge_stage_adapter

    out = merge_stage_adapter(plan, stage, Path(args.out) if args.out else plan.run.stage(stage.name).merged)
    print(f"[{stage.name}] merged {plan.run.stage(stage.name).adapter} into its base: {out}")
    return 0


def _stage_to_export(plan: Plan, name: str | None):
    """The named stage, or the last finished one that trained an adapter; None after saying why."""
    if name is not None:
        known = [s.name for s in plan.stages]
        if name not in known:
            print(f"error: no stage {name!r} in this run; its stages: {', '.join(known)}", file=sys.stderr)
            return None
        return plan.stage(name)
    finished = [s for s in plan.stages if (plan.run.stage(s.name).adapter / "adapter_config.json").is_file()]
    if not finished:
        print("error: no stage of this run has an adapter to merge yet (finished LoRA-family stages have "
              "stages/STAGE/export/adapter)", file=sys.stderr)
        return None
    return finished[-1]


def cmd_generate(args: argparse.Namespace) -> int:
    from dist_ft.evaluation.generate import main_from_args

    return main_from_args(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from dist_ft.evaluation.evaluate import main_from_args

    return main_from_args(args)


def _quiet_libraries(cuda: bool) -> None:
    """Keep rank logs to what a person needs: library deprecation chatter is not it."""
    import logging
    import warnings

    from dist_ft.rank.distributed import quiet_process_env

    quiet_process_env(cuda)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
