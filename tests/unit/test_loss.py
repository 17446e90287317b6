"""The chunked loss is transformers' loss: same value, same gradients, whatever the chunk size."""

from __future__ import annotations

import pytest
import torch

from dist_ft.rank.data import pack_documents
from dist_ft.rank.loss import causal_lm_loss
from dist_ft.rank.methods import apply_method
from dist_ft.rank.model import build_model
from tests.helpers import tiny_llama

TINY = tiny_llama(rope_theta=None)
EOS, PAD, SEQ_LEN = 257, 258, 40
DOCUMENTS = [[(7 * i + 3 * j) % 250 for j in range(n)] for i, n in enumerate((9, 20, 5, 30))]


def packed_batch() -> dict[str, torch.Tensor]:
    """Two packed rows: labels -100 at each document start and on the padding of the last row."""
    rows = pack_documents(DOCUMENTS, SEQ_LEN, EOS, pad_id=PAD)
    assert len(rows) == 2
    batch = {k: torch.tensor([row[k] for row in rows]) for k in ("input_ids", "position_ids", "labels")}
    batch["labels"][batch["position_ids"] == 0] = -100
    assert (batch["labels"] == -100).sum() > 4  # document starts and padding
    return batch


def tiny(**overrides) -> torch.nn.Module:
    return build_model(name_or_path=None, config_overrides={**TINY, **overrides}, attn_implementation="sdpa")


def loss_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_matches_transformers(model, chunk_tokens: int) -> None:
    batch = packed_batch()
    expected, expected_grads = loss_and_grads(model, lambda: model(**batch, use_cache=False).loss)
    got, grads = loss_and_grads(model, lambda: causal_lm_loss(model, batch, chunk_tokens=chunk_tokens))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_equals_transformers_loss_and_gradients(chunk_tokens):
    assert_matches_transformers(tiny(), chunk_tokens)


def test_tied_embeddings():
    model = tiny(tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert_matches_transformers(model, 7)


def test_with_gradient_checkpointing():
    model = tiny()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert_matches_transformers(model, 7)


@pytest.mark.parametrize("method", ["lora", "longlora"])
def test_lora_family(method):
    model = apply_method(tiny(), method, {"r": 4, "alpha": 8, "dropout": 0.0})
    for name, param in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    assert_matches_transformers(model, 7)


def test_prompt_tuning_falls_back_to_the_models_own_loss():
    model = apply_method(tiny(), "prompt", {"num_virtual_tokens": 4})
    batch = packed_batch()
    torch.testing.assert_close(causal_lm_loss(model, batch, chunk_tokens=7),
                               model(**batch, use_cache=False).loss, atol=0, rtol=0)


def test_no_scored_token_gives_nan_like_transformers():
    model = tiny()
    batch = packed_batch()
    batch["labels"][:] = -100
    assert torch.isnan(causal_lm_loss(model, batch)) and torch.isnan(model(**batch, use_cache=False).loss)


def test_rejects_a_non_positive_chunk():
    with pytest.raises(ValueError, match="chunk_tokens"):
        causal_lm_loss(tiny(), packed_batch(), chunk_tokens=0)


def test_auto_head_kernel_is_chunked_without_cuda_or_where_liger_cannot_read_the_head():
    from dist_ft.rank.head_loss import choose_head_kernel, fused_head_problem

    model = tiny()
    assert choose_head_kernel("auto", model, on_cuda=False) == "chunked"
    assert choose_head_kernel("chunked", model, on_cuda=True) == "chunked"
    assert fused_head_problem(model) is None
    lora = apply_method(tiny(), "lora", {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["lm_head"]})
    assert "not a plain Linear" in fused_head_problem(lora)
    assert choose_head_kernel("auto", lora, on_cuda=True) == "chunked"
    with pytest.raises(ValueError, match="not a plain Linear"):  # asked for explicitly: refused at build time
        choose_head_kernel("liger", lora, on_cuda=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton, CUDA only")
def test_liger_fused_head_equals_the_chunked_loss():
    pytest.importorskip("liger_kernel")
    model = tiny(vocab_size=1024).cuda()
    batch = {k: v.cuda() for k, v in packed_batch().items()}
    expected, expected_grads = loss_and_grads(model, lambda: causal_lm_loss(model, batch, chunk_tokens=7))
    got, grads = loss_and_grads(model, lambda: causal_lm_loss(model, batch, head_kernel="liger"))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("chunk_tokens", [7, 4096])
def test_lora_on_the_head_trains_through_the_fused_head(chunk_tokens):
    model = apply_method(tiny(), "lora", {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["lm_head", "q_proj"]})
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    assert any("lm_head" in n and p.requires_grad for n, p in model.named_parameters())
    assert_matches_transformers(model, chunk_tokens)


def test_soft_capped_and_scaled_logits():
    """Gemma 2 caps its logits with tanh; the fused head differentiates through the cap."""
    model = build_model(name_or_path=None, attn_implementation="eager", config_overrides={
        "model_type": "gemma2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 259, "head_dim": 8,
        "max_position_embeddings": 256, "final_logit_softcapping": 2.0, "query_pre_attn_scalar": 8})
    assert model.config.final_logit_softcapping == 2.0
    assert_matches_transformers(model, 7)


def test_frozen_body_and_head_still_send_gradients_to_the_adapters_below():
    model = apply_method(tiny(), "lora", {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["v_proj"]})
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lm_head" in n)
    assert_matches_transformers(model, 7)


def test_the_fused_head_runs_the_head_once_per_chunk_and_the_recomputed_one_twice():
    from dist_ft.rank.head_loss import chunked_head_loss_sum, fused_head_loss_sum, head_logits

    model = tiny()
    head = model.get_output_embeddings()
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    hidden = torch.randn(20, 32, requires_grad=True)
    targets = torch.randint(0, 259, (20,))
    fused, n = fused_head_loss_sum(hidden, targets, head_logits(model), list(head.parameters()), chunk_tokens=7)
    fused.backward()
    assert n == 20 and len(calls) == 3
    fused_grads = hidden.grad.clone(), head.weight.grad.clone()
    calls.clear(), hidden.grad.zero_(), model.zero_grad()
    recomputed, _ = chunked_head_loss_sum(hidden, targets, head_logits(model), chunk_tokens=7)
    recomputed.backward()
    assert len(calls) == 6
    torch.testing.assert_close(fused, recomputed)
    torch.testing.assert_close(hidden.grad, fused_grads[0])
    torch.testing.assert_close(head.weight.grad, fused_grads[1])


def test_the_fused_head_gradient_scales_with_the_upstream_gradient():
    from dist_ft.rank.head_loss import fused_head_loss_sum, head_logits

    model = tiny()
    head = model.get_output_embeddings()
    hidden = torch.randn(9, 32, requires_grad=True)
    targets = torch.randint(0, 259, (9,))
    total, _ = fused_head_loss_sum(hidden, targets, head_logits(model), list(head.parameters()), chunk_tokens=4)
    (total * 0.5).backward()
    half = hidden.grad.clone()
    hidden.grad = None
    total, _ = fused_head_loss_sum(hidden, targets, head_logits(model), list(head.parameters()), chunk_tokens=4)
    total.backward()
    torch.testing.assert_close(half * 2, hidden.grad)
