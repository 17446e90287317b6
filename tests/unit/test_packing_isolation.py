"""A packed document must see only itself: its logits inside a pack equal its logits alone.

transformers 5 isolates documents through restarting position_ids, but only
with attention_mask=None and use_cache=False; the control case shows the same
check catches leakage.
"""

from __future__ import annotations

import pytest
import torch

from dist_ft.data import BatchStream, pack_documents
from dist_ft.model import build_model

TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 259, "max_position_embeddings": 256}
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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
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
