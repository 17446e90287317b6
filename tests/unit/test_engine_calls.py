"""What dist_ft.rank.engine asks of DeepSpeed and torch.distributed, with stand-ins for the engine."""

import datetime
import os
from types import SimpleNamespace

import torch

from dist_ft.rank import engine as ds
from dist_ft.cli import main
from dist_ft.rank.distributed import read_env
from tests.conftest import LAUNCH


def test_the_collective_timeout_is_a_bounded_recipe_setting_passed_to_deepspeed(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(ds.deepspeed, "init_distributed", lambda **kwargs: seen.update(kwargs))
    ds.init_distributed(read_env({}, cuda_available=False), 90)
    assert seen == {"dist_backend": "gloo", "timeout": datetime.timedelta(minutes=90)}
    recipe = str(LAUNCH / "demo.yaml")
    for too_short in ("0", "0.1"):  # under three heartbeats: every rank would look frozen
        assert main(["plan", recipe, "--set", f"cluster.collective_timeout_minutes={too_short}"]) == 2
        assert "collective_timeout_minutes" in capsys.readouterr().err
    assert main(["render", recipe, "--out", str(tmp_path / "run")]) == 0
    assert '"collective_timeout_minutes": 60.0' in (tmp_path / "run" / "plan.json").read_text()


class Writer:
    def save(self, state_dict, path):
        torch.save(state_dict, path)


def test_every_checkpoint_file_a_rank_writes_is_synced_before_save_returns(monkeypatch, tmp_path):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))

    def save_checkpoint(folder, tag, **kwargs):
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            engine.checkpoint_engine.save({"x": torch.ones(1)}, os.path.join(folder, tag, name))

    engine = SimpleNamespace(checkpoint_engine=Writer(), save_checkpoint=save_checkpoint)
    (tmp_path / "step_00000002").mkdir()
    ds.save_checkpoint(engine, tmp_path, "step_00000002", {}, frozen_excluded=False)
    assert sorted(synced) == sorted(str(p) for p in (tmp_path / "step_00000002").iterdir())
    assert engine.checkpoint_engine.save.__func__ is Writer.save  # DeepSpeed's writer is itself again


def test_zero12_export_holds_the_whole_state_dict_on_rank_0_only():
    model = torch.nn.Linear(2, 2)
    engine = SimpleNamespace(zero_optimization_stage=lambda: 2, module=model)
    assert ds.full_state_dict(engine, is_main=False) is None
    assert set(ds.full_state_dict(engine, is_main=True)) == {"weight", "bias"}


# ZeRO-3's marks on a partitioned parameter that dist_ft reads (hasattr/getattr or attribute access), and
# the package's own names that merely start the same way.
DEEPSPEED_PARAMETER_ATTRIBUTES = {"ds_id", "ds_numel", "ds_shape", "ds_tensor"}
# StagePlan.ds_config (the rendered file's name), the ds_configs/ presets folder, DeepSpeed's ds_to_universal module.
NOT_DEEPSPEED_ATTRIBUTES = {"ds_config", "ds_configs", "ds_to_universal"}


def test_deepspeed_still_sets_the_parameter_attributes_the_ranks_read():
    """The canary for the `ds_*` reads (head_loss, optimizer, methods, positions, engine, trainer): each is
    still assigned to a parameter by DeepSpeed's ZeRO-3 partitioner, and no read escapes this list."""
    import ast
    import inspect
    import re

    from deepspeed.runtime.zero import partition_parameters
    from tests.conftest import ROOT

    tree = ast.parse(inspect.getsource(partition_parameters))
    set_by_deepspeed = {target.attr for node in ast.walk(tree) if isinstance(node, ast.Assign)
                        for target in node.targets if isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name) and target.value.id == "param"}
    read_here = set()
    for path in (ROOT / "dist_ft").rglob("*.py"):
        read_here |= set(re.findall(r"""(?:\.|["'])(ds_[a-z_]+)\b""", path.read_text())) - NOT_DEEPSPEED_ATTRIBUTES
    assert read_here == DEEPSPEED_PARAMETER_ATTRIBUTES
    assert DEEPSPEED_PARAMETER_ATTRIBUTES <= set_by_deepspeed
