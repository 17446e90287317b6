"""Which checkpoint a restart resumes from, what is pruned, and universal conversions that were cut short."""

from types import SimpleNamespace

from dist_ft.rank import engine as ds
from dist_ft.durable import write_atomic
from dist_ft.rank.checkpoint import commit, ensure_universal, latest_tag, resume_choice, tag_for, tag_folders
from dist_ft.recipe.config import Checkpointing
from dist_ft.rank.distributed import read_env
from dist_ft.rank.loop import LoopState
from dist_ft.plan.run_dir import StageDir
from dist_ft.rank.stage_checkpoints import ResumePoint, StageCheckpoints


def save(folder, step, dp=2):
    (folder / tag_for(step)).mkdir(parents=True)
    (folder / tag_for(step) / "mp_rank_00_model_states.pt").write_bytes(b"shard")
    commit(folder, tag_for(step), {"step": step, "dp": dp}, keep_last=2)


def test_partial_tags_are_pruned_at_the_next_commit(tmp_path):
    save(tmp_path, 2)
    (tmp_path / tag_for(3)).mkdir()  # a crash mid-save: shards, no dist_ft.json
    (tmp_path / tag_for(9)).mkdir()  # a save cut short before a resume from an earlier step
    (tmp_path / "notes").mkdir()  # not a tag: not ours to remove
    save(tmp_path, 4)
    assert tag_folders(tmp_path) == [tag_for(2), tag_for(4)] and (tmp_path / "notes").is_dir()


def test_a_damaged_newest_dist_ft_json_falls_back_to_the_previous_complete_tag(tmp_path):
    save(tmp_path, 2, dp=4)
    save(tmp_path, 4)
    for damage in (b'{"step": 4, "dp"', b"\xff\xfe", b"[]", b'{"step": "4", "dp": 2}'):
        (tmp_path / tag_for(4) / "dist_ft.json").write_bytes(damage)
        assert latest_tag(tmp_path) == tag_for(2)
        assert resume_choice(tmp_path) == (tag_for(2), 4)
    save(tmp_path, 6)  # the next commit removes the damaged tag
    assert tag_folders(tmp_path) == [tag_for(2), tag_for(6)]


def test_every_rank_resumes_from_the_tag_rank_0_chose(tmp_path, monkeypatch):
    stage = StageDir(tmp_path)
    save(stage.checkpoints, 2)
    chosen = []
    monkeypatch.setattr(ds, "broadcast_from_main", lambda value: chosen.append(value) or (tag_for(4), 2))
    rank1 = read_env({"RANK": "1", "WORLD_SIZE": "2"}, cuda_available=False)
    # Rank 1 sees only step 2 (a stale view of a shared filesystem); rank 0 saw step 4 complete.
    checkpoints = StageCheckpoints(stage, Checkpointing(), rank1, dp_size=2, frozen_excluded=False)
    assert checkpoints.resume_point() == ResumePoint(stage.checkpoints, tag_for(4), universal=False)
    assert chosen == [None]  # rank 1 decided nothing itself


def test_an_interrupted_universal_conversion_is_done_again(tmp_path):
    calls = []

    def convert(folder, tag, out, crash=False):
        calls.append(tag)
        (out / "zero").mkdir(parents=True)
        (out / "zero" / "param.pt").write_bytes(b"x")
        if crash:
            raise KeyboardInterrupt  # killed mid-conversion

    universal = tmp_path / "universal"
    try:
        ensure_universal(tmp_path, "step_00000002", universal, lambda *a: convert(*a, crash=True))
    except KeyboardInterrupt:
        pass
    (universal / "step_00000002" / "stray.pt").write_bytes(b"half")
    ensure_universal(tmp_path, "step_00000002", universal, convert)
    ensure_universal(tmp_path, "step_00000002", universal, convert)
    assert calls == ["step_00000002"] * 2  # redone once, then kept
    assert not (universal / "step_00000002" / "stray.pt").exists()


def test_write_atomic_never_writes_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / ".latest.tmp").symlink_to(victim)
    write_atomic(tmp_path / "latest", "step_00000002")
    assert victim.read_text() == "keep" and (tmp_path / "latest").read_text() == "step_00000002"


def test_a_save_starts_from_an_empty_tag_and_skips_the_state_it_resumed_from(tmp_path, monkeypatch):
    written = []

    def fake_save(engine, folder, tag, client_state, frozen_excluded):
        assert not (folder / tag).exists(), "a stale folder of this tag would mix into the new save"
        (folder / tag).mkdir(parents=True)
        written.append(tag)

    monkeypatch.setattr(ds, "save_checkpoint", fake_save)
    monkeypatch.setattr(ds, "barrier", lambda: None)
    stream = SimpleNamespace(state_dict=lambda: {})
    checkpoints = StageCheckpoints(StageDir(tmp_path), Checkpointing(keep_last=2), read_env({}, cuda_available=False),
                                   dp_size=1, frozen_excluded=False, resumed_at=4)
    folder = checkpoints.stage_dir.checkpoints
    checkpoints.save(None, LoopState(step=4), stream)  # a restart after the last step: its checkpoint is this state
    (folder / tag_for(6)).mkdir(parents=True)
    (folder / tag_for(6) / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(b"from 4 ranks")
    checkpoints.save(None, LoopState(step=6), stream)
    assert written == [tag_for(6)] and latest_tag(folder) == tag_for(6)


def test_loop_state_round_trips_through_its_state_dict():
    state = LoopState(step=7, tokens_seen=70, nonfinite_steps=1, consecutive_nonfinite=0, best_value=2.5,
                      best_step=4, evals_without_gain=2, early_stopped=True)
    saved = state.state_dict()
    assert "consecutive_nonfinite" not in saved and LoopState.from_state_dict(saved) == state
