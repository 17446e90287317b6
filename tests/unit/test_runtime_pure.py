"""Pure pieces of the rank side: environment reading, the LR schedule, checkpoint bookkeeping, W&B mode."""

import json

import pytest

from dist_ft.rank.checkpoint import commit, complete_tags, latest_tag, tag_for
from dist_ft.rank.distributed import read_env
from dist_ft.rank.metrics import wandb_mode
from dist_ft.plan.schedule import lr_multiplier
from dist_ft.recipe.config import Scheduler
from dist_ft.launcher.summary import read_metrics


def test_torchrun_variables_win_over_slurm_ones():
    env = read_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "SLURM_PROCID": "0",
                    "SLURM_RESTART_COUNT": "2", "SLURM_JOB_ID": "77"}, cuda_available=False)
    assert (env.rank, env.local_rank, env.world_size) == (3, 1, 8)
    assert env.backend == "gloo" and env.device == "cpu" and env.restart_count == 2 and env.slurm_job_id == "77"


def test_srun_task_per_gpu_variables_and_nccl_on_gpu():
    env = read_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}, cuda_available=True)
    assert (env.rank, env.local_rank, env.world_size, env.backend, env.device) == (5, 1, 16, "nccl", "cuda:1")


def test_single_process_defaults():
    env = read_env({}, cuda_available=False)
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True)


def test_warmup_then_cosine_to_the_floor():
    values = [lr_multiplier(Scheduler(warmup_steps=2, min_lr_ratio=0.1), s, total_steps=10) for s in range(12)]
    assert values[:2] == [0.5, 1.0]
    assert values[2] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


def test_only_complete_checkpoints_count_and_latest_falls_back(tmp_path):
    for step in (2, 4):
        (tmp_path / tag_for(step)).mkdir()
        commit(tmp_path, tag_for(step), {"step": step, "dp": 2}, keep_last=5)
    (tmp_path / tag_for(6)).mkdir()  # a crash mid-write: shards but no dist_ft.json
    assert latest_tag(tmp_path) == tag_for(4)
    (tmp_path / "latest").write_text(tag_for(6))  # even a stale pointer cannot name it
    assert latest_tag(tmp_path) == tag_for(4)


def test_keep_last_prunes_the_oldest(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / tag_for(step)).mkdir()
        commit(tmp_path, tag_for(step), {"step": step, "dp": 2}, keep_last=2)
    assert complete_tags(tmp_path) == [tag_for(2), tag_for(3)]
    assert json.loads((tmp_path / tag_for(3) / "dist_ft.json").read_text())["step"] == 3


def test_wandb_mode_auto_is_offline_without_a_key():
    assert wandb_mode("auto", {}) == "offline"
    assert wandb_mode("auto", {"WANDB_API_KEY": "x"}) == "online"
    assert wandb_mode("online", {"WANDB_MODE": "disabled"}) == "disabled"


def test_metrics_survive_a_line_cut_short_by_a_killed_rank(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo{"step": 2, "loss": 1.5}\n{"step": 3, "loss": NaN}\n')
    assert [row["step"] for row in read_metrics(path)] == [1, 3]
