"""Running real trainer processes (torchrun, gloo) on small recipes, and reading what they wrote."""

from __future__ import annotations

import copy
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dist_ft.cli import main
from dist_ft.plan.plan import Plan
from dist_ft.launcher.local_launch import descendants
from dist_ft.launcher.summary import read_metrics
from tests.conftest import LAUNCH, demo_raw
from tests.helpers import free_port, tiny_llama

TINY_CONFIG = tiny_llama(max_position_embeddings=128, attention_bias=True)


def tiny_recipe(zero: int = 2, steps: int = 6, every: int | None = 2, finetune: dict | None = None,
                ranks: int = 2) -> dict:
    """One 256-token continued-pretraining stage (YaRN x2) and optionally a fine-tuning stage."""
    raw = demo_raw()
    raw["model"]["config"] = dict(TINY_CONFIG)
    raw["long_context"] = {"tokens_per_step": 1024, "data": {"paths": ["package:json"]},
                           "stages": [{"name": "ctx", "seq_len": 256, "steps": steps, "lr": 2e-3,
                                       "warmup_steps": min(1, steps - 1), "rope": {"type": "yarn"}}]}
    if finetune is None:
        raw.pop("finetune")
    else:
        raw["finetune"] = finetune
    raw.pop("evaluation", None)  # tests that want it turn it on
    raw["cluster"]["procs_per_node"] = ranks
    raw["parallelism"] = {"zero_stage": zero}
    raw["checkpointing"] = {"every_steps": every, "keep_last": 2}
    raw["tracking"] = {"mode": "offline", "project": "dist-ft-tests"}
    return raw


def lora_finetune(method: str = "lora", steps: int = 3, **options) -> dict:
    return {"name": "sft", "method": method, "options": {"r": 4, "alpha": 8, "dropout": 0.0, **options},
            "format": "instruction", "template": "chat_template", "seq_len": 128, "steps": steps,
            "global_batch_size": 4, "lr": 1e-2, "data": {"paths": [str(LAUNCH / "data" / "tiny_instructions.jsonl")],
                                                         "validation_fraction": 0.1, "packing": False}}


def render(raw: dict, run_dir: Path) -> Plan:
    """The run dir, and its token stores prepared (beside it) as `launch` would before starting ranks."""
    recipe = run_dir.parent / f"{run_dir.name}.yaml"
    raw = copy.deepcopy(raw)
    raw.setdefault("checkpointing", {}).setdefault("output_root", str(run_dir.parent))
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["render", str(recipe), "--out", str(run_dir)]) == 0
    assert main(["prepare", str(recipe), "--out", str(run_dir), "--workers", "1"]) == 0
    return Plan.from_json((run_dir / "plan.json").read_text())


def torchrun_argv(run_dir: Path, stage: str, nproc: int, port: int, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
            "-m", "dist_ft", "train", "--run-dir", str(run_dir), "--stage", stage]


def rank_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    return env


def train(run_dir: Path, stage: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun_argv(run_dir, stage, nproc, free_port()), env=rank_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def start(run_dir: Path, stage: str, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(torchrun_argv(run_dir, stage, nproc, free_port()), env=rank_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 180) -> None:
    """SIGKILL the whole process group as soon as `condition()` holds: a crash, not a clean stop."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"trainer exited early: {proc.stdout.read().decode()[-4000:]}"
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts workers in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def losses(run_dir: Path, stage: str) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir / "stages" / stage / "metrics.jsonl")]


def metric_rows(run_dir: Path, stage: str) -> list[dict]:
    path = run_dir / "stages" / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def latest_step(run_dir: Path, stage: str) -> int:
    latest = run_dir / "stages" / stage / "checkpoints" / "latest"
    return int(latest.read_text().split("_")[1]) if latest.exists() else 0


# ---- W&B offline files ---------------------------------------------------------------------
# wandb 0.31 ships no reader; the format is its LevelDB-style log: a 7-byte header, then
# 32 KiB blocks of records (crc32 4, length 2, type 1) holding protobuf `Record`s.

def wandb_history(run_file: Path) -> list[dict[str, float]]:
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in _leveldb_records(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def _leveldb_records(data: bytes, block: int = 32768):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
        elif kind == 0 and length == 0:
            break


def run_worker(worker: Path, args: list[str], nproc: int, timeout: float, what: str) -> None:
    """A test's own worker script under torchrun on `nproc` CPU ranks; fails the test on a non-zero exit or
    after `timeout` (`what` names the hang). Its own session, so a hang takes torchrun's ranks down too."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", str(worker), *args]
    root = str(Path(__file__).resolve().parents[2])  # workers import tests.integration.*
    proc = subprocess.Popen(argv, env={**rank_env(), "PYTHONPATH": root}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{what}: {proc.communicate()[0][-3000:]}") from None
    assert proc.returncode == 0, output[-6000:]

