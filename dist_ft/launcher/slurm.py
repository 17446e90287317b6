"""Render one sbatch script per stage. Pure apart from reading the template.

Two kinds of recipe text reach the script: #SBATCH values (comments to bash;
sbatch parses them, honouring double quotes) and shell values (always
`shlex.quote`d). Line breaks are rejected by the recipe before we get here, so
no value can start a line of its own.

What real sbatch does with an #SBATCH line (slurm 22.05, checked by
tests/integration/test_slurm_launcher.py): whitespace ends a value unless
quoted; "..." and '...' group; inside either a backslash escapes the next
character (in '...' too, unlike bash); an unquoted `#` starts a comment; `$` and
backticks are not expanded. Only the --output path is read once more (`output_path`).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from dist_ft.plan.plan import Plan, StagePlan
from dist_ft.plan.run_dir import RunDir
from dist_ft.rank.distributed import RDZV_PORT_BASE, RDZV_PORT_SPAN
from dist_ft.recipe.launch_script import omp_threads_line, training_python
from .assets import asset

_PLAIN = re.compile(r"^[A-Za-z0-9_.,:@%/+=-]+$")


def sbatch_value(value: str) -> str:
    """A value sbatch reads back verbatim from an #SBATCH line."""
    if "\n" in value or "\r" in value:
        raise ValueError(f"{value!r}: an #SBATCH value cannot contain a line break")
    if _PLAIN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def output_path(run_dir: str, stage: str) -> str:
    """The --output file of a stage, with `run_dir` taken literally.

    SLURM expands %j (job id) and reads `%%` as `%` in the path, except when the
    path holds a backslash: then it expands nothing and only drops one level of
    backslash escapes. Such a run dir gets one output file for all the stage's jobs.
    """
    logs = str(RunDir(Path(run_dir)).logs)
    if "\\" in run_dir:
        return f"{logs}/{stage}.out".replace("\\", "\\\\")
    return f"{logs.replace('%', '%%')}/{stage}.%j.out"


def job_name(plan: Plan, stage: StagePlan) -> str:
    return f"{plan.cluster.job_name or plan.name}-{stage.name}"


def sbatch_directives(plan: Plan, stage: StagePlan) -> list[tuple[str, str | None]]:
    c = plan.cluster
    items: list[tuple[str, str | None]] = [
        ("job-name", job_name(plan, stage)),
        ("nodes", str(plan.nodes)),
        ("ntasks-per-node", "1"),
    ]
    if c.gpus_per_node:
        items.append(("gpus-per-node", str(c.gpus_per_node)))
    # CPU ranks ask for a core each at least (SLURM's default is one per task, here one task per node)
    cpus = c.cpus_per_task if c.cpus_per_task or c.gpus_per_node else c.procs_per_node
    optional = {"cpus-per-task": cpus, "partition": c.partition, "account": c.account, "qos": c.qos,
                "time": _time(c.time_limit), "constraint": c.constraint, "mem": c.mem}
    items += [(k, str(v)) for k, v in optional.items() if v is not None]
    if c.exclusive:
        items.append(("exclusive", None))
    items += [
        ("signal", f"B:USR1@{c.signal_grace_s}"),
        ("requeue" if c.requeue else "no-requeue", None),
        ("open-mode", "append"),
        ("output", output_path(plan.run_dir, stage.name)),
    ]
    return items


def render_sbatch(plan: Plan, stage: StagePlan, template: str | None = None) -> str:
    text = template if template is not None else load_template()
    c = plan.cluster
    lines = [f"#SBATCH --{key}" + (f"={sbatch_value(value)}" if value is not None else "")
             for key, value in sbatch_directives(plan, stage)]
    env = [f"export {key}={shlex.quote(value)}" for key, value in sorted(c.env.items())]
    run = plan.run
    values = {
        "SBATCH": "\n".join(lines),
        "RUN_NAME": plan.name,
        "STAGE_NAME": stage.name,
        "RUN_DIR": shlex.quote(plan.run_dir),
        "STAGE": shlex.quote(stage.name),
        "PYTHON": shlex.quote(training_python(c.python)),
        "RDZV_PORT": rendezvous_port(c.rdzv_port),
        "RANKS_PER_NODE": str(int(plan.ranks_per_node)),
        "MAX_RESTARTS": str(int(c.max_restarts)),
        "REQUEUE": "1" if c.requeue else "0",
        "SETUP": "\n".join(c.setup) or ":",
        "ENV": "\n".join(env) or ":",
        "OMP": omp_threads_line(plan.ranks_per_node, '"${SLURM_CPUS_PER_TASK:-$(nproc)}"'),
        "CONTROL_DIR": shlex.quote(str(run.control)),
        "STOP_FILE": shlex.quote(str(run.stop_file(stage.name))),
        "DONE_FILE": shlex.quote(str(run.stage(stage.name).done)),
        "LOGS_DIR": shlex.quote(str(run.logs)),
    }
    return re.sub(r"@@([A-Z_]+)@@", lambda m: values[m.group(1)], text)


def rendezvous_port(port: int | None) -> str:
    """The recipe's fixed port, else one derived from the job id at run time (as
    `distributed.job_rendezvous_port`): jobs sharing a node get different ports."""
    if port:
        return str(int(port))
    return f"$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN}))"


def _time(limit: str | int | None) -> str | None:
    """sbatch --time: bare minutes as YAML reads them (an integer) or a SLURM time string."""
    return None if limit is None else str(limit).strip()


def load_template() -> str:
    return asset("slurm", "stage.sbatch.tmpl").read_text()


def submit_command(script: str, dependency: str | None) -> list[str]:
    """The sbatch argv for one stage; `dependency` is the previous stage's job id."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency=afterok:{dependency}")
    return cmd + [script]
