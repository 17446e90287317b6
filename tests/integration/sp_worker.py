"""One rank of the sequence-parallel equality check (run by test_sequence_parallel under torchrun).

Builds the seeded tiny Llama, registers DeepSpeed's Ulysses attention, wraps the model in our
LanguageModelLoss under a DeepSpeed engine per ZeRO stage, and saves on rank 0 the loss, the
evaluation-mode loss and the full gradients (DeepSpeed's reduced ones, before any optimizer step).

    torchrun --nproc_per_node 2 tests/integration/sp_worker.py OUT_DIR ATTN_IMPLEMENTATION[+levers] ZERO_STAGE...

`+levers` turns on every memory lever on top: activation checkpointing with the checkpoints offloaded
(HostActivations) and DeepSpeed's TiledMLP over 5-token tiles — none of which may change a number.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

LEVERS = "+levers"
MLP_TILE_TOKENS = 5  # 32 tokens per rank's slice: 7 uneven tiles
SEQ_LEN = 64
MICRO_BATCH = 2
CHUNK_TOKENS = 16  # several LM-head chunks per rank's slice
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, vocab_size=97, rope_theta=10000.0)


def tiny_model(attn: str = "sdpa") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if attn == "sdpa_varlen":
        from dist_ft.rank.attention import register

        register()
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, attn_implementation=attn)
    return LlamaForCausalLM(config).float().train()


def fixed_batch(packed: bool = True) -> dict[str, torch.Tensor]:
    """Two rows of 64 tokens. Packed: documents of 20, 30 and 14 tokens (row 0) and 40, 24 (row 1),
    positions restarting at each, the first token of each not scored across the boundary, as
    dist_ft.rank.data packs them; a few prompt tokens unscored as in SFT."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, TINY["vocab_size"], (MICRO_BATCH, SEQ_LEN), generator=generator)
    labels = input_ids.clone()
    position_ids = torch.arange(SEQ_LEN).repeat(MICRO_BATCH, 1)
    if packed:
        for row, lengths in enumerate(((20, 30, 14), (40, 24))):
            start = 0
            for length in lengths:
                position_ids[row, start:start + length] = torch.arange(length)
                labels[row, start] = -100
                start += length
    labels[1, 3:7] = -100
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def ds_config(zero: int, data_parallel: int) -> dict:
    from dist_ft.launcher.deepspeed_config import load_preset

    cfg = load_preset(f"zero{zero}.json")
    cfg.update(train_batch_size=MICRO_BATCH * data_parallel, train_micro_batch_size_per_gpu=MICRO_BATCH,
               gradient_accumulation_steps=1, sequence_parallel_size=2,
               optimizer={"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}})
    return cfg


def run(out: Path, variant: str, zeros: list[int], packed: bool = True) -> None:
    from deepspeed.utils import safe_get_full_grad

    from dist_ft.rank import engine as ds
    from dist_ft.rank.distributed import read_env
    from dist_ft.rank.loss import LanguageModelLoss, TokenMean
    from dist_ft.rank.tiled_mlp import tile_mlps

    env = read_env()
    ds.init_distributed(env)
    batch = fixed_batch(packed)
    attn, levers = variant.removesuffix(LEVERS), variant.endswith(LEVERS)
    for zero in zeros:
        model = tiny_model(attn)
        if levers:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            tile_mlps(model, MLP_TILE_TOKENS)
        mpu = ds.enable_sequence_parallel(model, 2, MICRO_BATCH)
        config = ds_config(zero, env.world_size // 2)  # more ranks: data-parallel groups on the same batch
        sp = ds.sequence_parallel_group(mpu, config)
        token_mean = TokenMean(ds.token_mean_gradient_factor(zero, env.world_size // 2, 2))
        wrapped = LanguageModelLoss(model, CHUNK_TOKENS, sequence_parallel=sp, offload_activations=levers,
                                    token_mean=token_mean)
        engine = ds.build_engine(wrapped, config, lambda step: 1.0, mpu=mpu)
        loss = engine(**batch)
        engine.backward(loss)
        grads = {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.lm.named_parameters()}
        engine.eval()
        with torch.no_grad():
            eval_loss = engine(**batch)
        if env.is_main:
            torch.save({"loss": loss.item(), "eval_loss": eval_loss.item(), "grads": grads},
                       out / f"{variant}.zero{zero}.pt")
        ds.barrier()


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2], [int(z) for z in sys.argv[3:]])
