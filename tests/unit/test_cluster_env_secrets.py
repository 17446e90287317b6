"""cluster.env is written into the rendered scripts: secrets are refused with the fix; WANDB_DIR there
still leads the summary to the offline W&B runs."""

import pytest

from dist_ft.cli import main
from dist_ft.launcher.summary import pipeline_summary
from tests.conftest import LAUNCH
from tests.unit.test_plan import plan_of


@pytest.mark.parametrize("key", ["WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
                                 "MY_SERVICE_KEY", "DB_PASSWORD"])
def test_a_secret_looking_env_key_is_refused_before_anything_is_written(key, capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["render", str(LAUNCH / "demo.yaml"), "--out", str(out), "--set", f"cluster.env.{key}=s3cr3t"]) == 2
    err = capsys.readouterr().err
    assert f"cluster.env.{key}: looks like a secret, and cluster.env is written in plain text" in err
    assert f"fix: remove it and export {key} in the environment the job starts from" in err
    assert not out.exists()


def test_ordinary_env_keys_still_pass():
    plan = plan_of(["cluster.env={NCCL_IB_DISABLE: '0', KEYBOARD_LAYOUT: us, WANDB_DIR: /tmp/w}"])
    assert plan.cluster.env["NCCL_IB_DISABLE"] == "0"


def test_wandb_dir_in_cluster_env_keeps_the_summarys_sync_hint(tmp_path):
    moved = tmp_path / "scratch-wandb"
    (moved / "wandb" / "offline-run-20261206_010203-abc").mkdir(parents=True)
    plan = plan_of([f"cluster.env={{WANDB_DIR: {moved}}}"])
    assert plan.wandb_dir == moved / "wandb"
    assert f"wandb sync {moved}/wandb/offline-run-*" in pipeline_summary(plan)
