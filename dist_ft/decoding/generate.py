"""Decoding: answers to prompts with transformers' `generate` (or peft's forward, for prompt-learning
adapters), shared by the ranks (answers scored during a stage) and `dist-ft generate`/`eval`.

Below both rank/ and evaluation/ in the house: imports torch and transformers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_NEW_TOKENS = 32768


class EvalError(Exception):
    """A bad eval/generate request: reported as one line with exit code 2 (`evaluation.eval_model.exit_code`)."""


@dataclass(frozen=True)
class Sampling:
    """How to decode: temperature 0 is greedy (top-k/top-p then do not apply)."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise EvalError(f"--max-new-tokens {self.max_new_tokens} must be in 1..{MAX_NEW_TOKENS}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 100):
            raise EvalError(f"--temperature {self.temperature} must be a number in [0, 100] (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise EvalError(f"--top-k {self.top_k} must be at least 1")
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise EvalError(f"--top-p {self.top_p} must be in (0, 1]")

    def generate_kwargs(self, tokenizer) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
        if self.temperature == 0:
            return {**kwargs, "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p}


def generate_ids(model, tokenizer, prompt_ids: list[int], sampling: Sampling, streamer=None,
                 synced_gpus: bool = False, stop_ids: tuple[int, ...] = ()) -> str:
    """The answer to a prompt given as token ids (as training tokenized it). `synced_gpus`: every rank
    generates together, as ZeRO-3 needs (each forward gathers the layers' weights from all ranks);
    `stop_ids`: tokens that end the answer besides the model's own end-of-sequence tokens."""
    import torch

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    torch.manual_seed(sampling.seed)
    kwargs: dict[str, Any] = {"synced_gpus": True} if synced_gpus else {}
    if stop_ids:
        own = model.generation_config.eos_token_id
        own = [] if own is None else [own] if isinstance(own, int) else list(own)
        kwargs["eos_token_id"] = own + [i for i in stop_ids if i not in own]
    if _is_prompt_learning(model):
        ids = decode_without_cache(model, input_ids, sampling, kwargs.get("eos_token_id"), streamer,
                                   every_step=synced_gpus)
        return tokenizer.decode(ids, skip_special_tokens=True)
    with torch.no_grad():
        ids = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             **sampling.generate_kwargs(tokenizer), streamer=streamer, **kwargs)
    return tokenizer.decode(ids[0, input_ids.shape[1]:], skip_special_tokens=True)


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def decode_without_cache(model, input_ids, sampling: Sampling, eos_token_id=None, streamer=None,
                         every_step: bool = False) -> list[int]:
    """The answer's token ids from full forwards of the PeftModel, one per new token. peft's own generate
    with transformers 5 ignores a prefix-tuning adapter (the answers are the base model's) and decodes a
    prompt-tuning one wrongly from the second token on (its cache positions); the forward is what training,
    evaluation and the export tests use. Without a cache each token costs a forward over the whole
    sequence: fine for the short answers of evaluation. `every_step`: run all max_new_tokens forwards
    (ranks decoding in lockstep under ZeRO-3 then issue the same collectives), then cut at the end token."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    stops = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    warpers = LogitsProcessorList()
    if sampling.temperature > 0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p is not None and sampling.top_p < 1:
            warpers.append(TopPLogitsWarper(sampling.top_p))
    if streamer is not None:
        streamer.put(input_ids.cpu())
    sequence, answer = input_ids, []
    with torch.no_grad():
        for _ in range(sampling.max_new_tokens):
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1, :].float()
            if sampling.temperature > 0:
                scores = warpers(sequence, logits)
                token = torch.multinomial(torch.softmax(scores, dim=-1), 1)
            else:
                token = logits.argmax(dim=-1, keepdim=True)
            sequence = torch.cat([sequence, token.to(sequence.dtype)], dim=1)
            answer.append(int(token))
            if streamer is not None and not (stops & set(answer)):
                streamer.put(token.cpu()[0])
            if int(token) in stops and not every_step:
                break
    if streamer is not None:
        streamer.end()
    cut = next((i for i, t in enumerate(answer) if t in stops), len(answer))
    return answer[:cut]
