"""A packed document must see only itself: its logits inside a pack equal its logits alone.

transformers 5 isolates documents through restarting position_ids, but only
with attention_mask=None and use_cache=False; the control case shows the same
check catches leakage.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_ft.rank.data import BatchStream, pack_documents
from dist_ft.rank.model import build_model
from tests.helpers import wide_llama

TINY = wide_llama(rope_theta=None)
EOS, PAD, SEQ_LEN = 257, 258, 48
DOCUMENTS = [[(7 * i + 3 * j) % 250 for j in range(n)] for i, n in enumerate((9, 20, 5, 30))]


def tiny_model(attn):
    return build_model(name_or_path=None, config_overrides=TINY, attn_implementation=attn,
                       dtype=torch.float32).eval()


def logits(model, input_ids, position_ids=None, **extra):
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids]),
                     position_ids=None if position_ids is None else torch.tensor([position_ids]),
                     use_cache=False, **extra).logits[0]


def segments(row):
    """(start, end) of each segment in a packed row: where position_ids restart at 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    return list(zip(starts, starts[1:] + [len(row["input_ids"])]))


def alone_pieces():
    """Each segment's tokens, as they would be fed alone (a document cut by a row boundary is two pieces)."""
    rows = pack_documents(DOCUMENTS, SEQ_LEN, EOS, pad_id=PAD)
    return rows, [(r, start, end) for r, row in enumerate(rows) for start, end in segments(row)]


@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa", "eager"])
def test_packed_document_logits_equal_the_document_alone(attn):
    model = tiny_model(attn)
    rows, pieces = alone_pieces()
    assert len(rows) == 2 and len(pieces) >= 5  # a document crosses the row boundary
    packed = [logits(model, row["input_ids"], row["position_ids"]) for row in rows]
    for r, start, end in pieces:
        alone = logits(model, rows[r]["input_ids"][start:end])
        torch.testing.assert_close(packed[r][start:end], alone, atol=1e-5, rtol=0)


def test_isolation_holds_for_a_batch_from_the_stream():
    model = tiny_model("sdpa")
    rows, pieces = alone_pieces()
    batch = next(BatchStream(rows, 2, seed=0))
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    for index in range(2):
        row = {k: v[index].tolist() for k, v in batch.items()}
        for start, end in segments(row):
            alone = logits(model, row["input_ids"][start:end])
            torch.testing.assert_close(out[index, start:end], alone, atol=1e-5, rtol=0)


def test_an_all_ones_attention_mask_leaks_across_documents():
    model = tiny_model("sdpa")
    rows, _ = alone_pieces()
    row = rows[0]
    start, end = segments(row)[1]
    leaked = logits(model, row["input_ids"], row["position_ids"],
                    attention_mask=torch.ones(1, SEQ_LEN, dtype=torch.long))
    alone = logits(model, row["input_ids"][start:end])
    assert (leaked[start:end] - alone).abs().max() > 1e-3


# ---- flash-attn: transformers' real dispatch, with a pure-torch kernel standing in for flash_attn ----

def _dense_kernel(q, k, v, causal=True, softmax_scale=None, **_):
    """flash_attn_func's contract ([batch, seq, heads, dim], fewer KV heads allowed) in plain torch."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale).transpose(1, 2)


def _varlen_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, causal=True,
                   softmax_scale=None, **_):
    """flash_attn_varlen_func: each [start, end) of cu_seqlens is a sequence of its own."""
    bounds = cu_seqlens_q.tolist()
    return torch.cat([_dense_kernel(q[None, s:e], k[None, s:e], v[None, s:e], causal, softmax_scale)[0]
                      for s, e in zip(bounds, bounds[1:])])


@pytest.fixture
def flash_model(monkeypatch):
    import transformers.modeling_flash_attention_utils as fa

    kernels = ((_dense_kernel, _varlen_kernel, None, None, None),
               (fa._lazy_define_process_function(_varlen_kernel), dict))
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *args, **kwargs: kernels)
    model = tiny_model("sdpa")
    model.config._attn_implementation = "flash_attention_2"  # flash_attn itself is not installed here
    return model


def test_flash_attention_isolates_packed_documents_only_in_a_one_row_batch(flash_model):
    """Why the plan gives packed rows under flash_attention_2 a micro-batch of one: transformers
    derives the document boundaries (varlen) from position_ids only when the batch has one row."""
    rows, _ = alone_pieces()
    input_ids = torch.tensor([row["input_ids"] for row in rows])
    position_ids = torch.tensor([row["position_ids"] for row in rows])
    with torch.no_grad():
        isolated = tiny_model("sdpa")(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        one_row = [flash_model(input_ids=input_ids[i:i + 1], position_ids=position_ids[i:i + 1],
                               use_cache=False).logits[0] for i in range(2)]
        two_rows = flash_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(torch.stack(one_row), isolated, atol=1e-5, rtol=0)
    assert (two_rows - isolated).abs().max() > 1e-2


def test_sdpa_varlen_takes_one_row_of_positions_for_a_batch_and_refuses_cached_keys():
    from dist_ft.rank.attention import sdpa_varlen_attention

    module = torch.nn.Module()
    query = torch.randn(2, 4, 6, 8)
    out, _ = sdpa_varlen_attention(module, query, query, query, None, position_ids=torch.arange(6)[None])
    expected = torch.nn.functional.scaled_dot_product_attention(query, query, query, is_causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))
    with pytest.raises(ValueError, match="as many keys as queries"):
        sdpa_varlen_attention(module, query, torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8), None)


def test_examples_packed_best_fit_decreasing_each_see_only_themselves(tmp_path):
    """The default fine-tuning packing: each example's logits inside its row equal the example alone."""
    import json

    from dist_ft.rank.data.packed import PackedExamples
    from dist_ft.rank.tokenizer import byte_tokenizer
    from dist_ft.store import EXAMPLES, BadRows, SourceSpec, build_store

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": "q" * (3 + 5 * i), "output": "a" * (2 + i % 3)}) + "\n"
                            for i in range(6)))
    store, _ = build_store(SourceSpec(EXAMPLES, (str(data),), "text", "instruction", "Q: {instruction}\\nA: "),
                           byte_tokenizer(), tmp_path / "s", progress=False)
    packed = PackedExamples(store, 96, seed=0, packing=True, bad=BadRows(), method="best_fit_decreasing")
    model = tiny_model("sdpa_varlen")
    seen = 0
    for row in packed:
        out = logits(model, row["input_ids"], row["position_ids"])
        for start, end in segments(row):
            torch.testing.assert_close(out[start:end], logits(model, row["input_ids"][start:end]), atol=1e-5, rtol=0)
            seen += 1
    assert len(packed) < store.count == seen == 6
