"""S²-Attn against a direct reference: one explicit mask per head (causal, same document, same group, the
second half of the heads' groups shifted by half a group), softmax attention written out."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_ft.rank.shifted_sparse import group_bounds, shifted_sparse_attention


def reference(query, key, value, position_ids, group):
    batch, heads, length, dim = query.shape
    key, value = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (key, value))
    out = torch.empty_like(query)
    for b in range(batch):
        pos = position_ids[b].tolist()
        doc = [0] * length
        for i in range(1, length):
            doc[i] = doc[i - 1] + (pos[i] != pos[i - 1] + 1)
        for h in range(heads):
            shift = group // 2 if h >= heads // 2 else 0
            allowed = torch.tensor([[j <= i and doc[i] == doc[j] and (pos[i] + shift) // group == (pos[j] + shift)
                                     // group for j in range(length)] for i in range(length)])
            scores = query[b, h] @ key[b, h].T / math.sqrt(dim)
            out[b, h] = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ value[b, h]
    return out.transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [2, 1, 4])  # GQA, an odd KV count (expanded), one KV head per query head
def test_matches_the_reference_on_packed_rows(kv_heads):
    torch.manual_seed(0)
    positions = torch.tensor([list(range(13)) + list(range(7)) + list(range(4)),
                              list(range(24))])  # three documents packed in row 0, one in row 1
    query = torch.randn(2, 4, 24, 8, requires_grad=True)
    key, value = torch.randn(2, kv_heads, 24, 8), torch.randn(2, kv_heads, 24, 8)
    got, _ = shifted_sparse_attention(None, query, key, value, None, position_ids=positions, group=6)
    want = reference(query, key, value, positions, 6)
    assert torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()


def test_groups_restart_with_each_document_and_the_shifted_half_starts_with_half_a_group():
    positions = torch.tensor(list(range(10)) + list(range(5)))
    assert group_bounds(positions, 4, 0) == [(0, 4), (4, 8), (8, 10), (10, 14), (14, 15)]
    assert group_bounds(positions, 4, 2) == [(0, 2), (2, 6), (6, 10), (10, 12), (12, 15)]


def test_a_group_as_long_as_the_row_is_plain_causal_attention():
    torch.manual_seed(1)
    query, key, value = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    got, _ = shifted_sparse_attention(None, query, key, value, None, group=32)
    want = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(got, want, atol=1e-6)
