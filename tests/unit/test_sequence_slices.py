"""Each sequence-parallel rank's slice of a batch: labels shifted before slicing, global positions."""

import torch

from dist_ft.rank.loss import IGNORE_INDEX
from dist_ft.rank.sequence_parallel import shard_batch


def batch(length: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(100, 100 + length).unsqueeze(0).repeat(2, 1)
    positions = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)]).repeat(2, 1)
    return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}


def test_slices_put_back_together_are_the_batch_with_labels_shifted_once():
    whole = batch(12)
    slices = [shard_batch(whole, rank, 3) for rank in range(3)]
    assert all(s["input_ids"].shape == (2, 4) and "labels" not in s for s in slices)
    joined = {k: torch.cat([s[k] for s in slices], dim=1) for k in slices[0]}
    assert torch.equal(joined["input_ids"], whole["input_ids"])
    assert torch.equal(joined["position_ids"], whole["position_ids"])
    # the last token of slice 0 is scored against the first token of slice 1
    assert slices[0]["shift_labels"][0, -1] == slices[1]["input_ids"][0, 0]
    assert torch.equal(joined["shift_labels"][:, :-1], whole["labels"][:, 1:])
    assert (joined["shift_labels"][:, -1] == IGNORE_INDEX).all()


def test_a_length_the_degree_does_not_divide_is_padded_with_unscored_continuing_positions():
    whole = batch(7)
    last = shard_batch(whole, 1, 2)
    assert last["input_ids"].shape == (2, 4)
    assert last["position_ids"][0].tolist() == [1, 2, 3, 4]  # the second document's 1..3, then the padding
    assert last["shift_labels"][0, -2:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    joined = torch.cat([shard_batch(whole, r, 2)["shift_labels"] for r in range(2)], dim=1)
    assert int((joined != IGNORE_INDEX).sum()) == 2 * 6  # the same scored tokens as unsharded


def test_document_attention_without_a_mask_keeps_packed_documents_apart_as_transformers_does():
    """Ulysses hands the core attention no mask; sdpa models switch to sdpa_varlen, which finds the
    documents in the positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_ft.rank.attention import SDPA_VARLEN
    from dist_ft.rank.sequence_parallel import use_document_attention

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                         attn_implementation="sdpa")).eval()
    packed = batch(12)
    inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"], "use_cache": False}
    with torch.no_grad():
        expected = model(**inputs).logits
        use_document_attention(model)
        assert model.config._attn_implementation == SDPA_VARLEN
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected)
