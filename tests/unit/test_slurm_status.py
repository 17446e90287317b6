"""`dist-ft status` / `cancel` without SLURM: real `scontrol -o` lines (slurm 22.05) parsed,
stage summaries decided from job info + files, and both commands run against a stand-in client."""

import json
import os
from pathlib import Path

import pytest

from dist_ft.launcher import slurm_jobs
from dist_ft.cli import main
from dist_ft.plan.plan import Plan
from dist_ft.launcher.slurm_status import (JobInfo, SlurmError, StageFiles, exit_description, job_info_from_scontrol,
                                  parse_sacct, parse_scontrol_line, read_stage_files, summarize_run)
from tests.conftest import LAUNCH

# Captured from the local cluster: a failed first stage and its afterok dependant.
FAILED = ("JobId=40 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901738 Nice=0 "
          "Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 "
          "Restarts=0 BatchFlag=1 Reboot=0 ExitCode=3:0 RunTime=00:00:00 TimeLimit=00:01:00 TimeMin=N/A "
          "Partition=debug AllocNode:Sid=localhost:19260 ReqNodeList=(null) ExcNodeList=(null) NodeList=node1 "
          "BatchHost=node1 NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* "
          "TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* Features=(null) "
          "Command=(null) WorkDir=/tmp/exp StdErr=/tmp/exp/a.out StdIn=/dev/null StdOut=/tmp/exp/a.out Power= ")
DEPENDANT = ("JobId=41 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Account=(null) QOS=(null) "
             "JobState=CANCELLED Reason=DependencyNeverSatisfied Dependency=afterok:40(failed) Requeue=1 "
             "Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 NodeList= NumNodes=1 Power= ")


def test_scontrol_line_parses_into_fields():
    fields = parse_scontrol_line(FAILED)
    assert fields["JobId"] == "40" and fields["JobState"] == "FAILED" and fields["ExitCode"] == "3:0"
    assert fields["TRES"] == "cpu=1,node=1,billing=1" and fields["AllocNode:Sid"] == "localhost:19260"
    assert fields["NodeList"] == "node1" and fields["Power"] == ""
    info = job_info_from_scontrol(fields)
    assert info == JobInfo("FAILED", "NonZeroExitCode", "3:0", 0, None)
    dep = job_info_from_scontrol(parse_scontrol_line(DEPENDANT))
    assert dep.state == "CANCELLED" and dep.reason == "DependencyNeverSatisfied"
    assert dep.dependency == "afterok:40(failed)" and dep.restarts == 0


def test_names_and_paths_with_spaces_and_equals_signs_stay_whole():
    line = ("JobId=7 JobName=my run a=b  two UserId=root(0) JobState=RUNNING Reason=None Restarts=2 "
            "WorkDir=/runs/x y=1/$(z) StdErr=/runs/x y=1/logs/s.7.out StdIn=/dev/null StdOut=/runs/o Power=")
    fields = parse_scontrol_line(line)
    assert fields["JobName"] == "my run a=b  two"
    assert fields["WorkDir"] == "/runs/x y=1/$(z)" and fields["StdErr"] == "/runs/x y=1/logs/s.7.out"
    assert "a" not in fields and "y" not in fields
    assert job_info_from_scontrol(fields) == JobInfo("RUNNING", None, None, 2, None)


def test_sacct_output_last_record_wins():
    assert parse_sacct("40|FAILED|1:0\n") == JobInfo("FAILED", exit_code="1:0")
    assert parse_sacct("41|REQUEUED|0:0\n41|CANCELLED by 0|0:15\n") == JobInfo("CANCELLED", exit_code="0:15")
    assert parse_sacct("") is None


@pytest.mark.parametrize("info, text", [
    (JobInfo("FAILED", "NonZeroExitCode", "1:0"), "FAILED, exit code 1 [NonZeroExitCode]"),
    (JobInfo("FAILED", None, "3:0"), "FAILED, exit code 3 (restarted more than cluster.max_restarts times)"),
    (JobInfo("FAILED", None, "5:0"), "FAILED, exit code 5 (the training interpreter was not found on the node)"),
    (JobInfo("CANCELLED", None, "0:15"), "CANCELLED, killed by signal 15"),
    (JobInfo("TIMEOUT", "TimeLimit", "0:0"), "TIMEOUT [TimeLimit]"),
])
def test_exit_description(info, text):
    assert exit_description(info) == text


LOG = StageFiles(log="logs/a.40.attempt0.log", log_tail=["step 3", "RuntimeError: boom"])


def test_a_failed_stage_is_named_by_every_dependant():
    jobs = {"40": "a", "41": "b", "42": "c"}
    statuses = summarize_run([
        ("a", "40", job_info_from_scontrol(parse_scontrol_line(FAILED)), None, LOG),
        ("b", "41", job_info_from_scontrol(parse_scontrol_line(DEPENDANT)), None, StageFiles()),
        ("c", "42", JobInfo("CANCELLED", "DependencyNeverSatisfied", "0:0", 0, "afterok:41(failed)"), None,
         StageFiles()),
    ], jobs)
    a, b, c = statuses
    assert a.state == "FAILED" and a.blame == ("a", "failed") and not a.complete
    assert a.details == ["a: FAILED, exit code 3 (restarted more than cluster.max_restarts times) [NonZeroExitCode]",
                         "  last lines of logs/a.40.attempt0.log:", "    step 3", "    RuntimeError: boom"]
    assert b.state == "CANCELLED" and b.note == "DependencyNeverSatisfied: a failed" and not b.details
    assert c.note == "DependencyNeverSatisfied: a failed via b" and c.blame == ("a", "failed")


def test_a_dependant_pending_forever_says_so():
    [b] = summarize_run([("b", "41", JobInfo("PENDING", "DependencyNeverSatisfied", dependency="afterok:40(failed)"),
                          None, StageFiles())], {"41": "b"})
    assert b.note == ("DependencyNeverSatisfied: job 40 did not succeed; it will never start (dist-ft cancel)")


def test_running_waiting_complete_and_unknown_stages():
    metrics = {"step": 12, "loss": 1.5}
    statuses = summarize_run([
        ("a", "40", JobInfo("COMPLETED", None, "0:0", 0), None, StageFiles(done=True, last_metrics=metrics)),
        ("b", "41", JobInfo("RUNNING", None, "0:0", 1), None, StageFiles(last_metrics=metrics)),
        ("c", "42", JobInfo("PENDING", "Dependency", "0:0", 0, "afterok:41(unfulfilled)"), None, StageFiles()),
        ("d", None, None, None, StageFiles()),
    ], {"40": "a", "41": "b", "42": "c"})
    assert [(s.state, s.note, s.complete) for s in statuses] == [
        ("COMPLETED", "complete", True), ("RUNNING", "", False), ("PENDING", "waiting for b", False),
        ("not submitted", "no job in jobs.json", False)]
    assert statuses[1].restarts == 1 and statuses[1].metrics == metrics
    assert not any(s.details for s in statuses)


def test_jobs_gone_from_the_queue_are_judged_by_their_done_file():
    done, gone = summarize_run([("a", "40", None, None, StageFiles(done=True)), ("b", "41", None, None, LOG)], {})
    assert done.state == gone.state == "finished (no longer in the queue)"
    assert done.complete and not done.details
    assert gone.note == "no DONE file: it did not complete" and "    RuntimeError: boom" in gone.details


def test_a_completed_job_without_done_and_an_unreachable_controller():
    odd, unknown = summarize_run([("a", "40", JobInfo("COMPLETED", exit_code="0:0"), None, LOG),
                                  ("b", "41", None, "scontrol did not answer within 30 s", StageFiles())], {})
    assert odd.note == "the job ended without writing DONE" and odd.details
    assert unknown.state == "unknown" and unknown.note == "scontrol did not answer within 30 s"


def test_stage_files_newest_log_done_and_last_complete_metrics_row(tmp_path):
    logs, stage = tmp_path / "logs", tmp_path / "stages" / "ctx512"
    logs.mkdir()
    stage.mkdir(parents=True)
    assert read_stage_files(tmp_path, "ctx512") == StageFiles()
    (logs / "ctx512.40.out").write_text("batch output\n")
    assert read_stage_files(tmp_path, "ctx512").log == "logs/ctx512.40.out"
    for i, name in enumerate(["ctx512.40.attempt0.log", "ctx512.41.attempt1.log", "ctx512.x.99.attempt0.log"]):
        (logs / name).write_text("".join(f"{name} line {n}\n" for n in range(9)))
        os.utime(logs / name, (1000 + i, 1000 + i))
    (stage / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n{"step": 3, "lo')
    (stage / "DONE").write_text("{}\n")
    files = read_stage_files(tmp_path, "ctx512")
    assert files.done and files.last_metrics == {"step": 2, "eval_loss": 1.5}
    assert files.log == "logs/ctx512.41.attempt1.log"
    assert files.log_tail == [f"ctx512.41.attempt1.log line {n}" for n in range(4, 9)]


# ---- the commands, against a stand-in client ---------------------------------------------------

class FakeSlurm:
    def __init__(self, jobs: dict[str, JobInfo | None], fail_with: str | None = None):
        self.jobs, self.fail_with, self.cancelled, self.asked = jobs, fail_with, [], []

    def job(self, job_id):
        self.asked.append(job_id)
        if self.fail_with:
            raise SlurmError(self.fail_with)
        return self.jobs.get(job_id)

    def cancel(self, job_ids):
        self.cancelled += job_ids


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("status") / "run"
    assert main(["render", str(LAUNCH / "demo.yaml"), "--out", str(out)]) == 0
    return out


def _submitted(run_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the run dir with a jobs.json giving stage i job 40+i."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    names = [s.name for s in Plan.from_json((copy / "plan.json").read_text()).stages]
    (copy / "jobs.json").write_text(json.dumps({n: str(40 + i) for i, n in enumerate(names)}))
    return copy, names


def test_status_of_a_failed_run(run_dir, tmp_path, capsys):
    run, names = _submitted(run_dir, tmp_path)
    (run / "logs" / f"{names[0]}.40.attempt0.log").write_text("loading\nValueError: bad batch\n")
    fake = FakeSlurm({"40": JobInfo("FAILED", "NonZeroExitCode", "1:0", 0),
                      "41": JobInfo("CANCELLED", "DependencyNeverSatisfied", "0:0", 0, "afterok:40(failed)"),
                      "42": JobInfo("CANCELLED", "DependencyNeverSatisfied", "0:0", 0, "afterok:41(failed)")})
    assert slurm_jobs.run_status(run, fake) == 0
    out = capsys.readouterr().out
    assert f"3 of {len(names)} stage(s) submitted" in out
    assert f"DependencyNeverSatisfied: {names[0]} failed via {names[1]}" in out
    assert f"{names[0]}: FAILED, exit code 1 [NonZeroExitCode]" in out and "    ValueError: bad batch" in out


def test_status_asks_slurm_once_when_it_does_not_answer(run_dir, tmp_path, capsys):
    run, names = _submitted(run_dir, tmp_path)
    fake = FakeSlurm({}, fail_with="scontrol did not answer within 30 s")
    assert slurm_jobs.run_status(run, fake) == 0
    assert fake.asked == ["40"]
    assert capsys.readouterr().out.count("scontrol did not answer") == len(names)


def test_cancel_scancels_only_jobs_that_may_still_run(run_dir, tmp_path, capsys):
    run, names = _submitted(run_dir, tmp_path)
    fake = FakeSlurm({"40": JobInfo("COMPLETED"), "41": JobInfo("RUNNING"), "42": JobInfo("PENDING", "Dependency")})
    assert slurm_jobs.run_cancel(run, fake) == 0
    assert fake.cancelled == ["41", "42"]
    out = capsys.readouterr().out
    assert f"[{names[1]}] cancelled job 41 (was RUNNING)" in out and f"[{names[2]}] cancelled job 42 (was PENDING)" in out
    assert f"[{names[0]}] job 40 is COMPLETED: left alone" in out


def test_cancel_with_nothing_submitted_or_nothing_running(run_dir, tmp_path, capsys):
    assert slurm_jobs.run_cancel(run_dir, FakeSlurm({})) == 0
    assert "nothing to cancel" in capsys.readouterr().out
    run, _ = _submitted(run_dir, tmp_path)
    fake = FakeSlurm({"40": JobInfo("COMPLETED")})
    assert slurm_jobs.run_cancel(run, fake) == 0 and fake.cancelled == []
    assert "no longer in the queue: left alone" in capsys.readouterr().out
    assert slurm_jobs.run_cancel(run, FakeSlurm({}, fail_with="scontrol: Unable to contact slurm controller")) == 1


def test_status_and_cancel_need_a_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(slurm_jobs, "SlurmClient", lambda: FakeSlurm({}))
    for command in ("status", "cancel"):
        assert main([command, str(tmp_path / "nowhere")]) == 2
        assert "has no plan.json" in capsys.readouterr().err
    (tmp_path / "plan.json").write_text("{not json")
    assert main(["status", str(tmp_path)]) == 2


def test_status_from_the_command_line(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(slurm_jobs, "SlurmClient", lambda: FakeSlurm({}))
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "0 of" in out and "not submitted" in out


def test_output_path_is_escaped_the_way_slurm_reads_it():
    from dist_ft.launcher.slurm import output_path

    # %j expands and %% is a literal % ...
    assert output_path("/runs/a %j b", "sft") == "/runs/a %%j b/logs/sft.%j.out"
    # ... unless the path holds a backslash: then SLURM expands nothing and drops one escape level.
    assert output_path("/runs/a %j \\b", "sft") == "/runs/a %j \\\\b/logs/sft.out"


BAD_JOBS = {
    "an option for an id": '{"ctx512": "--user=root"}',
    "a second argument": '{"ctx512": "40 41"}',
    "a boolean": '{"ctx512": true}',
    "a nested object": '{"ctx512": {"id": 40}}',
    "a list": '[40, 41]',
    "not JSON": '{"ctx512": 40',
    "not UTF-8": b'{"ctx512": "\xff"}',
}


@pytest.mark.parametrize("command", ["status", "cancel"])
@pytest.mark.parametrize("case", BAD_JOBS, ids=list(BAD_JOBS))
def test_a_malformed_jobs_file_is_one_line_and_exit_2_and_slurm_is_not_asked(case, command, run_dir, tmp_path,
                                                                             capsys, monkeypatch):
    fake = FakeSlurm({"40": JobInfo("RUNNING")})
    monkeypatch.setattr(slurm_jobs, "SlurmClient", lambda: fake)
    run, _ = _submitted(run_dir, tmp_path)
    text = BAD_JOBS[case]
    (run / "jobs.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main([command, str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "jobs.json" in err, err
    assert fake.asked == [] and fake.cancelled == []


def test_array_job_ids_are_valid_and_the_client_refuses_anything_else(run_dir, tmp_path):
    from dist_ft.launcher.slurm_status import SlurmClient, is_job_id

    assert is_job_id("40") and is_job_id("40_3")
    assert not any(is_job_id(t) for t in ("", "-1", "40_", "_3", "4 0", "--user=root", "40\n", "٤٠"))
    run, names = _submitted(run_dir, tmp_path)
    (run / "jobs.json").write_text(json.dumps({names[0]: 40, names[1]: "41_2"}))
    assert slurm_jobs.load_run(run)[1] == {names[0]: "40", names[1]: "41_2"}
    with pytest.raises(SlurmError, match="not a SLURM job id"):
        SlurmClient().cancel(["40", "--user=root"])


def test_a_prepare_job_is_rendered_submitted_first_chained_and_cancelled(tmp_path, capsys):
    """data.prepare: job: a CPU prepare.sbatch that runs `dist-ft prepare` on the resolved recipe; the first
    stage waits for it (afterok); cancel takes it down with the stages; status counts only stages."""
    import subprocess

    out = tmp_path / "run"
    args = [str(LAUNCH / "demo.yaml"), "--out", str(out), "--set", "long_context.data.prepare=job",
            "--set", "cluster.partition=cpu q", "--set", f"checkpointing.output_root={tmp_path}"]
    assert main(["render", *args]) == 0  # a dry run writes nothing: the files come from render
    assert main(["launch", *args, "--backend", "slurm", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    script = out / "prepare.sbatch"
    assert f"[prepare] sbatch --parsable {script}" in printed
    first_stage = [line for line in printed.splitlines() if line.startswith("[")][1]
    assert "'--dependency=afterok:<job id of prepare>'" in first_stage and "ctx512.sbatch" in first_stage
    text = script.read_text()
    assert '#SBATCH --partition="cpu q"' in text and "#SBATCH --nodes=1" in text and "gpus" not in text
    assert f"-m dist_ft prepare {out}/recipe.resolved.yaml --out={out}" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert not (tmp_path / "token_store").exists(), "with a prepare job the launcher prepares nothing itself"
    names = [s.name for s in Plan.from_json((out / "plan.json").read_text()).stages]
    (out / "jobs.json").write_text(json.dumps({"prepare": "39", **{n: str(40 + i) for i, n in enumerate(names)}}))
    fake = FakeSlurm({"39": JobInfo("RUNNING"), "40": JobInfo("PENDING", "Dependency")})
    assert slurm_jobs.run_status(out, fake) == 0
    assert f"{len(names)} of {len(names)} stage(s) submitted (after prepare job 39)" in capsys.readouterr().out
    assert slurm_jobs.run_cancel(out, fake) == 0 and fake.cancelled == ["39", "40"]
    assert "[prepare] cancelled job 39 (was RUNNING)" in capsys.readouterr().out
    assert main(["render", str(LAUNCH / "demo.yaml"), "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "prepare.sbatch").exists()
