"""Activation offload keeps exactly the checkpoints in host memory and changes no number."""

from __future__ import annotations

import pytest
import torch

from dist_ft.rank.loss import LanguageModelLoss
from test_loss import TINY, loss_and_grads, packed_batch, tiny

ROWS, SEQ_LEN = packed_batch()["input_ids"].shape


def checkpointed(**overrides) -> torch.nn.Module:
    model = tiny(**overrides)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def run(model, offload: bool) -> tuple[LanguageModelLoss, torch.Tensor, dict[str, torch.Tensor]]:
    wrapped = LanguageModelLoss(model, chunk_tokens=16, offload_activations=offload)
    loss, grads = loss_and_grads(model, lambda: wrapped(**packed_batch()))
    return wrapped, loss, grads


def test_offloaded_checkpoints_give_identical_loss_and_gradients():
    model = checkpointed()
    _, expected, expected_grads = run(model, offload=False)
    wrapped, loss, grads = run(model, offload=True)
    assert torch.equal(loss, expected)
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name
    assert wrapped.offloaded_bytes > 0


@pytest.mark.parametrize("layers", [2, 4])
def test_what_is_offloaded_is_one_hidden_state_per_layer(layers):
    """layers × tokens × hidden × 4 B (fp32) for the checkpoints, plus what runs outside them: the
    final norm (three tensors of a hidden state's size), the loss chunks' inputs (one) and token ids.
    Nothing per head or MLP channel (a layer's insides leaking out of its checkpoint), and no weights."""
    wrapped, _, _ = run(checkpointed(num_hidden_layers=layers), offload=True)
    hidden_state = ROWS * SEQ_LEN * TINY["hidden_size"] * 4
    assert layers * hidden_state <= wrapped.offloaded_bytes <= (layers + 5) * hidden_state


def test_without_checkpointing_every_activation_would_move():
    wrapped, _, _ = run(tiny(num_hidden_layers=4), offload=True)
    hidden_state = ROWS * SEQ_LEN * TINY["hidden_size"] * 4
    assert wrapped.offloaded_bytes > 4 * 10 * hidden_state  # why the plan requires checkpointing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the point is accelerator memory")
def test_offload_lowers_accelerator_peak():
    config = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 8, "vocab_size": 1024}
    batch = {"input_ids": torch.randint(0, 1000, (1, 8192), device="cuda")}
    batch["labels"] = batch["input_ids"]
    peaks = {}
    for offload in (False, True):
        model = checkpointed(**config).cuda()
        wrapped = LanguageModelLoss(model, offload_activations=offload)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        wrapped(**batch).backward()
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated() - base
        del model, wrapped
    checkpoints = 8 * 8192 * 512 * 4
    assert peaks[False] - peaks[True] > 0.5 * checkpoints
