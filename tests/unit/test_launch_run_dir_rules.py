"""What render and launch leave on disk: no local.sh for several nodes, the run dir's access a recipe
choice (group-readable by default), a dry run writes nothing, and the ssh dry run is text a person can paste."""

import os
import stat
import subprocess

from dist_ft.cli import main
from tests.conftest import LAUNCH
from tests.unit.test_ssh_hosts import ssh_raw

DEMO = str(LAUNCH / "demo.yaml")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_multi_node_plan_gets_no_local_sh_and_a_re_render_removes_a_stale_one(tmp_path):
    out = tmp_path / "run"
    assert main(["render", DEMO, "--out", str(out)]) == 0 and (out / "local.sh").is_file()
    assert main(["render", DEMO, "--out", str(out), "--set", "cluster.nodes=2"]) == 0
    assert not (out / "local.sh").exists() and (out / "nodes.sh").is_file()


def test_the_run_dir_is_group_readable_by_default_and_private_on_request(tmp_path):
    old = os.umask(0o077)  # a strict umask must not make the team's run dir private
    try:
        team, own = tmp_path / "team", tmp_path / "own"
        assert main(["render", DEMO, "--out", str(team)]) == 0
        assert main(["render", DEMO, "--out", str(own), "--set", "checkpointing.run_dir_access=private"]) == 0
    finally:
        os.umask(old)
    assert (mode(team), mode(team / "logs"), mode(team / "plan.json"), mode(team / "ctx512.sbatch")) == \
        (0o750, 0o750, 0o640, 0o750)
    assert (mode(own), mode(own / "logs"), mode(own / "plan.json"), mode(own / "ctx512.sbatch")) == \
        (0o700, 0o700, 0o600, 0o700)


def test_a_dry_run_writes_nothing_so_a_second_one_with_other_settings_works(tmp_path, capsys):
    out = str(tmp_path / "run")
    for backend in ("local", "slurm"):
        assert main(["launch", DEMO, "--backend", backend, "--dry-run", "--out", out]) == 0
        assert main(["launch", DEMO, "--backend", backend, "--dry-run", "--out", out, "--set", "seed=7"]) == 0
    assert not os.path.exists(out)
    assert "dry run: nothing written" in capsys.readouterr().out


STANDIN_SSH = """#!/bin/bash
while [ "$1" != "--" ]; do shift; done
shift; host=$1; shift
echo "$host" >> "$STANDIN_LOG/hosts"
exec "$@"
"""
STANDIN_PYTHON = """#!/bin/bash
printf '%s\\n' "$*" >> "$STANDIN_LOG/python.calls"
"""


def test_the_ssh_dry_run_is_short_and_runs_as_pasted(tmp_path, recipe_file, capsys):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(), log.mkdir()
    for name, body in (("ssh", STANDIN_SSH), ("python", STANDIN_PYTHON)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    recipe = recipe_file(ssh_raw(hosts=["node-a", "node-b"], python=str(bin_dir / "python"),
                                 setup=['echo "it\'s $HOME" > /dev/null'], env={"A_VAR": "x 'y' $z"}))
    assert main(["launch", str(recipe), "--backend", "ssh", "--dry-run"]) == 0
    printed = capsys.readouterr().out.split("\n", 1)[1]  # after the "dry run: nothing written" line
    # a heading, then per stage and host: blank, comment, ssh line, the 7 script lines, the end marker (it was one
    # line per host holding the script quoted into one word, quotes nested four deep)
    assert len(printed.splitlines()) == 1 + 3 * 2 * 11
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "STANDIN_LOG": str(log)}
    result = subprocess.run(["bash", "-c", printed], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (log / "hosts").read_text().split() == ["node-a", "node-b"] * 3
    calls = (log / "python.calls").read_text().splitlines()
    assert len(calls) == 6 and all(c.startswith("-m dist_ft.launcher.ssh_node --run-dir=") for c in calls)
    assert "--stage=sft --node-rank=1 --endpoint=node-a:PORT" in calls[-1]
