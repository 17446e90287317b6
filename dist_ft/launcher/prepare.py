"""`dist-ft prepare`: every data source of every stage tokenized once into a token store (dist_ft/store),
reused when it already exists; the only step that may touch the network (a `hub_dataset`). Ranks then
memory-map the stores and never tokenize.

The summary (printed, and written as JSON beside the stores) gives per store: documents, tokens, a length
histogram against each stage's seq_len, bad rows by reason and disk size."""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_ft.durable import write_atomic
from dist_ft.plan.plan import Plan, StagePlan
from dist_ft.store import (DOCUMENTS, EXAMPLES, DataError, SourceSpec, StoreError, TokenStore, build_store, open_source,
                            open_store)
from dist_ft.store.bins import packing_efficiency
from dist_ft.store.build import check_format
from dist_ft.store.read import BadRows, read_records
from dist_ft.store.sft import format_problem, show_row
from dist_ft.store.key import source_stamps, spec_json
from dist_ft.store.sources import hub_file, is_saved_dataset, stage_specs


SMALL_SOURCE_BYTES = 16 << 20  # below this, worker processes cost more to start than they save


@dataclass
class _Needed:
    spec: SourceSpec
    root: Path
    stages: list[StagePlan]


def needed_stores(plan: Plan) -> list[_Needed]:
    """Each distinct store the plan's stages read, with the stages that read it."""
    found: dict[tuple[SourceSpec, str], _Needed] = {}
    for stage in plan.stages:
        for spec in stage_specs(stage.data, stage.phase, stage.data_format, stage.template):
            entry = found.setdefault((spec, stage.data.cache_dir), _Needed(spec, Path(stage.data.cache_dir), []))
            entry.stages.append(stage)
    return list(found.values())


def missing_stores(plan: Plan, tokenizer: Any) -> list[str]:
    """The stores a launch would have to build first (missing, stale or damaged), as error texts."""
    missing = []
    for need in needed_stores(plan):
        try:
            open_source(need.spec, tokenizer, need.root, "dist-ft prepare")
        except (StoreError, OSError) as err:
            missing.append(str(err))
    return missing


def prepare(plan: Plan, tokenizer: Any, *, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Build what is missing, reuse the rest; the summary (also written to each cache dir)."""
    for stage in plan.stages:
        if stage.data.hub_dataset and not stage.data.paths and not stage.data.sources:
            export_hub_dataset(stage.data)
    stores = []
    for need in needed_stores(plan):
        store, built = build_store(need.spec, tokenizer, need.root, workers=workers or default_workers(need.spec),
                                   progress=progress)
        stores.append(_summary(need, store, built))
    summary = {"stores": stores}
    for root in {Path(s["path"]).parent for s in stores}:
        write_atomic(root / f"prepare-{plan.name}.json", json.dumps(summary, indent=1))
    return summary


def default_workers(spec: SourceSpec) -> int:
    """Tokenizer processes: documents go through a fast tokenizer's batch call, which already runs on every
    core (a pool measured no faster: docs/data.md); fine-tuning rows are rendered and tokenized piece by
    piece in Python, so they get a process per usable core — unless they are small enough that starting the
    processes would take longer than the work."""
    if spec.kind == DOCUMENTS or sum(size for _, size, _ in source_stamps(spec)) < SMALL_SOURCE_BYTES:
        return 1
    return max(1, len(os.sched_getaffinity(0)))


def export_hub_dataset(data) -> Path:
    """The hub dataset (or a local `save_to_disk` folder) as JSON Lines under the cache dir, read once, here
    and never on a rank; a local folder is exported again when its files changed."""
    target = hub_file(data)
    local = is_saved_dataset(data.hub_dataset)
    stamp = _folder_stamp(Path(data.hub_dataset)) if local else None
    recorded = target.with_name(target.name + ".source.json")
    if target.is_file() and (not local or (recorded.is_file() and json.loads(recorded.read_text()) == stamp)):
        return target
    dataset = _load_rows(data, local)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as out:  # row by row: the dataset is never held as one string
            for row in dataset:
                out.write(json.dumps(row) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if local:
        write_atomic(recorded, json.dumps(stamp))  # after the rows: a crash in between exports again
    return target


def _load_rows(data, local: bool) -> Any:
    import datasets

    try:
        if not local:
            return datasets.load_dataset(data.hub_dataset, split=data.hub_split)
        saved = datasets.load_from_disk(data.hub_dataset)
        return saved[data.hub_split] if isinstance(saved, datasets.DatasetDict) else saved
    except KeyError:
        raise SystemExit(f"error: {data.hub_dataset} has no split {data.hub_split!r} (it has "
                         f"{', '.join(saved)}): set data.hub_split") from None
    except Exception as err:  # offline, or not a saved dataset: say what to do instead
        fix = "give a folder written by `datasets.save_to_disk`" if local else \
            "run `dist-ft prepare` where there is network"
        raise SystemExit(f"error: could not load {'the saved dataset' if local else 'hub dataset'} "
                         f"{data.hub_dataset!r} ({type(err).__name__}: {err}); {fix}, or give `data.paths`") from None


def _folder_stamp(folder: Path) -> list[list[Any]]:
    return [[str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(folder.rglob("*")) if f.is_file()]


def _summary(need: _Needed, store: TokenStore, built: bool) -> dict[str, Any]:
    lengths = store.lengths()
    manifest = store.manifest
    per_stage = {}
    for stage in need.stages:
        fits = int((lengths + 1 <= stage.seq_len).sum())  # with its EOS, in one row
        per_stage[stage.name] = {"seq_len": stage.seq_len, "fit_in_one_row": fits,
                                 "reach_seq_len": int((lengths >= stage.seq_len).sum()),
                                 "tokens_in_reaching": int(lengths[lengths >= stage.seq_len].sum())}
        if store.prompt_lengths is not None and stage.data.packing:
            method = stage.data.packing_method
            rows, efficiency = packing_efficiency(lengths, np.asarray(store.prompt_lengths), stage.seq_len, method)
            per_stage[stage.name].update(packing_method=method, rows=rows, packing_efficiency=round(efficiency, 4))
    disk = sum(manifest["files"].values())
    return {"what": need.spec.describe(), "path": str(store.path), "built_now": built, "kind": manifest["kind"],
            "count": store.count, "tokens": int(manifest["tokens"]), "dtype": manifest["dtype"],
            "length_histogram": manifest["length_histogram"], "stages": per_stage,
            "bad_rows": manifest["bad_rows"], "disk_bytes": disk,
            "bytes_per_token": round(disk / max(1, manifest["tokens"]), 3),
            "median_length": float(np.median(lengths)) if len(lengths) else 0.0}


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for s in summary["stores"]:
        lines.append(f"{s['what']}: {'built' if s['built_now'] else 'reused'} {s['path']}")
        lines.append(f"  {s['count']} {s['kind']}, {s['tokens']} tokens ({s['dtype']}), median length "
                     f"{s['median_length']:g}, {s['disk_bytes'] / 2**20:.1f} MiB on disk "
                     f"({s['bytes_per_token']} bytes/token)")
        lines.append("  lengths: " + ", ".join(f"<={k}: {n}" for k, n in s["length_histogram"].items()))
        for name, st in s["stages"].items():
            lines.append(f"  stage {name} (seq_len {st['seq_len']}): {st['fit_in_one_row']} fit one row, "
                         f"{st['reach_seq_len']} reach seq_len ({st['tokens_in_reaching']} tokens)" +
                         (f"; packed {st['packing_method']} into {st['rows']} rows, packing efficiency "
                          f"{100 * st['packing_efficiency']:.1f}% (real tokens / row tokens)"
                          if "rows" in st else ""))
        bad = s["bad_rows"]
        lines.append("  bad rows: " + (", ".join(f"{n} {r}" for r, n in sorted(bad.items())) if bad else "none"))
    return "\n".join(lines)


SAMPLE_ROWS = 64


def check_sampled_formats(plan: Plan) -> None:
    """For `data.prepare: job`, before anything is submitted: each local fine-tuning source's first rows
    against its format, refused (DataError) as prepare refuses the whole file; the job checks every row."""
    for need in needed_stores(plan):
        spec, bad, kept = need.spec, BadRows(), 0
        if spec.kind != EXAMPLES:
            continue
        try:
            for _, record in itertools.islice(read_records(spec.paths, bad), SAMPLE_ROWS):
                row = spec.renamed({spec.text_field: record} if isinstance(record, str) else record) \
                    if isinstance(record, (str, dict)) else record
                problem = format_problem(row, spec.fmt, spec.text_field) if isinstance(row, dict) else "not_an_object"
                if problem:
                    bad.add(problem, show_row(row) if isinstance(row, dict) else repr(row)[:120])
                kept += not problem
        except DataError:  # not on this machine yet (a hub dataset): the job exports and checks it
            continue
        check_format(spec, kept, bad)


def load_plan_tokenizer(plan: Plan) -> Any:
    """The tokenizer the ranks will load (the same function), to tokenize with and to key the stores."""
    from dist_ft.rank.model import load_tokenizer

    return load_tokenizer(plan.model.name_or_path, plan.model.gguf_file, plan.model.tokenizer)


def ensure_prepared(plan: Plan) -> None:
    """Before a launch: build whatever store the stages need and lack (prints what it did)."""
    tokenizer = load_plan_tokenizer(plan)
    if missing_stores(plan, tokenizer):
        print("preparing token stores (dist-ft prepare) ...", file=sys.stderr)
        print(format_summary(prepare(plan, tokenizer)))


# ---- the data budget `dist-ft plan` prints ---------------------------------------------------------

def data_budget(plan: Plan) -> list[str]:
    """Per store: the source files, whether a store of them exists (for any tokenizer: plan loads none) and
    what it holds; per stage reading it, the tokens it trains on as passes over the store and how many
    documents reach its seq_len."""
    lines = ["data (token stores in " + ", ".join(sorted({str(n.root) for n in needed_stores(plan)})) + "):"]
    for need in needed_stores(plan):
        try:
            stamps = source_stamps(need.spec)
        except (DataError, OSError):
            lines.append(f"  {need.spec.describe()}: not on this machine yet (a hub dataset: prepare exports it)")
            continue
        found = _existing(need)
        size = sum(size for _, size, _ in stamps) / 2**20
        state = "no store yet: `dist-ft prepare` builds it" if found is None else \
            f"store {found.path.name}: {found.count} {found.manifest['kind']}, {found.manifest['tokens']} tokens" + \
            (" (stale: files changed)" if found.manifest["sources"] != stamps else "")
        lines.append(f"  {need.spec.describe()}: {len(stamps)} files, {size:.1f} MiB; {state}")
        for stage in need.stages if found is not None else []:
            lengths, budget = found.lengths(), (stage.steps or 0) * stage.tokens_per_step
            passes = f"{budget / max(1, found.manifest['tokens']):.2f} passes" if budget else "epochs"
            lines.append(f"    {stage.name}: trains {budget or 'by'} {'tokens = ' + passes if budget else passes}; "
                         f"{int((lengths >= stage.seq_len).sum())} {found.manifest['kind']} reach seq_len {stage.seq_len}")
    return lines


def _existing(need: _Needed) -> TokenStore | None:
    """A whole store of this spec under the cache dir, built with whichever tokenizer."""
    wanted = spec_json(need.spec)
    for manifest in sorted(need.root.glob(f"{need.spec.kind}-*/manifest.json")):
        try:
            if json.loads(manifest.read_text()).get("spec") == wanted:
                return open_store(manifest.parent, "dist-ft prepare")
        except (OSError, ValueError, StoreError):
            continue
    return None
