"""The baseline: a plain `transformers.Trainer` + DeepSpeed run, as a user would write it.

One rank of it, started by `long_context.py` under torchrun. Nothing from dist_ft is imported:
the model config, the DeepSpeed config (the one dist-ft rendered for the same stage, so ZeRO stage,
optimizer, clipping and buckets are identical) and the packed rows (exactly the rows dist-ft's
trainer sees, in the same order per rank) come from the spec file `long_context.py` writes.

Stock choices everywhere: `attn_implementation="sdpa"`, the model's own loss (full-vocabulary
logits), no gradient checkpointing unless the spec asks for it (`gradient_checkpointing`, the
Trainer's own switch). Only `use_cache=False` is set, as for any training run: with a
cache transformers lets packed documents attend to each other (measured: their logits differ by 0.5).
On CUDA (spec "device": "cuda") it runs on NCCL, one GPU per rank, and reports the GPU's peak
allocated memory (what dist-ft's trainer reports there) instead of the process's RSS.

Rank 0 writes {"step_times_s", "peak_memory_gib", "loss_step1", ...} to spec["out"].
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import deepspeed

    # Without an initialised process group TrainingArguments sees world size 1 (measured on CPU).
    if on_cuda(spec):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda(spec) else "gloo")
    args = training_args(spec)  # before the model: under ZeRO-3 it makes from_config use zero.Init
    model = build_model(spec)
    clock = StepClock(on_cuda(spec))
    from transformers import Trainer, default_data_collator

    trainer = Trainer(model=model, args=args, train_dataset=PackedRows(spec["rows"], spec["row_keys"]),
                      data_collator=default_data_collator, callbacks=[clock])
    trainer.train()
    if args.process_index == 0:
        Path(spec["out"]).write_text(json.dumps(clock.result(model)) + "\n")
    torch.distributed.destroy_process_group()  # as our ranks do: no gloo threads left to exit-time destructors
    return 0


def on_cuda(spec: dict) -> bool:
    return spec.get("device", "cpu") == "cuda"


def model_dtype(spec: dict) -> torch.dtype:
    return torch.bfloat16 if spec.get("dtype") == "bf16" else torch.float32


def training_args(spec: dict):
    """TrainingArguments that agree with the DeepSpeed config (HF refuses mismatches, which keeps
    the two runs honest: same batch, optimizer hyperparameters and clipping)."""
    from transformers import TrainingArguments

    ds = spec["ds_config"]
    opt = ds["optimizer"]["params"]
    return TrainingArguments(
        output_dir=spec["output_dir"], use_cpu=not on_cuda(spec), deepspeed=dict(ds),
        bf16=spec.get("dtype") == "bf16", gradient_checkpointing=spec.get("gradient_checkpointing", False),
        per_device_train_batch_size=ds["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds["gradient_accumulation_steps"], max_steps=spec["steps"],
        learning_rate=opt["lr"], adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1], adam_epsilon=opt["eps"],
        weight_decay=opt["weight_decay"], max_grad_norm=ds.get("gradient_clipping", 1.0),
        lr_scheduler_type="constant", warmup_steps=0,
        train_sampling_strategy="sequential",  # the rows are already in dist-ft's per-rank order
        dataloader_num_workers=0, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=spec["seed"])


def build_model(spec: dict):
    """The same random-init model dist-ft builds (same config, seed and dtype), with stock sdpa."""
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = dict(spec["model_config"])
    config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
    config.use_cache = False
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=model_dtype(spec))
    return model.train()


class PackedRows(torch.utils.data.Dataset):
    """Rows saved by long_context.py: a dict of (N, seq_len) long tensors, one row per item."""

    def __init__(self, path: str, keys: list[str]):
        tensors = torch.load(path)
        self.tensors = {key: tensors[key] for key in keys}

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def _peak_gib(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


class StepClock(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, DeepSpeed step) and the rank's peak RSS (CPU) or
    peak allocated GPU memory (CUDA) after it: what dist-ft's loop records as step_time_s and peak_memory_gib."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.times: list[float] = []
        self.peaks: list[float] = []
        self.losses: dict[int, float] = {}
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()  # CUDA work is asynchronous: the step ends when its kernels do
        self.times.append(time.perf_counter() - self._started)
        self.peaks.append(_peak_gib(self.cuda))

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])

    def result(self, model) -> dict:
        params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        return {"step_times_s": self.times, "peak_memory_gib": max(self.peaks), "peaks_gib": self.peaks,
                "loss_step1": self.losses.get(1), "vocab_size": model.config.vocab_size, "num_params": params}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
