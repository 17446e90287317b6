"""`dist-ft generate`: sample any export (full model, adapter over its base, merged, a run dir's last
finished stage) with transformers' own `generate`. One prompt streams to the terminal; a JSONL file of
prompts writes JSONL (prompt, output, and the row's reference when it has one).

A row of a prompts file is {"prompt": TEXT} or an instruction row {"instruction", "input"?, "output"?}
rendered as fine-tuning renders it (`prompts.instruction_prompt`, or the chat template with --chat);
its "output" or "reference" is carried along as the reference answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from dist_ft.recipe.config import TORCH_DTYPE_NAMES
from dist_ft.recipe.prompts import instruction_prompt
from dist_ft.decoding.generate import EvalError, Sampling, generate_ids
from dist_ft.decoding.task_metrics import METRICS, score
from .eval_model import RopeVariant, exit_code, load_eval_tokenizer, load_variant, resolve_target

MAX_PROMPTS = 100_000
DTYPES = ("fp32", "bf16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF model dir, adapter dir, run dir (last finished stage) or package:NAME")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt: the answer streams to the terminal")
    source.add_argument("--prompts", help="JSONL file of prompts: writes JSONL (see --out)")
    p.add_argument("--out", help="JSONL output for --prompts (default: standard output)")
    p.add_argument("--metrics", help=f"with --prompts: score answers against the rows' references "
                                     f"({', '.join(METRICS)}, comma-separated); printed and written to OUT.metrics.json")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--gguf-file", help="GGUF file inside the model dir")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def main_from_args(args: argparse.Namespace) -> int:
    return exit_code(lambda: generate_from_args(args), args.debug)


def generate_from_args(args: argparse.Namespace) -> None:
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    rows = [{"prompt": args.prompt}] if args.prompt is not None else read_prompts(Path(args.prompts))
    metrics = metric_names(args.metrics, rows)
    model, tokenizer = load_for_generation(args.model, args.gguf_file, args.dtype)
    # stderr: standard output carries only the answers (a JSONL file when --prompts has no --out)
    print(f"[generate] {args.model}: {args.dtype} on {model.device.type}", file=sys.stderr, flush=True)
    if args.chat and not tokenizer.chat_template:
        raise EvalError(f"{args.model}: the tokenizer has no chat template; drop --chat")
    if args.prompt is not None:
        stream_one(model, tokenizer, render_prompt(rows[0], tokenizer, args.chat), sampling)
        return
    records = []
    with _output(args.out) as out:
        for record in generate_rows(model, tokenizer, rows, sampling, args.chat):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            records.append(record)
    if metrics:
        report_metrics(metrics, records, args.out)


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The prompts file's rows; every malformed line is named in one error (nothing is generated)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"--prompts {path}: cannot read it ({err})") from None
    rows, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict) or not _has_prompt(row):
            problems.append(number)
            continue
        rows.append(row)
    if problems:
        raise EvalError(f"--prompts {path}: line(s) {problems[:10]} are not JSON objects with a string "
                        "`prompt` or `instruction`")
    if not rows or len(rows) > MAX_PROMPTS:
        raise EvalError(f"--prompts {path}: {len(rows)} prompts; give 1..{MAX_PROMPTS}")
    return rows


def metric_names(text: str | None, rows: list[dict[str, Any]]) -> list[str]:
    if not text:
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise EvalError(f"--metrics {text!r}: choose from {', '.join(METRICS)}")
    if any(not isinstance(row.get("reference", row.get("output")), str) for row in rows):
        raise EvalError("--metrics needs a reference (`output` or `reference`) in every row of --prompts")
    return names


def report_metrics(names: list[str], records: list[dict[str, Any]], out: str | None) -> dict[str, float]:
    values = score(names, [r["output"] for r in records], [r["reference"] for r in records])
    line = "  ".join(f"{name} {value:.2f}" for name, value in values.items())
    print(f"{len(records)} prompts: {line}", file=sys.stderr)
    if out:
        Path(f"{out}.metrics.json").write_text(json.dumps({"prompts": len(records), **values}, indent=1) + "\n")
    return values


def _has_prompt(row: dict[str, Any]) -> bool:
    key = "prompt" if "prompt" in row else "instruction"
    return isinstance(row.get(key), str) and bool(row[key].strip()) and isinstance(row.get("input", ""), str)


def render_prompt(row: dict[str, Any], tokenizer, chat: bool) -> str:
    """The text the model continues: the prompt as given, an instruction row as fine-tuning renders
    it; with `chat`, the user turn of the tokenizer's chat template plus its generation prompt."""
    if "prompt" in row:
        user = row["prompt"]
    elif chat:
        user = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    else:
        return instruction_prompt(None, row["instruction"], row.get("input") or "")
    if not chat:
        return user
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


def load_for_generation(spec: str, gguf_file: str | None, dtype: str):
    """(model in eval mode, tokenizer) for any export; a prompt-learning adapter stays a PeftModel,
    whose generate prepends its virtual tokens; layer adapters (LoRA, DoRA, IA3) are merged into the
    weights, which gives the same answers several times faster."""
    import torch

    target = resolve_target(spec, gguf_file, virtual_tokens=True)
    model = load_variant(target, RopeVariant("keep"), getattr(torch, TORCH_DTYPE_NAMES[dtype]),
                         keep_peft_model=True)
    config = getattr(model, "active_peft_config", None)
    if config is not None and not config.is_prompt_learning:
        model = model.merge_and_unload()
    return model, load_eval_tokenizer(target)


def generate_one(model, tokenizer, prompt: str, sampling: Sampling, streamer=None) -> str:
    ids = tokenizer(prompt, add_special_tokens=not _has_bos(tokenizer, prompt))["input_ids"]
    return generate_ids(model, tokenizer, ids, sampling, streamer=streamer)


def _has_bos(tokenizer, prompt: str) -> bool:
    """A chat template usually writes the BOS itself: do not add a second one."""
    return bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)


def stream_one(model, tokenizer, prompt: str, sampling: Sampling) -> str:
    from transformers import TextStreamer

    return generate_one(model, tokenizer, prompt, sampling,
                        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))


def generate_rows(model, tokenizer, rows: list[dict[str, Any]], sampling: Sampling,
                  chat: bool) -> Iterator[dict[str, Any]]:
    for row in rows:
        prompt = render_prompt(row, tokenizer, chat)
        record = {"prompt": prompt, "output": generate_one(model, tokenizer, prompt, sampling)}
        reference = row.get("reference", row.get("output"))
        if isinstance(reference, str):
            record["reference"] = reference
        yield record


class _output:
    """Standard output, or a file written next to its final name and renamed when complete."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None

    def __enter__(self):
        if self.path is None:
            return sys.stdout
        try:
            self.tmp = self.path.with_name(f".{self.path.name}.partial")
            self.handle = open(self.tmp, "w", encoding="utf-8")
        except OSError as err:
            raise EvalError(f"--out {self.path}: cannot write it ({err})") from None
        return self.handle

    def __exit__(self, kind, *_):
        if self.path is None:
            return
        self.handle.close()
        if kind is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)
