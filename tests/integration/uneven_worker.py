"""One rank of the uneven-ranks check (run by test_uneven_ranks under torchrun, 2 ranks).

Each rank holds data that scores a different number of tokens, one of them none, and the loss is
chunked over 16 scored tokens at a time: under ZeRO-3 every chunk gathers the LM head's weight, so
ranks that ran different numbers of chunks used to wait on each other forever. Every variant does
what the training loop does (forward, backward, step, the loop's next collective, an eval forward)
and rank 0 saves both ranks' losses and DeepSpeed's reduced gradients.

    torchrun --nproc_per_node 2 tests/integration/uneven_worker.py OUT_DIR VARIANT...

Variants: `dp-none.zero{2,3}` (rank 1 scores nothing), `dp-few.zero3` (rank 1 scores 5 tokens),
`lora-none.zero3` (LoRA on attention and the LM head), `frozen-none.zero3` (LoRA on attention only: the
head is partitioned and frozen), `tied-none.zero3` (the head is the embedding),
`sp-none.zero3` (one sequence over both
ranks, its second half unscored: rank 1's slice scores nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.integration import sp_worker

LORA_TARGETS = ["q_proj", "v_proj", "lm_head"]
FROZEN_HEAD_TARGETS = ["q_proj", "v_proj"]


def rank_batch(kind: str, rank: int) -> dict[str, torch.Tensor]:
    """This rank's micro-batch: rank 0 the SP check's packed rows, rank 1 the same rows scoring
    nothing (`none`) or 5 tokens (`few`)."""
    batch = sp_worker.fixed_batch()
    if rank == 1:
        batch["labels"] = torch.full_like(batch["labels"], -100)
        if kind == "few":
            batch["labels"][0, 10:15] = batch["input_ids"][0, 10:15]
    return batch


def sp_batch() -> dict[str, torch.Tensor]:
    batch = sp_worker.fixed_batch()
    batch["labels"][:, sp_worker.SEQ_LEN // 2:] = -100
    return batch


def reference_batch(variant: str) -> dict[str, torch.Tensor]:
    """What transformers scores in one process: both ranks' rows together, or the SP sequence."""
    family, kind = variant.split(".")[0].split("-")
    if family == "sp":
        return sp_batch()
    rows = [rank_batch(kind, rank) for rank in (0, 1)]
    return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}


def with_lora(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    for name, param in model.named_parameters():  # non-zero B so that every LoRA weight gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def build_model(variant: str) -> torch.nn.Module:
    if variant.startswith("tied"):  # the LM head is the embedding: one parameter, two gradients
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**sp_worker.TINY, attn_implementation="sdpa", tie_word_embeddings=True)
        return LlamaForCausalLM(config).float().train()
    model = sp_worker.tiny_model("sdpa_varlen" if variant.startswith("sp") else "sdpa")
    if variant.startswith("lora"):
        return with_lora(model, LORA_TARGETS)
    return with_lora(model, FROZEN_HEAD_TARGETS) if variant.startswith("frozen") else model


def run_variant(variant: str, env, out: Path) -> None:
    from deepspeed.utils import safe_get_full_grad

    from dist_ft.rank import engine as ds
    from dist_ft.rank.loss import LanguageModelLoss, TokenMean

    family, kind = variant.split(".")[0].split("-")
    zero = int(variant.split("zero")[1])
    model = build_model(variant)
    sp_size = 2 if family == "sp" else 1
    mpu = ds.enable_sequence_parallel(model, 2, sp_worker.MICRO_BATCH) if sp_size == 2 else None
    config = sp_worker.ds_config(zero, env.world_size // sp_size)
    config["sequence_parallel_size"] = sp_size
    # Tiny weights are persistent (never partitioned) under DeepSpeed's default threshold: partition them all,
    # as a real model's are, so that the LM head is gathered for real.
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    sp = ds.sequence_parallel_group(mpu, config) if mpu else None
    zero_stage = config["zero_optimization"]["stage"]
    token_mean = TokenMean(ds.token_mean_gradient_factor(zero_stage, env.world_size // sp_size, sp_size))
    wrapped = LanguageModelLoss(model, sp_worker.CHUNK_TOKENS, sequence_parallel=sp, token_mean=token_mean)
    engine = ds.build_engine(wrapped, config, lambda step: 1.0, mpu=mpu)
    batch = sp_batch() if family == "sp" else rank_batch(kind, env.rank)
    head_calls = []  # how the loss ran the head: once (fused, gathered) or per chunk, twice (recompute)
    hook = engine.module.lm.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    loss = engine(**batch)
    engine.backward(loss)
    hook.remove()
    grads = {name: safe_get_full_grad(p).detach().clone()
             for name, p in engine.module.lm.named_parameters() if p.requires_grad}
    engine.step()
    ds.all_reduce_max(0.0)  # the loop's next collective, where the deadlocked rank used to wait
    engine.backward(engine(**batch))  # a second step: ZeRO-3 now prefetches along the first step's trace
    engine.step()
    engine.eval()
    with torch.no_grad():
        engine(**batch)
    losses = [torch.zeros(1) for _ in range(env.world_size)]
    torch.distributed.all_gather(losses, loss.detach().float().reshape(1).cpu())
    calls = [torch.zeros(1) for _ in range(env.world_size)]
    torch.distributed.all_gather(calls, torch.tensor([float(len(head_calls))]))
    if env.is_main:
        torch.save({"losses": [x.item() for x in losses], "grads": grads,
                    "head_calls": [int(x.item()) for x in calls]}, out / f"{variant}.pt")
    ds.barrier()


def main(out: Path, variants: list[str]) -> None:
    from dist_ft.rank import engine as ds
    from dist_ft.rank.distributed import read_env

    env = read_env()
    ds.init_distributed(env)
    for variant in variants:  # Ulysses registers itself with transformers: the SP variant goes last
        run_variant(variant, env, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
