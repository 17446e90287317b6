"""Validation reports every problem at once (the loader's and the planner's together), each once."""

import re
import shlex

from dist_ft.cli import main
from tests.conftest import LAUNCH, ROOT


def readme_example() -> tuple[list[str], str]:
    block = re.search(r"```\n\$ (dist-ft plan [^\n]+)\n(error: .*?)```", (ROOT / "README.md").read_text(), re.S)
    return shlex.split(block.group(1))[1:], block.group(2)


def test_the_readmes_two_problem_example_prints_both(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv, printed = readme_example()
    assert main(argv) == 2
    assert capsys.readouterr().err == printed


def test_an_sp_degree_that_divides_no_stage_is_one_line_not_one_per_stage(capsys):
    assert main(["plan", str(LAUNCH / "demo.yaml"), "--set", "parallelism.sequence_parallel=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("does not divide the seq_len") == 1
    assert ("parallelism.sequence_parallel: 3 does not divide the seq_len of stage(s) ctx512 (512), ctx1k (1024), "
            "sft (256)\n") in err


def test_a_missing_data_file_and_a_plan_problem_are_reported_together(capsys):
    assert main(["plan", str(LAUNCH / "demo.yaml"), "--set", "finetune.data.paths=[/nonexistent/rows.jsonl]",
                 "--set", "parallelism.sequence_parallel=4"]) == 2
    err = capsys.readouterr().err
    assert "has 2 problem(s)" in err and "finetune.data.paths" in err and "4 does not divide the world size 2" in err


def test_a_refused_value_is_not_planned_with_its_default(capsys):
    # cluster.procs_per_node "two" would plan as 1 rank, and sp 2 would then be refused for a world nobody wrote
    assert main(["plan", str(LAUNCH / "demo.yaml"), "--set", "cluster.procs_per_node=two",
                 "--set", "parallelism.sequence_parallel=2"]) == 2
    err = capsys.readouterr().err
    assert "has 1 problem(s)" in err and "cluster.procs_per_node" in err
