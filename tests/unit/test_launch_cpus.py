"""CPU binding in the launch scripts: srun gets --cpus-per-task (Slurm >= 22.05 no longer inherits it),
one OMP_NUM_THREADS rule everywhere, and setup lines run with `set -u` off (conda activate and module
systems read unset variables) — proven by running the scripts under bash against stand-ins."""

import os
import subprocess

from tests.unit.test_render import render_demo, run_sbatch

UNSET_READER = 'cluster.setup=["echo got:${DIST_FT_TEST_NEVER_SET}: > \\"$HOME/setup.out\\""]'


def env_of(tmp) -> dict[str, str]:
    lines = (tmp / "log" / "python.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_srun_gets_the_allocations_cpus_per_task_and_omp_shares_them_among_the_ranks(tmp_path):
    out = render_demo(tmp_path, "cluster.cpus_per_task=8")
    assert "#SBATCH --cpus-per-task=8\n" in (out / "ctx512.sbatch").read_text()
    result = run_sbatch(out / "ctx512.sbatch", tmp_path, {"SLURM_CPUS_PER_TASK": "8"})
    assert result.returncode == 0, result.stderr
    assert "--cpus-per-task=8" in (tmp_path / "log" / "srun.args").read_text().split()
    env = env_of(tmp_path)
    assert env["SRUN_CPUS_PER_TASK"] == "8" and env["OMP_NUM_THREADS"] == "4"  # 8 CPUs, 2 ranks per node


def test_cpu_ranks_ask_for_a_core_each_when_the_recipe_does_not_say(tmp_path):
    out = render_demo(tmp_path)  # demo: 2 CPU ranks, no cpus_per_task
    assert "#SBATCH --cpus-per-task=2\n" in (out / "ctx512.sbatch").read_text()


def test_a_users_omp_num_threads_wins_and_the_rule_is_the_same_in_every_script(tmp_path):
    out = render_demo(tmp_path, "cluster.env={OMP_NUM_THREADS: '3'}")
    assert run_sbatch(out / "ctx512.sbatch", tmp_path, {"SLURM_CPUS_PER_TASK": "8"}).returncode == 0
    assert env_of(tmp_path)["OMP_NUM_THREADS"] == "3"
    from dist_ft.recipe.launch_script import omp_threads_line

    for script in ("local.sh", "nodes.sh"):
        assert omp_threads_line(2) in (out / script).read_text().splitlines()


def test_a_setup_line_that_reads_an_unset_variable_runs_in_the_sbatch_script(tmp_path):
    out = render_demo(tmp_path, UNSET_READER)
    result = run_sbatch(out / "ctx512.sbatch", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "setup.out").read_text() == "got::\n"
    assert (tmp_path / "log" / "python.args").exists()  # and training started after it


def test_a_setup_line_that_reads_an_unset_variable_runs_in_local_sh(tmp_path):
    out = render_demo(tmp_path, UNSET_READER)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "STANDIN_LOG": str(tmp_path / "log")}
    (tmp_path / "log").mkdir(exist_ok=True)
    result = subprocess.run(["bash", str(out / "local.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "setup.out").read_text() == "got::\n"
