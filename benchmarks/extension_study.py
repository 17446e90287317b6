#!/usr/bin/env python
"""A context-extension study in miniature, on CPU: pretrain short, extend with each RoPE method, measure.

    .venv/bin/python benchmarks/extension_study.py [--profile full|ci] [--out DIR] [--force] [--docs]

1. Pretrain a small Llama-shaped model (random init, byte tokenizer) at its native context on Python
   standard-library packages (`dist-ft launch` of a generated recipe, one stage at the native length),
   checkpointing along the way; the held-out perplexity of every checkpoint is the plateau curve.
2. From that one base, one branch per RoPE method, each a `dist-ft launch` of a generated recipe that
   continues pretraining at 4x the native context on other stdlib packages, same token budget per
   branch: none (no scaling), linear (PI), YaRN, YaRN progressive (2x then 4x, half the tokens each),
   rope_theta raise. Dynamic NTK is evaluated zero-shot only (it is an inference-time rule).
3. Every model is evaluated zero-shot (the base with each RoPE variant) and after its stage with
   dist-ft's own evaluation functions (`dist_ft.evaluation.evaluate.perplexity_at`,
   `dist_ft.evaluation.eval_passkey.passkey_grid`, models loaded by `dist_ft.evaluation.eval_model.load_variant`):
   perplexity per position band at 1x, 2x, 4x the native context on held-out stdlib modules that no stage
   trains on, one window per held-out excerpt
   (spread across windows reported), and passkey retrieval on a length x depth grid.

Writes OUT/study.json (every number), OUT/table.md, OUT/*.png; with --docs also docs/img/extension-study-*.
The `ci` profile is the short version the slow test runs (tests/integration/test_extension_study.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])

# Pretraining and extension read disjoint stdlib packages; held-out text comes from top-level modules,
# which none of these packages contains.
PRETRAIN_PACKAGES = ["asyncio", "email", "xml", "http", "urllib", "logging", "json", "concurrent", "collections",
                     "wsgiref", "re", "tomllib"]
EXTEND_PACKAGES = ["multiprocessing", "importlib", "xmlrpc"]
HELDOUT_MODULES = ["argparse", "ast", "calendar", "configparser", "dataclasses", "difflib", "inspect", "pathlib",
                   "subprocess", "textwrap", "typing", "tarfile", "shutil", "pickle", "threading", "tempfile",
                   "functools", "enum", "statistics", "fractions", "gettext", "locale", "smtplib", "zipfile"]


@dataclass(frozen=True)
class Profile:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    native: int  # pre-training context; branches extend it 4x
    pretrain_steps: int
    checkpoint_every: int
    tokens_per_step: int
    pretrain_lr: float
    branch_tokens: int  # per branch, whatever its stages
    branch_lr: float
    heldout_files: int  # one excerpt of 4x native tokens each
    passkey_depths: tuple[float, ...]
    passkey_trials: int
    methods: tuple[str, ...]
    factor: int = 4
    warmup_steps: int = 10
    more_pretrain_packages: tuple[str, ...] = ()  # more text, so a long pretraining sees each byte only ~twice


PROFILES = {
    # Pretraining 800 steps: the 1200-step run (docs/extension-study.md) bought < 3.3 % per 100 steps after
    # step 700 and 4.5 % over its last 300 steps, for 63 minutes in all; 800 steps keep the study under ~45.
    "full": Profile(hidden=256, intermediate=768, layers=4, heads=4, kv_heads=4, native=256, pretrain_steps=800,
                    checkpoint_every=100, tokens_per_step=8192, pretrain_lr=3e-3, branch_tokens=327_680,
                    branch_lr=1e-3, heldout_files=16, passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), passkey_trials=10,
                    methods=("none", "linear", "yarn", "yarn-progressive", "theta"),
                    more_pretrain_packages=("unittest", "idlelib", "tkinter", "lib2to3", "distutils")),
    # The slow CI test: YaRN only, ~2-3 minutes.
    "ci": Profile(hidden=128, intermediate=384, layers=2, heads=4, kv_heads=4, native=128, pretrain_steps=70,
                  checkpoint_every=70, tokens_per_step=4096, pretrain_lr=3e-3, branch_tokens=81_920,
                  branch_lr=1e-3, heldout_files=12, passkey_depths=(), passkey_trials=0, methods=("yarn",),
                  warmup_steps=5),
}
# Issue 28: the ci setup (same base, data, tokens, lr and seed), its YaRN x4 stage trained by each method, with
# and without S²-Attn. A branch is named rope[+method][+s2].
METHOD_BRANCHES = ("yarn", "yarn+longlora", "yarn+lora", "yarn+s2", "yarn+longlora+s2", "yarn+lora+s2")
PROFILES["methods"] = replace(PROFILES["ci"], methods=METHOD_BRANCHES)  # measured: docs/extension-study.md
PROFILES["methods-full"] = replace(PROFILES["full"], methods=METHOD_BRANCHES)  # not run yet (~45 minutes)
ZERO_SHOT = ("none", "linear", "dynamic", "yarn", "theta")
COLOURS = {"none": "C0", "linear": "C1", "dynamic": "C2", "yarn": "C3", "theta": "C4", "yarn-progressive": "C5",
           "yarn-progressive@2x": "C6"}


def ntk_theta(base: float, factor: float, head_dim: int) -> float:
    """NTK-aware base: theta * s^(d/(d-2)) keeps the lowest frequency's wavelength growing with the context."""
    return base * factor ** (head_dim / (head_dim - 2))


# ---- data ----------------------------------------------------------------------------------------

def heldout_text(profile: Profile, path: Path) -> list[str]:
    """One excerpt of exactly 4x native bytes (ASCII) per held-out module, from a line start a third of the way
    in (past licence headers and module docstrings), so each long window is one file."""
    length = profile.native * profile.factor
    pieces, used = [], []
    for name in HELDOUT_MODULES:
        file = STDLIB / f"{name}.py"
        if not file.is_file():
            continue
        text = file.read_text(encoding="utf-8", errors="replace").encode("ascii", "replace").decode()
        start = text.find("\n", len(text) // 3) + 1
        piece = text[start:start + length - 1]
        if len(piece) < length - 1:
            continue
        pieces.append(piece + "\n")
        used.append(name)
        if len(pieces) == profile.heldout_files:
            break
    path.write_text("".join(pieces))
    return used


def data_paths(packages: list[str]) -> list[str]:
    return [str(STDLIB / p) for p in packages if (STDLIB / p).is_dir()]


# ---- recipes and launches ------------------------------------------------------------------------

def model_config(profile: Profile) -> dict:
    return {"model_type": "llama", "hidden_size": profile.hidden, "intermediate_size": profile.intermediate,
            "num_hidden_layers": profile.layers, "num_attention_heads": profile.heads,
            "num_key_value_heads": profile.kv_heads, "max_position_embeddings": profile.native, "vocab_size": 259,
            "rope_theta": 10000.0}


def recipe(name: str, model: dict, stages: list[dict], paths: list[str], profile: Profile, root: Path,
           keep_last: int = 2, every: int | None = None) -> dict:
    return {"name": name, "seed": 0, "model": model,
            "long_context": {"tokens_per_step": profile.tokens_per_step,
                             "data": {"paths": paths, "long_documents": "split"}, "stages": stages},
            "cluster": {"nodes": 1, "gpus_per_node": 0, "procs_per_node": 2},
            "parallelism": {"zero_stage": 2}, "tracking": {"mode": "disabled"},
            "checkpointing": {"every_steps": every, "keep_last": keep_last, "output_root": str(root)}}


def branch_stages(branch: str, profile: Profile, theta: float) -> list[dict]:
    target = profile.native * profile.factor
    method, *extras = branch.split("+")
    adapter = next((e for e in extras if e != "s2"), "full")
    common = {"lr": profile.branch_lr, "warmup_steps": 2, "method": adapter}
    if method == "yarn-progressive":
        half = profile.branch_tokens // 2
        return [{"name": f"ctx{target // 2}", "seq_len": target // 2, "tokens": half, "rope": {"type": "yarn"},
                 **common},
                {"name": f"ctx{target}", "seq_len": target, "tokens": half, "rope": {"type": "yarn"}, **common}]
    rope = {"none": {"type": "none"}, "linear": {"type": "linear"}, "yarn": {"type": "yarn"},
            "theta": {"type": "none", "rope_theta": theta}}[method]
    return [{"name": f"ctx{target}", "seq_len": target, "tokens": profile.branch_tokens, "rope": rope, **common}]


def launch(recipe_dict: dict, recipes: Path, logs: Path, echo) -> dict:
    """`dist-ft launch` of a generated recipe; returns wall time and, per stage, tokens and step time."""
    import yaml

    name = recipe_dict["name"]
    path = recipes / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/dist-ft/torch_extensions"))}
    started = time.monotonic()
    with open(logs / f"{name}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "dist_ft", "launch", str(path)], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"dist-ft launch {path} failed (exit {proc.returncode}); see {logs / f'{name}.log'}")
    run_dir = Path(recipe_dict["checkpointing"]["output_root"]) / name
    stages = {}
    for stage in recipe_dict["long_context"]["stages"]:
        rows = [json.loads(line) for line in (run_dir / "stages" / stage["name"] / "metrics.jsonl").open()]
        steps = [r for r in rows if "loss" in r]
        rank0 = json.loads((run_dir / "stages" / stage["name"] / "ranks" / "rank0.json").read_text())
        stages[stage["name"]] = {"steps": len(steps), "tokens": steps[-1]["tokens_seen"],
                                 "trainable": rank0.get("trainable_elements"), "params": rank0["param_elements_total"],
                                 "peak_memory_gib": max(r.get("peak_memory_gib", 0) for r in steps),
                                 "step_s_median": statistics.median(r["step_time_s"] for r in steps[1:] or steps),
                                 "train_s": round(sum(r.get("step_time_s", 0) for r in steps), 1),
                                 "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
                                 "losses": [(r["tokens_seen"], r["loss"]) for r in steps]}
    echo(f"[study] {name}: {wall:.0f} s, " + ", ".join(
        f"{s}: {v['steps']} steps, {v['tokens']:,} tokens, loss {v['loss_first']:.3f} -> {v['loss_last']:.3f}"
        for s, v in stages.items()))
    return {"run_dir": str(run_dir), "wall_s": round(wall, 1), "stages": stages,
            "export": str(run_dir / "stages" / recipe_dict["long_context"]["stages"][-1]["name"] / "export")}


# ---- evaluation (dist-ft's own functions) ---------------------------------------------------------

def lengths(profile: Profile) -> list[int]:
    return [profile.native, profile.native * 2, profile.native * profile.factor]


def perplexity_windows(model, ids: list[int], length: int, all_lengths: list[int], native: int) -> dict:
    """Band perplexity pooled over every window of `length` in the held-out ids, plus each window's own."""
    from dist_ft.evaluation.evaluate import perplexity_at

    per_window = [perplexity_at(model, ids[i * length:(i + 1) * length], length, 1, all_lengths, native)
                  for i in range(len(ids) // length)]
    bands = []
    for j, first in enumerate(per_window[0]["bands"]):
        rows = [w["bands"][j] for w in per_window]
        tokens = sum(r["tokens"] for r in rows)
        nll = sum(math.log(r["ppl"]) * r["tokens"] for r in rows)
        logs = [math.log(r["ppl"]) for r in rows]
        se = statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else float("nan")
        bands.append({"band": first["band"], "start": first["start"], "end": first["end"], "tokens": tokens,
                      "ppl": math.exp(nll / tokens), "se_log": se,
                      "window_ppl": [round(r["ppl"], 4) for r in rows]})
    return {"windows": len(per_window), "bands": bands}


def evaluate_model(model_dir: str, rope: str, factor: float | None, profile: Profile, ids: list[int],
                   tokenizer, echo, label: str) -> dict:
    import torch

    from dist_ft.evaluation.eval_model import RopeVariant, load_variant, resolve_target
    from dist_ft.evaluation.eval_passkey import passkey_grid

    started = time.monotonic()
    model = load_variant(resolve_target(model_dir, None), RopeVariant(rope, factor), torch.float32)
    result = {"model_dir": model_dir, "rope": rope, "factor": factor,
              "rope_parameters": model.config.rope_parameters, "perplexity": {}}
    for length in lengths(profile):
        result["perplexity"][str(length)] = perplexity_windows(model, ids, length, lengths(profile), profile.native)
    if profile.passkey_trials:
        result["passkey"] = passkey_grid(model, tokenizer, lengths(profile), list(profile.passkey_depths),
                                         profile.passkey_trials, seed=0)
        result["passkey_trials"] = profile.passkey_trials
    result["eval_s"] = round(time.monotonic() - started, 1)
    long = result["perplexity"][str(lengths(profile)[-1])]["bands"]
    echo(f"[study] eval {label}: @{lengths(profile)[-1]} " + "  ".join(f"{b['band']}: {b['ppl']:.2f}" for b in long)
         + (f"  passkey mean {mean_passkey(result):.2f}" if "passkey" in result else "")
         + f" ({result['eval_s']:.0f} s)")
    return result


def mean_passkey(result: dict) -> float:
    cells = [a for row in result["passkey"].values() for a in row.values()]
    return sum(cells) / len(cells)


def theta_copy(export: Path, dest: Path, theta: float) -> str:
    """The base export with only rope_theta raised: the zero-shot picture of the theta branch."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in export.iterdir():
        if item.name != "config.json":
            shutil.copy2(item, dest / item.name)
    config = json.loads((export / "config.json").read_text())
    config["rope_theta"] = theta
    config["rope_parameters"] = {**config.get("rope_parameters", {}), "rope_theta": theta}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return str(dest)


def plateau_curve(run: dict, stage: str, profile: Profile, ids: list[int], echo) -> list[dict]:
    """Held-out perplexity at the native context of every pretraining checkpoint (ZeRO-2 keeps whole weights)."""
    import torch

    from dist_ft.evaluation.eval_model import RopeVariant, load_variant, resolve_target

    model = load_variant(resolve_target(run["export"], None), RopeVariant("keep", None), torch.float32)
    points = []
    for ckpt in sorted((Path(run["run_dir"]) / "stages" / stage / "checkpoints").glob("step_*")):
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        model.load_state_dict({k.removeprefix("lm."): v for k, v in state["module"].items()})
        step = int(ckpt.name.split("_")[1])
        row = perplexity_windows(model, ids, profile.native, [profile.native], profile.native)
        pooled = math.exp(sum(math.log(b["ppl"]) * b["tokens"] for b in row["bands"])
                          / sum(b["tokens"] for b in row["bands"]))
        points.append({"step": step, "tokens": step * profile.tokens_per_step, "ppl": pooled})
        echo(f"[study] pretrain checkpoint step {step}: held-out ppl @{profile.native} {pooled:.3f}")
    return points


# ---- the study -----------------------------------------------------------------------------------

@dataclass
class Study:
    profile: str
    out: str
    heldout_modules: list[str] = field(default_factory=list)
    theta: float = 0.0
    runs: dict = field(default_factory=dict)
    plateau: list = field(default_factory=list)
    zero_shot: dict = field(default_factory=dict)
    trained: dict = field(default_factory=dict)
    wall_s: float = 0.0


def run_study(profile_name: str, out: Path, echo=print) -> Study:
    import torch

    from dist_ft.rank.model import load_tokenizer

    profile = PROFILES[profile_name]
    started = time.monotonic()
    torch.set_num_threads(2)
    for sub in ("recipes", "logs", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    recipes, logs, root = out / "recipes", out / "logs", out / "runs"
    study = Study(profile_name, str(out))
    study.heldout_modules = heldout_text(profile, out / "heldout.txt")
    theta = round(ntk_theta(10000.0, profile.factor, profile.hidden // profile.heads))
    study.theta = theta

    base_recipe = recipe("base", {"config": model_config(profile), "tokenizer": "byte", "dtype": "fp32"},
                         [{"name": "pretrain", "seq_len": profile.native, "steps": profile.pretrain_steps,
                           "lr": profile.pretrain_lr, "warmup_steps": profile.warmup_steps,
                           "rope": {"type": "none"}}],
                         data_paths(PRETRAIN_PACKAGES + list(profile.more_pretrain_packages)), profile, root,
                         keep_last=1000,
                         every=profile.checkpoint_every)
    study.runs["base"] = base = launch(base_recipe, recipes, logs, echo)
    tokenizer = load_tokenizer(base["export"])
    ids = tokenizer((out / "heldout.txt").read_text(), add_special_tokens=False)["input_ids"]
    study.plateau = plateau_curve(base, "pretrain", profile, ids, echo)

    zero = {"none": ("none", None), "linear": ("linear", profile.factor), "dynamic": ("dynamic", profile.factor),
            "yarn": ("yarn", profile.factor)}
    wanted = ZERO_SHOT if profile_name == "full" else ("none", "yarn")
    for name in wanted:
        if name == "theta":
            study.zero_shot[name] = evaluate_model(theta_copy(Path(base["export"]), out / "base-theta", theta),
                                                   "keep", None, profile, ids, tokenizer, echo, "zero-shot theta")
        else:
            study.zero_shot[name] = evaluate_model(base["export"], *zero[name], profile, ids, tokenizer, echo,
                                                   f"zero-shot {name}")
    for method in profile.methods:
        model = {"name_or_path": base["export"], "dtype": "fp32"}
        branch = recipe(f"branch-{method.replace('+', '-')}", model, branch_stages(method, profile, theta),
                        data_paths(EXTEND_PACKAGES), profile, root)
        if method.endswith("+s2"):
            branch["long_context"]["attention"] = "shifted_sparse"
        run = launch(branch, recipes, logs, echo)
        study.runs[method] = run
        study.trained[method] = evaluate_model(run["export"], "keep", None, profile, ids, tokenizer, echo,
                                               f"trained {method}")
        if method == "yarn-progressive":
            first = Path(run["run_dir"]) / "stages" / next(iter(run["stages"])) / "export"
            study.trained["yarn-progressive@2x"] = evaluate_model(str(first), "keep", None, profile, ids, tokenizer,
                                                                  echo, "trained yarn-progressive after 2x")
    study.wall_s = round(time.monotonic() - started, 1)
    return study


# ---- report --------------------------------------------------------------------------------------

def band(result: dict, length: int, start: int) -> dict:
    return next(b for b in result["perplexity"][str(length)]["bands"] if b["start"] == start)


def cell(b: dict) -> str:
    se = b["se_log"]
    return f"{b['ppl']:.2f} ±{100 * (math.exp(se) - 1):.0f}%" if se == se else f"{b['ppl']:.2f}"


def table(study: Study) -> str:
    profile = PROFILES[study.profile]
    n, long = profile.native, profile.native * profile.factor
    head = (f"| branch | stage | ppl @{n} (all) | @{long}: 0–{n} | {n}–{2 * n} | {2 * n}–{long} | passkey "
            f"| tokens | wall |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]

    def row(name: str, kind: str, result: dict, run: dict | None) -> None:
        short = result["perplexity"][str(n)]
        pooled = math.exp(sum(math.log(b["ppl"]) * b["tokens"] for b in short["bands"])
                          / sum(b["tokens"] for b in short["bands"]))
        bands = [cell(band(result, long, s)) for s in (0, n, 2 * n)]
        passkey = f"{mean_passkey(result):.2f}" if "passkey" in result else "–"
        tokens = f"{sum(s['tokens'] for s in run['stages'].values()):,}" if run else "0"
        wall = (f"{run['wall_s']:.0f} s" if run["wall_s"] == run["wall_s"] else "(in the row above)") if run \
            else f"{result['eval_s']:.0f} s eval"
        lines.append(f"| {name} | {kind} | {pooled:.2f} | {' | '.join(bands)} | {passkey} | {tokens} | {wall} |")

    for name, result in study.zero_shot.items():
        row(name, "zero-shot", result, None)
    for name, result in study.trained.items():
        run = study.runs.get(name)
        if name.endswith("@2x"):  # the progressive branch's first stage, evaluated on its own
            whole = study.runs[name.split("@")[0]]
            first = next(iter(whole["stages"]))
            run = {"stages": {first: whole["stages"][first]}, "wall_s": float("nan")}
        row(name, "after stage" if run is None or run["wall_s"] == run["wall_s"] else "after its 2x stage",
            result, run)
    return "\n".join(lines)


def paired(a: dict, b: dict) -> tuple[float, float, int, int]:
    """Per-window comparison of one band in two evaluations over the same windows: mean log(a/b), its standard
    error, and in how many windows a is lower."""
    logs = [math.log(x / y) for x, y in zip(a["window_ppl"], b["window_ppl"])]
    se = statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else float("nan")
    return statistics.fmean(logs), se, sum(v < 0 for v in logs), len(logs)


def native_reference(study: Study, start: int, end: int) -> float:
    """The base model's perplexity on the tokens of band [start, end) of the long windows, each read inside a
    native-length window of its own (the length-n evaluation cuts the same text into n-token windows): what
    "the in-window level" is for exactly that text."""
    profile = PROFILES[study.profile]
    n, long = profile.native, profile.native * profile.factor
    short = study.zero_shot["none"]["perplexity"][str(n)]
    count = short["windows"]
    per = long // n
    nll, tokens = 0.0, 0
    for w in range(count):
        if start // n <= w % per < end // n:
            for b in short["bands"]:
                t = b["tokens"] / count
                nll += math.log(b["window_ppl"][w]) * t
                tokens += t
    return math.exp(nll / tokens)


def comparison(study: Study) -> str:
    """After each stage: the extended band against the in-window band, and against the same RoPE zero-shot."""
    profile = PROFILES[study.profile]
    n, long = profile.native, profile.native * profile.factor
    ref = native_reference(study, 2 * n, long) if "none" in study.zero_shot else float("nan")
    lines = [f"| branch | @{long}: {2 * n}–{long} / 0–{n} after the stage | {2 * n}–{long} vs the same tokens read "
             f"by the base in {n}-token windows ({ref:.2f}) | {2 * n}–{long}: zero-shot -> after stage "
             "(same windows) | windows better |", "|---|---|---|---|---|"]
    for name, result in study.trained.items():
        beyond, inside = band(result, long, 2 * n), band(result, long, 0)
        zero_name = "yarn" if name.startswith("yarn") else name
        zero = study.zero_shot.get(zero_name)
        if zero is None:
            continue
        mean, se, wins, count = paired(beyond, band(zero, long, 2 * n))
        lines.append(f"| {name} | {beyond['ppl'] / inside['ppl']:.3f} | {beyond['ppl'] / ref:.3f} | "
                     f"{band(zero, long, 2 * n)['ppl']:.2f} -> "
                     f"{beyond['ppl']:.2f} ({100 * (math.exp(mean) - 1):+.1f}% ±{100 * se:.1f}) | {wins}/{count} |")
    return "\n".join(lines)


def between_branches(study: Study) -> str:
    """The branches against each other after their stages, window by window, in the two extended bands:
    each against `none` (trained at 4x with the base RoPE) and against `yarn`."""
    profile = PROFILES[study.profile]
    n, long = profile.native, profile.native * profile.factor
    bands = ((n, f"{n}–{2 * n}"), (2 * n, f"{2 * n}–{long}"))
    lines = ["| branch | against | " + " | ".join(f"@{long}: {label}" for _, label in bands) + " |",
             "|---|---|" + "---|" * len(bands)]
    for reference in ("none", "yarn"):
        if reference not in study.trained:
            continue
        for name, result in study.trained.items():
            if name == reference or name.endswith("@2x") or (reference == "yarn" and name == "none"):
                continue
            cells = []
            for start, _ in bands:
                mean, se, wins, count = paired(band(result, long, start), band(study.trained[reference], long, start))
                cells.append(f"{100 * (math.exp(mean) - 1):+.1f}% ±{100 * se:.1f} ({wins}/{count} better)")
            lines.append(f"| {name} | {reference} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def methods_table(study: Study) -> str:
    """Issue 28: what each method trained, cost and bought beyond the window (per window, vs zero-shot YaRN)."""
    profile = PROFILES[study.profile]
    n, long = profile.native, profile.native * profile.factor
    lines = [f"| branch | trainable | peak RSS rank 0 | step (median) | {2 * n}–{long} / 0–{n} | {2 * n}–{long}: "
             "zero-shot YaRN -> after (per window) | windows better |", "|---|---|---|---|---|---|---|"]
    zero = band(study.zero_shot["yarn"], long, 2 * n)
    for name, result in study.trained.items():
        stage = next(iter(study.runs[name]["stages"].values()))
        if stage.get("trainable") is None:
            continue
        beyond, inside = band(result, long, 2 * n), band(result, long, 0)
        mean, se, wins, count = paired(beyond, zero)
        lines.append(f"| {name} | {100 * stage['trainable'] / stage['params']:.1f}% | "
                     f"{stage['peak_memory_gib']:.2f} GiB | {stage['step_s_median']:.2f} s | "
                     f"{beyond['ppl'] / inside['ppl']:.3f} | {zero['ppl']:.2f} -> {beyond['ppl']:.2f} "
                     f"({100 * (math.exp(mean) - 1):+.1f}% ±{100 * se:.1f}) | {wins}/{count} |")
    return "\n".join(lines)


def plateau_table(study: Study) -> str:
    """Held-out perplexity per pretraining checkpoint and its change over each interval."""
    points = study.plateau
    change = [""] + [f"{100 * (b['ppl'] / a['ppl'] - 1):+.1f} %" for a, b in zip(points, points[1:])]
    return "\n".join(["| step | " + " | ".join(str(p["step"]) for p in points) + " |",
                      "|---|" + "---|" * len(points),
                      "| tokens (M) | " + " | ".join(f"{p['tokens'] / 1e6:.2f}" for p in points) + " |",
                      "| held-out ppl | " + " | ".join(f"{p['ppl']:.2f}" for p in points) + " |",
                      "| change over the interval | " + " | ".join(change) + " |"])


def plots(study: Study, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    profile = PROFILES[study.profile]
    long = profile.native * profile.factor
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (title, results) in zip(axes, (("zero-shot (base model, RoPE changed)", study.zero_shot),
                                           ("after the continued-pretraining stage", study.trained))):
        for name, result in results.items():
            bands = result["perplexity"][str(long)]["bands"]
            x = [(b["start"] + b["end"]) / 2 for b in bands]
            y = [b["ppl"] for b in bands]
            err = [[b["ppl"] * (1 - math.exp(-b["se_log"])) for b in bands],
                   [b["ppl"] * (math.exp(b["se_log"]) - 1) for b in bands]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name, color=COLOURS.get(name))
        ax.axvline(profile.native, color="grey", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set(title=title, xlabel=f"token position in a {long}-token window (band midpoint)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("perplexity (held-out stdlib, ±1 s.e. over windows)")
    fig.tight_layout()
    written.append(out / "extension-study-ppl.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    losses = study.runs["base"]["stages"]["pretrain"]["losses"]
    ax.plot([t for t, _ in losses], [math.exp(v) for _, v in losses], alpha=0.4, label="training batch ppl")
    ax.plot([p["tokens"] for p in study.plateau], [p["ppl"] for p in study.plateau], "o-",
            label=f"held-out ppl @{profile.native}")
    ax.set_yscale("log")
    ax.set(xlabel="pretraining tokens", ylabel="perplexity", title="pretraining at the native context")
    ax.legend()
    fig.tight_layout()
    written.append(out / "extension-study-pretrain.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    with_passkey = {f"{k} (zero-shot)": v for k, v in study.zero_shot.items() if "passkey" in v}
    with_passkey.update({f"{k} (trained)": v for k, v in study.trained.items() if "passkey" in v})
    if with_passkey:
        fig, axes = plt.subplots(1, len(with_passkey), figsize=(2.3 * len(with_passkey) + 1, 3), squeeze=False)
        for ax, (name, result) in zip(axes[0], with_passkey.items()):
            grid = result["passkey"]
            rows = [[grid[length][d] for d in grid[length]] for length in grid]
            ax.imshow(rows, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i, r in enumerate(rows):
                for j, v in enumerate(r):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(rows[0])), list(next(iter(grid.values()))), fontsize=6)
            ax.set_yticks(range(len(rows)), list(grid), fontsize=7)
            ax.set_title(name, fontsize=8)
        fig.suptitle(f"passkey retrieval ({profile.passkey_trials} trials per cell; x: depth, y: length)")
        fig.tight_layout()
        written.append(out / "extension-study-passkey.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=tuple(PROFILES), default="full")
    p.add_argument("--out", help="study dir (default runs/extension-study-<profile>)")
    p.add_argument("--force", action="store_true", help="delete an existing study dir first")
    p.add_argument("--docs", action="store_true", help="also copy the plots and study.json to docs/img/")
    p.add_argument("--report", action="store_true", help="only redo the table and plots from OUT/study.json")
    args = p.parse_args(argv)
    out = Path(args.out or REPO / "runs" / f"extension-study-{args.profile}").resolve()
    if args.report:
        saved = json.loads((out / "study.json").read_text())
        saved.pop("profile_sizes", None)
        study = Study(**{k: saved[k] for k in Study.__dataclass_fields__})
        return report(study, out, args.docs)
    if out.exists():
        if not args.force:
            print(f"error: {out} exists; pass --force to start over", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    study = run_study(args.profile, out, echo=lambda text: print(text, flush=True))
    (out / "study.json").write_text(json.dumps({"profile_sizes": asdict(PROFILES[args.profile]), **asdict(study)},
                                               indent=1) + "\n")
    return report(study, out, args.docs)


def report(study: Study, out: Path, docs: bool) -> int:
    parts = [plateau_table(study), table(study), comparison(study), between_branches(study)]
    if any("+" in name for name in study.trained):
        parts.append(methods_table(study))
    text = "\n\n".join(parts)
    (out / "table.md").write_text(text + "\n")
    pngs = plots(study, out)
    print(text)
    print(f"[study] {study.profile}: {study.wall_s / 60:.1f} minutes; wrote {out / 'study.json'}, "
          f"{', '.join(p.name for p in pngs)}")
    if docs:
        img = REPO / "docs" / "img"
        for png in pngs:
            shutil.copy2(png, img / png.name)
        shutil.copy2(out / "study.json", img / "extension-study.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
