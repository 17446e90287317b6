"""GPU-only kernels and paths, in one process: skipped (with the reason shown) where CUDA is absent.

gpu_check.sh step 2 runs these on the device machine: flash-attention's and our sdpa_varlen's packed rows
against transformers' masked sdpa, QLoRA's LoRA gradients on CUDA after the eval-forward trap, and
`dist-ft eval`'s perplexity and passkey on the GPU against the same model on the CPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dist_ft.rank.data import pack_documents
from dist_ft.rank.methods import apply_method
from dist_ft.rank.model import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU-only path)")]

TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 259, "max_position_embeddings": 512}
EOS, PAD = 257, 258
DOCUMENTS = [[(7 * i + 3 * j) % 250 for j in range(n)] for i, n in enumerate((90, 200, 50, 140))]


def tiny(attn: str, dtype: torch.dtype = torch.bfloat16, **overrides) -> torch.nn.Module:
    """Same seed, same weights whatever the attention; on the GPU."""
    return build_model(name_or_path=None, config_overrides={**TINY, **overrides}, attn_implementation=attn,
                       dtype=dtype, seed=0).cuda()


def packed_row() -> dict[str, torch.Tensor]:
    """One row of four documents (flash_attention_2 reads document starts from position_ids for one row only)."""
    rows = pack_documents(DOCUMENTS, 512, EOS, pad_id=PAD)
    return {k: torch.tensor([rows[0][k]], device="cuda") for k in ("input_ids", "position_ids")}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(**batch, use_cache=False).logits.float()


@pytest.mark.parametrize("attn", ["sdpa_varlen", "flash_attention_2"])
def test_varlen_attention_equals_masked_sdpa_on_packed_rows(attn):
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (PyPI has only an sdist that needs CUDA to build)")
    batch = packed_row()
    expected = logits(tiny("sdpa"), batch)  # transformers builds the block-diagonal mask from position_ids
    got = logits(tiny(attn), batch)
    # bf16 operands: kernels differ in summation order, not in which tokens attend to which
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2
    first = batch["position_ids"][0].tolist().index(0, 1)  # the second document starts here
    alone = logits(tiny(attn), {k: v[:, first:first + 200] for k, v in batch.items()})
    assert ((got[:, first:first + 200] - alone).norm() / alone.norm()).item() < 2e-2  # no attention across documents


def test_qlora_lora_gradients_are_non_zero_on_cuda_after_an_eval_forward():
    """FACTS.md's bitsandbytes trap was CPU-only; this proves the CUDA kernels keep LoRA trainable."""
    pytest.importorskip("bitsandbytes")
    base = build_model(name_or_path=None, config_overrides=TINY, attn_implementation="sdpa", dtype=torch.bfloat16,
                       quantize_4bit=True)
    model = apply_method(base, "qlora", {"r": 4, "alpha": 8, "dropout": 0.0}).to("cuda")
    ids = torch.randint(0, 250, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, labels=ids, use_cache=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # LoRA B starts at zero: A's gradient is non-zero from the second step on
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())


def test_eval_runs_on_the_gpu_and_agrees_with_the_cpu(tmp_path):
    from dist_ft.evaluation.eval_nll import greedy_matches, token_nll
    from dist_ft.evaluation.eval_model import eval_device

    assert eval_device().type == "cuda"
    gpu = tiny("sdpa", dtype=torch.float32).eval()
    cpu = build_model(name_or_path=None, config_overrides=TINY, attn_implementation="sdpa", seed=0).eval()
    ids = torch.randint(0, 250, (1, 256), generator=torch.Generator().manual_seed(0))  # built on the CPU, as eval does
    torch.testing.assert_close(token_nll(gpu, ids).cpu(), token_nll(cpu, ids), rtol=1e-3, atol=1e-3)
    assert greedy_matches(gpu, ids, 4) == greedy_matches(cpu, ids, 4)


def test_dist_ft_eval_places_the_model_on_the_gpu(tmp_path):
    from dist_ft.evaluation.eval_model import RopeVariant, Target, load_variant

    model_dir = tmp_path / "model"
    build_model(name_or_path=None, config_overrides=TINY, attn_implementation="sdpa").save_pretrained(model_dir)
    target = Target(model_dir=str(model_dir), gguf_file=None, adapter_dir=None, tokenizer_dir=str(model_dir), label="tiny")
    model = load_variant(target, RopeVariant("yarn", 2.0), torch.bfloat16)
    assert next(model.parameters()).device.type == "cuda"
