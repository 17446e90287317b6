"""A rank's data memory does not grow with the corpus: its own memory (USS) at the first batch is the same
for a corpus ten times larger, because it memory-maps the token store and holds O(documents) integers
(the in-memory pipeline held ~67 bytes per token: 670 MB more here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ft.rank.tokenizer import byte_tokenizer
from dist_ft.store import DOCUMENTS, SourceSpec, build_store
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RANK = """
import json, sys, psutil
from pathlib import Path
from dist_ft.rank.data import BatchStream
from dist_ft.rank.data.packed import PackedDocuments, RowSet
from dist_ft.rank.data.select import split_set
from dist_ft.store import BadRows, open_store
me = psutil.Process()
before = me.memory_full_info().uss
store = open_store(Path(sys.argv[1]), "dist-ft prepare")
train, _ = split_set(RowSet.of(PackedDocuments(store, 1024, seed=0, long_docs="split", bad=BadRows())), 0.01, 0)
batch = next(BatchStream(train, 4, seed=0, dp_rank=1, dp_size=2))
print(json.dumps({"uss_growth": me.memory_full_info().uss - before, "rows": len(train), "tokens": len(store.tokens)}))
"""


def corpus(folder: Path, megabytes: int) -> SourceSpec:
    """Documents of 200 to 3000 characters, `megabytes` MB in all, each text different."""
    folder.mkdir()
    with open(folder / "docs.jsonl", "w") as handle:
        written, i = 0, 0
        while written < megabytes << 20:
            text = " ".join(f"w{(i * 7919 + j) % 10007}" for j in range(40 + (i * 31) % 560))
            handle.write(json.dumps({"text": text}) + "\n")
            written, i = written + len(text), i + 1
    return SourceSpec(DOCUMENTS, (str(folder),))


def test_a_ranks_data_memory_is_flat_from_a_small_to_a_ten_times_larger_corpus(tmp_path):
    tokenizer = byte_tokenizer()
    seen = {}
    for megabytes in (1, 10):
        store, _ = build_store(corpus(tmp_path / f"c{megabytes}", megabytes), tokenizer, tmp_path / "stores",
                               progress=False)
        result = subprocess.run([sys.executable, "-c", RANK, str(store.path)], capture_output=True, text=True,
                                cwd=ROOT, check=True)
        seen[megabytes] = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen[10]["tokens"] > 9 * seen[1]["tokens"] and seen[10]["rows"] > 9 * seen[1]["rows"]
    # 9 MB more tokens: the in-memory pipeline would have grown by ~600 MB; 8 MB allows the
    # O(documents) arrays (tens of bytes per document) and allocator noise.
    assert seen[10]["uss_growth"] - seen[1]["uss_growth"] < 8 << 20, seen
