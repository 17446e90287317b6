"""Answers of prompt-learning adapters (prompt, p-tuning, prefix): peft's generate under transformers 5
ignores a prefix and decodes prompt tuning wrongly after the first token, so dist-ft decodes them with full
forwards of the PeftModel. Checked against transformers' own cached generate from the virtual tokens'
embeddings, and against the base model (the adapter must change the answer)."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from dist_ft.decoding.generate import Sampling, decode_without_cache, generate_ids  # noqa: E402

PROMPT = [5, 17, 33, 2, 9, 41]
NEW = 10


def tiny_peft(config_cls, seed: int = 0):
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                        eos_token_id=None, bos_token_id=None, pad_token_id=0)).eval()
    model = peft.get_peft_model(base, config_cls(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    return model


def base_answer(model) -> list[int]:
    ids = torch.tensor([PROMPT])
    with model.disable_adapter(), torch.no_grad():
        out = model.base_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                        do_sample=False)
    return out[0, len(PROMPT):].tolist()


def test_prompt_tuning_answers_equal_transformers_cached_generate_from_the_virtual_embeddings():
    model = tiny_peft(peft.PromptTuningConfig)
    ours = decode_without_cache(model, torch.tensor([PROMPT]), Sampling(max_new_tokens=NEW))
    with torch.no_grad():
        virtual = model.get_prompt(batch_size=1)
        embeds = torch.cat([virtual, model.get_input_embeddings()(torch.tensor([PROMPT]))], dim=1)
        reference = model.base_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2]),
                                              max_new_tokens=NEW, do_sample=False)[0].tolist()
    assert ours == reference
    assert ours != base_answer(model)


def test_a_prefix_changes_the_answer_and_every_token_is_the_forwards_argmax():
    model = tiny_peft(peft.PrefixTuningConfig)
    ours = decode_without_cache(model, torch.tensor([PROMPT]), Sampling(max_new_tokens=NEW))
    assert ours != base_answer(model)  # peft's generate returned exactly the base model's answer
    sequence = PROMPT + ours
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0]
    assert [int(logits[len(PROMPT) - 1 + i].argmax()) for i in range(NEW)] == ours


def test_generate_ids_routes_prompt_learning_adapters_and_stops_at_the_end_token():
    model = tiny_peft(peft.PromptTuningConfig)
    full = decode_without_cache(model, torch.tensor([PROMPT]), Sampling(max_new_tokens=NEW))

    class Tokenizer:  # only what generate_ids asks of one
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    stop = full[3]
    text = generate_ids(model, Tokenizer(), PROMPT, Sampling(max_new_tokens=NEW), stop_ids=(stop,))
    assert text == " ".join(map(str, full[:full.index(stop)]))
    lockstep = decode_without_cache(model, torch.tensor([PROMPT]), Sampling(max_new_tokens=NEW),
                                    eos_token_id=stop, every_step=True)
    assert lockstep == full[:full.index(stop)]
