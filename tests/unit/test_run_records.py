"""The run records that cross processes (DONE, heartbeats, ssh.json, node records) round-trip through JSON
as their typed selves and are reloaded by the recipe's strict loader, like plan.json."""

from __future__ import annotations

import json

import pytest

from dist_ft.plan.run_records import (BestWeights, DoneMarker, HeartbeatRow, LauncherProcess, NodeRecord, SshRecord,
                                      StageAttempt, finite_values, read_record, write_record)

RECORDS = [
    DoneMarker(step=6, outcome="early_stopped", best=BestWeights(4, "eval_loss", 1.25), test={"test_loss": 1.5}),
    DoneMarker(step=6, outcome="finished"),
    HeartbeatRow(rank=1, host="node-b", hostname="b.local", pid=42, restart=0, started=10.0, interval_s=5.0,
                 step=None, time=12.5),
    HeartbeatRow(rank=0, host="a", hostname="a", pid=7, restart=2, started=1.0, interval_s=5.0, step=9, time=3.0,
                 ended="finished"),
    SshRecord(hosts=["a", "user@b"], launcher=LauncherProcess("a", 99), started="2026-12-06T05:00:00+0000",
              stages={"ctx": StageAttempt("done", attempt=2, started="x", endpoint="a:29400", hosts=["a", "user@b"],
                                          ended="y", exit=0),
                      "sft": StageAttempt("running", attempt=1)}),
    NodeRecord(host="user@b", hostname="b", pid=77, node_rank=1, attempt=2, started=3.5, endpoint="a:29400"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_a_record_round_trips_as_its_typed_self(record, tmp_path):
    assert type(record).from_json(record.to_json()) == record
    write_record(tmp_path / "record.json", record)
    assert read_record(tmp_path / "record.json", type(record)) == record
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left beside it


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_a_record_is_reloaded_by_the_strict_loader(record):
    raw = json.loads(record.to_json())
    first = next(iter(raw))
    renamed = {**{k: v for k, v in raw.items() if k != first}, first + "x": raw[first]}
    with pytest.raises(ValueError) as err:
        type(record).from_json(json.dumps(renamed))
    assert f"not a valid {type(record).__name__}" in str(err.value)
    assert f"{first}x: unknown key" in str(err.value) and f"did you mean `{first}`" in str(err.value)
    assert f"{first}: is required but missing" in str(err.value)


def test_wrong_types_and_values_are_refused_with_their_path():
    with pytest.raises(ValueError, match="step: expected an integer"):
        HeartbeatRow.from_json(json.dumps({**json.loads(RECORDS[2].to_json()), "step": "7"}))
    with pytest.raises(ValueError, match="stages.sft.state: 'lost' is not one of"):
        raw = json.loads(RECORDS[4].to_json())
        raw["stages"]["sft"]["state"] = "lost"
        SshRecord.from_json(json.dumps(raw))
    with pytest.raises(ValueError, match="best.value"):
        DoneMarker.from_json('{"step": 1, "outcome": "finished", "best": {"step": 1, "metric": "m", "value": NaN}}')


def test_a_done_marker_holds_a_non_finite_test_metric_as_null():
    done = DoneMarker(step=2, outcome="finished", test=finite_values({"test_loss": 1.5, "test_perplexity": float("nan")}))
    assert DoneMarker.from_json(done.to_json()).test == {"test_loss": 1.5, "test_perplexity": None}


def test_reading_a_missing_cut_or_foreign_file_gives_none(tmp_path):
    path = tmp_path / "rank0.json"
    assert read_record(path, HeartbeatRow) is None
    path.write_text(RECORDS[2].to_json()[:20])  # a beat cut short
    assert read_record(path, HeartbeatRow) is None
    path.write_text(RECORDS[5].to_json())  # another record
    assert read_record(path, HeartbeatRow) is None
