"""Evaluation during a stage, on every rank: the validation loss and perplexity, scores of generated answers
against their references (`decoding.task_metrics`), samples (`finetune.samples`) written to
RUN/stages/<stage>/samples.jsonl and a W&B table, and the test set once after the stage.

Every rank issues the same collectives whatever its data: each runs the loss over the same validation
rows (ZeRO-3 gathers each layer on every forward). Answers are generated with transformers' `generate`
(`decoding.generate.generate_ids`): on rank 0 alone under ZeRO-1/2, where it holds whole weights; under
ZeRO-3 every rank generates the same answers in lockstep (`synced_gpus`), taking part in each layer's
gather. The other ranks then wait in the broadcast of rank 0's numbers, so all ranks return the same
values and reach the same early-stopping verdict (loop.py).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from dist_ft.decoding.bands import Band
from dist_ft.decoding.generate import Sampling, generate_ids
from dist_ft.decoding.task_metrics import score
from dist_ft.plan.plan import StagePlan
from dist_ft.plan.run_dir import StageDir
from dist_ft.recipe.config import ANSWER_METRICS
from . import engine as ds
from .data import answer_examples, collate, prompt_ids
from .distributed import DistEnv
from .position_bands import band_losses

Example = tuple[list[int], list[int] | None]  # (prompt ids, reference ids or None)


@dataclass
class StageEvaluation:
    stage: StagePlan
    engine: Any
    tokenizer: Any
    env: DistEnv
    folder: StageDir
    validation: list[dict[str, list[int]]]
    test_rows: list[dict[str, list[int]]]
    eval_copies: int = 1
    metrics: Any = None  # rank 0's metrics sink (log_samples); set when the stage's metrics open
    bands: list[Band] | None = None  # a long-context stage's position bands: validation loss per band

    @property
    def active(self) -> bool:
        """Whether there is anything to evaluate (validation data or samples)."""
        return bool(self.validation) or self.stage.samples is not None

    def evaluate(self, step: int) -> dict[str, float]:
        """The validation metrics (eval_<name>) after `step`, the same on every rank, and the samples."""
        values = self._scores("eval", self.validation) if self.validation else {}
        self.samples(step)
        return values

    def test(self, step: int) -> dict[str, float]:
        """The test metrics (test_<name>) of the weights the stage exported; rank 0 writes test_metrics.json."""
        if not self.test_rows:
            return {}
        values = self._scores("test", self.test_rows)
        if self.env.is_main:
            record = {"step": step, "rows": len(self.test_rows), **values}
            self.folder.test_metrics.write_text(json.dumps(record, indent=1) + "\n")
        return values

    def samples(self, step: int) -> None:
        """Generate the samples; rank 0 appends them to samples.jsonl and logs a W&B table."""
        examples = self._sample_examples()
        if not examples:
            return
        outputs = self._generate([p for p, _ in examples], [self.stage.samples.max_new_tokens] * len(examples))
        if not self.env.is_main:
            return
        rows = [{"step": step, "prompt": self._text(p, special=True), "output": output,
                 "reference": None if ref is None else self._text(ref)}
                for (p, ref), output in zip(examples, outputs)]
        self.folder.samples.parent.mkdir(parents=True, exist_ok=True)
        with open(self.folder.samples, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if self.metrics is not None:
            self.metrics.log_samples(step, rows)

    def _scores(self, split: str, rows: list[dict[str, list[int]]]) -> dict[str, float]:
        wanted = self.stage.metrics
        values: dict[str, float] = {}
        if "loss" in wanted or "perplexity" in wanted:
            loss = evaluate_loss(self.engine, rows, self.eval_copies)
            if "loss" in wanted:
                values[f"{split}_loss"] = loss
            if "perplexity" in wanted:
                values[f"{split}_perplexity"] = perplexity(loss)
        if self.bands:
            self.engine.eval()
            by_band = band_losses(self.engine.module.lm, rows, self.bands, self.engine.device)
            self.engine.train()
            values.update({f"{split}_{name}": value for name, value in by_band.items()})
        answers = [name for name in wanted if name in ANSWER_METRICS]
        if answers:
            examples = answer_examples(rows)[:self.stage.metric_rows]
            # An answer longer than its reference cannot match it: generating more only costs time.
            outputs = self._generate([p for p, _ in examples], [len(r) for _, r in examples])
            if self.env.is_main:
                scores = score(answers, outputs, [self._text(r) for _, r in examples])
                values.update({f"{split}_{name}": value for name, value in scores.items()})
        return ds.broadcast_from_main(values if self.env.is_main else None)

    def _sample_examples(self) -> list[Example]:
        samples = self.stage.samples
        if samples is None:
            return []
        fixed: list[Example] = []
        for text in samples.prompts:
            ids = prompt_ids(text, self.tokenizer, self.stage.data_format, self.stage.template, self.stage.seq_len)
            if ids is None:
                self.env.say(f"[{self.stage.name}] sample prompt {text[:40]!r} does not fit seq_len "
                             f"{self.stage.seq_len}: skipped")
            else:
                fixed.append((ids, None))
        held_out = answer_examples(self.validation)[:samples.from_validation] if samples.from_validation else []
        return fixed + held_out

    def _generate(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[str] | None:
        """Answers on rank 0 (None elsewhere); under ZeRO-3 every rank generates them together."""
        zero3 = ds.is_zero3(self.engine)
        if not (self.env.is_main or zero3):
            return None
        stop = (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
        with generation_mode(self.engine) as model:
            return [generate_ids(model, self.tokenizer, ids, Sampling(max_new_tokens=n), synced_gpus=zero3,
                                 stop_ids=stop)
                    for ids, n in zip(prompts, max_new_tokens)]

    def _text(self, ids: list[int], special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=not special)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # beyond e^700 a float overflows; such a model is unusable anyway


GENERATION_ATTENTION = "sdpa"


@contextlib.contextmanager
def generation_mode(engine) -> Iterator[Any]:
    """The engine's model ready to generate: eval mode, no gradients, the training RNG untouched (the
    seeded generation forks it), and transformers' sdpa attention for the duration — exact for one
    unpacked prompt, and it takes a KV cache, which sdpa_varlen does not. Under Ulysses sequence
    parallelism DeepSpeed wraps the model's own attention (flash or sdpa_varlen, never plain sdpa:
    `use_document_attention`), so generation runs unsplit, outside the sequence-parallel all-to-all."""
    model = engine.module.lm
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = base.config._attn_implementation
    engine.eval()
    if attention != GENERATION_ATTENTION:
        base.set_attn_implementation(GENERATION_ATTENTION)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield model
    finally:
        if attention != GENERATION_ATTENTION:
            base.set_attn_implementation(attention)
        engine.train()


@torch.no_grad()
def evaluate_loss(engine, rows: list, copies: int = 1) -> float:
    """Mean per-row loss over the whole validation split, one row at a time, on every rank: the
    split is small, ZeRO-3 needs every rank to run the same forwards anyway, and the number is
    then exactly what a plain reload of the exported model computes.

    DeepSpeed's Ulysses attention only takes batches of the training micro-batch size: there each
    row goes in as `copies` identical rows, whose mean loss is the row's own."""
    engine.eval()
    losses = [engine(**{k: v.to(engine.device) for k, v in collate([row] * copies).items()}).item()
              for row in rows]
    engine.train()
    return sum(losses) / len(losses)
