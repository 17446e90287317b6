"""What SLURM and the run dir say about each stage, for `dist-ft status` and `dist-ft cancel`.

Pure parts: `parse_scontrol_line`/`parse_sacct` (command output → `JobInfo`),
`summarize_run` (job info + files → one `StageStatus` per stage) and `format_status`.
`read_stage_files` reads the run dir; `SlurmClient` is the one place that runs SLURM commands.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dist_ft.plan.run_dir import RunDir

#: States in which a job may still run; `dist-ft cancel` scancels these.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "STOPPED", "REQUEUED",
                           "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING"})
#: Ends in which the stage did not succeed (dependants with afterok will never start).
FAILED_STATES = {"FAILED": "failed", "TIMEOUT": "timed out", "NODE_FAIL": "lost a node",
                 "OUT_OF_MEMORY": "ran out of memory", "BOOT_FAIL": "failed to boot", "DEADLINE": "missed its deadline",
                 "PREEMPTED": "was preempted", "CANCELLED": "was cancelled"}
#: Exit codes of slurm/stage.sbatch.tmpl itself.
SCRIPT_EXITS = {3: "restarted more than cluster.max_restarts times", 4: "stopped before the end and not requeued",
                5: "the training interpreter was not found on the node"}
NEVER_SATISFIED = "DependencyNeverSatisfied"
LOG_TAIL_LINES = 5
_TAIL_BYTES = 16384

# scontrol -o prints `Key=Value` pairs separated by spaces without quoting, so a job name,
# path or reason may itself contain " Word=". Inside such a field only a known key ends it.
_FREE_TEXT = frozenset({"JobName", "Account", "Reason", "Comment", "AdminComment", "SystemComment",
                        "Command", "WorkDir", "StdErr", "StdIn", "StdOut", "MailUser"})
_KNOWN_KEYS = frozenset(
    "JobId ArrayJobId ArrayTaskId HetJobId HetJobOffset JobName UserId GroupId MCS_label Priority Nice "
    "Account QOS JobState Reason Dependency Requeue Restarts BatchFlag Reboot ExitCode DerivedExitCode "
    "RunTime TimeLimit TimeMin SubmitTime EligibleTime AccrueTime StartTime EndTime Deadline SuspendTime "
    "SecsPreSuspend LastSchedEval Scheduler Partition AllocNode:Sid ReqNodeList ExcNodeList NodeList "
    "BatchHost NumNodes NumCPUs NumTasks CPUs/Task ReqB:S:C:T TRES Socks/Node NtasksPerN:B:S:C CoreSpec "
    "MinCPUsNode MinMemoryNode MinMemoryCPU MinTmpDiskNode Features DelayBoot OverSubscribe Contiguous "
    "Licenses Network Command WorkDir Comment AdminComment SystemComment StdErr StdIn StdOut Power "
    "TresPerNode TresPerJob TresPerTask CpusPerTres MemPerTres MailUser MailType Reservation".split())
_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z][\w:/]*)=")
_DEPENDENCY = re.compile(r"(\w+):(\d+)(?:_\*)?(?:\((\w+)\))?")
_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")


def is_job_id(text: str) -> bool:
    """A SLURM job id: digits, or an array task `123_4`."""
    return _JOB_ID.fullmatch(text) is not None


@dataclass(frozen=True)
class JobInfo:
    state: str  # RUNNING, FAILED, ... ("CANCELLED by 0" from sacct becomes CANCELLED)
    reason: str | None = None
    exit_code: str | None = None  # "status:signal", e.g. "1:0"
    restarts: int | None = None
    dependency: str | None = None  # e.g. "afterok:40(failed)"


@dataclass(frozen=True)
class StageFiles:
    done: bool = False
    last_metrics: dict | None = None
    log: str | None = None  # newest log, relative to the run dir
    log_tail: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StageStatus:
    stage: str
    job_id: str | None
    state: str
    note: str
    restarts: int | None
    complete: bool
    metrics: dict | None
    blame: tuple[str, str] | None = None  # (stage, verb) that kept this stage from succeeding
    details: list[str] = field(default_factory=list)


def parse_scontrol_line(line: str) -> dict[str, str]:
    """One line of `scontrol -o show job` as {key: value}."""
    fields: dict[str, str] = {}
    key, start = None, 0
    for m in _KEY.finditer(line):
        if key in _FREE_TEXT and m.group(1) not in _KNOWN_KEYS:
            continue  # " Word=" inside a name or path
        if key is not None:
            fields[key] = line[start:m.start()].rstrip()
        key, start = m.group(1), m.end()
    if key is not None:
        fields[key] = line[start:].strip()
    return fields


def job_info_from_scontrol(fields: dict[str, str]) -> JobInfo:
    restarts = fields.get("Restarts", "")
    return JobInfo(state=fields.get("JobState", "UNKNOWN"), reason=_null(fields.get("Reason")),
                   exit_code=_null(fields.get("ExitCode")), restarts=int(restarts) if restarts.isdigit() else None,
                   dependency=_null(fields.get("Dependency")))


def parse_sacct(text: str) -> JobInfo | None:
    """`sacct -X -n -P -o JobID,State,ExitCode` output; the last record is the newest."""
    rows = [line.split("|") for line in text.splitlines() if line.count("|") >= 2]
    if not rows:
        return None
    _, state, exit_code = rows[-1][:3]
    return JobInfo(state=state.split()[0] if state.strip() else "UNKNOWN", exit_code=exit_code or None)


def _null(value: str | None) -> str | None:
    return None if value in (None, "", "(null)", "None") else value


def dependency_job_ids(dependency: str | None) -> list[str]:
    return [m.group(2) for m in _DEPENDENCY.finditer(dependency or "")]


def exit_description(info: JobInfo) -> str:
    status, _, signal = (info.exit_code or "0:0").partition(":")
    text = info.state
    if signal not in ("", "0"):
        text += f", killed by signal {signal}"
    elif status not in ("", "0"):
        meaning = SCRIPT_EXITS.get(int(status)) if status.isdigit() else None
        text += f", exit code {status}" + (f" ({meaning})" if meaning else "")
    return text + (f" [{info.reason}]" if info.reason else "")


def summarize_run(inputs: list[tuple[str, str | None, JobInfo | None, str | None, StageFiles]],
                  stage_of_job: dict[str, str]) -> list[StageStatus]:
    """inputs: per stage in plan order (name, job id, job info or None, lookup error or None, files)."""
    blames: dict[str, tuple[str, str]] = {}
    out = []
    for name, job_id, info, error, files in inputs:
        status = summarize_stage(name, job_id, info, error, files, stage_of_job, blames)
        if status.blame:
            blames[name] = status.blame
        out.append(status)
    return out


def summarize_stage(name: str, job_id: str | None, info: JobInfo | None, error: str | None, files: StageFiles,
                    stage_of_job: dict[str, str], blames: dict[str, tuple[str, str]]) -> StageStatus:
    def status(state: str, note: str, blame=None, details=()) -> StageStatus:
        return StageStatus(name, job_id, state, note, info.restarts if info else None, files.done,
                           files.last_metrics, blame, list(details))

    if job_id is None:
        return status("not submitted", "DONE present" if files.done else "no job in jobs.json")
    if error is not None:
        return status("unknown", error)
    if info is None:
        if files.done:
            return status("finished (no longer in the queue)", "complete")
        return status("finished (no longer in the queue)", "no DONE file: it did not complete",
                      details=_failure_details(name, "gone from the queue without a DONE file", files))
    deps = [stage_of_job.get(j, f"job {j}") for j in dependency_job_ids(info.dependency)]
    if info.reason == NEVER_SATISFIED:
        dep = deps[0] if deps else "its dependency"
        root, verb = blames.get(dep, (dep, "did not succeed"))
        via = f" via {dep}" if dep != root else ""
        note = f"{NEVER_SATISFIED}: {root} {verb}{via}"
        if info.state == "PENDING":
            note += "; it will never start (dist-ft cancel)"
        return status(info.state, note, blame=(root, verb))
    if info.state == "CANCELLED" and not files.log:
        return status(info.state, "cancelled before it started", blame=(name, FAILED_STATES["CANCELLED"]))
    if info.state in FAILED_STATES:
        return status(info.state, exit_description(info), blame=(name, FAILED_STATES[info.state]),
                      details=_failure_details(name, exit_description(info), files))
    if info.state == "PENDING" and info.reason == "Dependency" and deps:
        return status(info.state, "waiting for " + ", ".join(deps))
    if info.state == "COMPLETED" and not files.done:
        return status(info.state, "the job ended without writing DONE",
                      details=_failure_details(name, "COMPLETED without a DONE file", files))
    return status(info.state, "complete" if files.done else (info.reason or ""))


def _failure_details(name: str, why: str, files: StageFiles) -> list[str]:
    lines = [f"{name}: {why}"]
    if files.log:
        lines.append(f"  last lines of {files.log}:")
        lines += ["    " + line for line in files.log_tail]
    else:
        lines.append("  no log file yet")
    return lines


def format_metrics(row: dict | None) -> str:
    if not row:
        return "-"
    parts = [f"step {row['step']}"]
    for key in ("loss", "eval_loss"):
        if isinstance(row.get(key), (int, float)):
            parts.append(f"{key} {row[key]:.4f}")
    return " ".join(parts)


def format_status(title: str, statuses: list[StageStatus]) -> str:
    header = ("STAGE", "JOB", "STATE", "RESTARTS", "DONE", "LAST METRICS", "NOTE")
    rows = [header] + [(s.stage, s.job_id or "-", s.state, "-" if s.restarts is None else str(s.restarts),
                        "yes" if s.complete else "no", format_metrics(s.metrics), s.note) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = [title] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    for s in statuses:
        if s.details:
            lines += [""] + s.details
    return "\n".join(line.rstrip() for line in lines)


# ---- the run dir -----------------------------------------------------------------------------

def read_stage_files(run_dir: Path, stage: str) -> StageFiles:
    """DONE, the last metrics row and the tail of the stage's newest log."""
    run = RunDir(run_dir)
    folder = run.stage(stage)
    log = _newest_log(run, stage)
    return StageFiles(done=folder.done.exists(), last_metrics=_last_metrics(folder.metrics),
                      log=str(log.relative_to(run_dir)) if log else None,
                      log_tail=_tail(log, LOG_TAIL_LINES) if log else [])


def _newest_log(run: RunDir, stage: str) -> Path | None:
    """The newest training log (an attempt's), else the newest batch output."""
    for found in run.stage_logs(stage):
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    return None


def _tail(path: Path, n: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - _TAIL_BYTES))
        return f.read().decode(errors="replace").splitlines()[-n:]


def _last_metrics(path: Path) -> dict | None:
    if not path.exists():
        return None
    for line in reversed(_tail(path, 50)):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written, or cut by the tail window
        if isinstance(row, dict) and "step" in row:
            return row
    return None


# ---- SLURM commands --------------------------------------------------------------------------

class SlurmError(Exception):
    pass


class SlurmClient:
    """Runs scontrol, sacct and scancel; every call is bounded by `timeout` seconds."""

    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError:
            raise SlurmError(f"{argv[0]} not found: run this where SLURM's commands are installed") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{argv[0]} did not answer within {self.timeout:.0f} s") from None

    def job(self, job_id: str) -> JobInfo | None:
        """What slurmctld (else sacct) knows about the job; None when neither knows it."""
        _check_ids([job_id])
        result = self._run(["scontrol", "-o", "show", "job", job_id])
        if result.returncode == 0 and result.stdout.strip():
            return job_info_from_scontrol(parse_scontrol_line(result.stdout.splitlines()[0]))
        if "Invalid job id" not in result.stderr:
            raise SlurmError(f"scontrol: {(result.stderr or result.stdout).strip()}")
        try:
            result = self._run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode"])
        except SlurmError:
            return None
        return parse_sacct(result.stdout) if result.returncode == 0 else None

    def cancel(self, job_ids: list[str]) -> None:
        _check_ids(job_ids)
        result = self._run(["scancel", *job_ids])
        if result.returncode != 0:
            raise SlurmError(f"scancel: {(result.stderr or result.stdout).strip()}")


def _check_ids(job_ids: list[str]) -> None:
    """Never hand SLURM an argument that is not a job id (it could be an option)."""
    bad = [job for job in job_ids if not is_job_id(job)]
    if bad:
        raise SlurmError(f"{bad[0]!r} is not a SLURM job id")
