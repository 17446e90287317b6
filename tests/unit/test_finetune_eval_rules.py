"""Evaluation during fine-tuning, the pure parts: the recipe's checks (plan time, with the dotted path),
the early-stopping verdict, the loop around it, checkpoint rotation that keeps the best, the examples
generation answers, and the summary's lines."""

import json
import math

import pytest
import torch

from dist_ft.cli import main
from dist_ft.decoding.task_metrics import METRICS
from dist_ft.launcher.summary import evaluation_lines
from dist_ft.plan.run_dir import StageDir
from dist_ft.rank import loop
from dist_ft.durable import write_atomic
from dist_ft.rank.checkpoint import best_tag, commit, tag_for, tag_folders
from dist_ft.rank.early_stopping import Rule, judge
from dist_ft.rank.loop import LoopConfig, LoopHooks, LoopState, run_loop
from dist_ft.recipe.config import ANSWER_METRICS, recipe_from_dict
from dist_ft.recipe.strict import RecipeError
from tests.conftest import demo_raw

# ---- the recipe ---------------------------------------------------------------------------------------------


def problems(raw):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    return {p.path: p for p in err.value.problems}


def finetune(**changes):
    raw = demo_raw()
    raw["finetune"].update(changes)
    return raw


def test_the_demo_evaluates_generates_and_stops_early():
    ft = recipe_from_dict(demo_raw()).finetune
    assert ft.eval_every and ft.early_stopping.metric == "eval_loss" and ft.early_stopping.direction == "min"
    assert ft.samples.from_validation == 3 and "exact_match" in ft.metrics


def test_the_answer_metrics_a_recipe_may_name_are_the_ones_task_metrics_scores():
    assert set(ANSWER_METRICS) == set(METRICS)


def test_early_stopping_without_validation_data_is_an_error_with_its_path():
    raw = finetune()
    raw["finetune"]["data"].pop("validation_fraction")
    raw["finetune"].pop("samples")
    raw["finetune"]["metrics"] = ["loss"]
    found = problems(raw)
    assert "no validation data" in found["finetune.early_stopping"].what
    assert "validation_paths" in found["finetune.early_stopping"].fix


def test_early_stopping_without_eval_every_is_an_error():
    raw = finetune()
    raw["finetune"].pop("eval_every")
    assert "needs `eval_every`" in problems(raw)["finetune.early_stopping"].what


def test_eval_every_with_nothing_to_evaluate_is_an_error_but_fixed_prompts_are_something():
    raw = finetune(metrics=["loss"], metric_rows=None, samples=None, early_stopping=None)
    raw["finetune"]["data"].pop("validation_fraction")
    assert "nothing to evaluate" in problems(raw)["finetune.eval_every"].what
    raw["finetune"]["samples"] = {"prompts": ["Say hi."]}
    assert recipe_from_dict(raw).finetune.samples.prompts == ["Say hi."]


def test_an_unknown_metric_names_the_choices():
    found = problems(finetune(metrics=["loss", "rouge"]))
    assert "'rouge' is not a metric" in found["finetune.metrics"].what and "rouge_l" in found["finetune.metrics"].fix


def test_early_stopping_on_a_metric_that_is_not_computed_or_unknown():
    found = problems(finetune(early_stopping={"patience": 2, "metric": "eval_bleu"}))
    assert "add bleu to `finetune.metrics`" in found["finetune.early_stopping.metric"].fix
    found = problems(finetune(early_stopping={"patience": 2, "metric": "rouge_l"}))
    assert "eval_rouge_l" in found["finetune.early_stopping.metric"].fix


def test_mode_is_min_or_max_and_agrees_with_the_metric():
    found = problems(finetune(early_stopping={"patience": 2, "mode": "up"}))
    assert "is not one of min, max" in found["finetune.early_stopping.mode"].what
    found = problems(finetune(early_stopping={"patience": 2, "mode": "max"}))
    assert "keep the worst model" in found["finetune.early_stopping.mode"].what
    ok = recipe_from_dict(finetune(early_stopping={"patience": 2, "metric": "eval_rouge_l", "mode": "max"}))
    assert ok.finetune.early_stopping.direction == "max"
    assert recipe_from_dict(finetune(early_stopping={"patience": 1, "metric": "eval_exact_match"})) \
        .finetune.early_stopping.direction == "max"


@pytest.mark.parametrize("samples,path,says", [
    ({"from_validation": 1001}, "finetune.samples.from_validation", "must be <= 1000"),
    ({"from_validation": 2, "max_new_tokens": 0}, "finetune.samples.max_new_tokens", "must be >= 1"),
    ({"prompts": []}, "finetune.samples.prompts", "no samples"),
    ({"prompts": ["ok", " "]}, "finetune.samples.prompts[1]", "is empty"),
    ({"prompts": ["p"] * 1001}, "finetune.samples.prompts", "more than 1000"),
])
def test_sample_counts_are_bounded(samples, path, says):
    found = problems(finetune(samples=samples))
    assert says in found[path].what


def test_the_old_patience_key_says_what_replaced_it():
    found = problems(finetune(early_stopping_patience=3))
    problem = found["finetune.early_stopping_patience"]
    assert problem.what == "was replaced" and "early_stopping: {patience: N}" in problem.fix


def test_answer_metrics_need_prompts_and_references():
    found = problems(finetune(format="text", template=None, early_stopping=None, samples=None))
    assert "text rows have no prompt and reference" in found["finetune.metrics"].what


def test_validation_files_or_a_fraction_not_both():
    raw = finetune()
    raw["finetune"]["data"]["validation_paths"] = ["data/tiny_instructions.jsonl"]
    assert "not both" in problems(raw)["finetune.data.validation_paths"].what


def test_missing_validation_and_test_files_fail_at_plan_time(recipe_file, capsys):
    raw = finetune()
    data = raw["finetune"]["data"]
    data.pop("validation_fraction")
    data["validation_paths"] = ["data/nope.jsonl"]
    data["test_paths"] = ["data/tiny_instructions.jsonl", "data/missing-test.jsonl"]
    assert main(["plan", str(recipe_file(raw))]) == 2
    err = capsys.readouterr().err
    assert "finetune.data.validation_paths[0]:" in err and "nope.jsonl does not exist" in err
    assert "finetune.data.test_paths[1]:" in err and "finetune.data.test_paths[0]" not in err


def test_validation_and_test_files_reach_the_plan_resolved(recipe_file, tmp_path, capsys):
    raw = finetune()
    data = raw["finetune"]["data"]
    data.pop("validation_fraction")
    data["validation_paths"] = ["data/tiny_instructions.jsonl"]
    data["test_paths"] = ["data/tiny_instructions.jsonl"]
    assert main(["plan", str(recipe_file(raw)), "--json"]) == 0
    stage = json.loads(capsys.readouterr().out)["stages"][-1]
    assert stage["data"]["validation_paths"] == [str(tmp_path / "data/tiny_instructions.jsonl")]
    assert stage["data"]["test_paths"] == [str(tmp_path / "data/tiny_instructions.jsonl")]
    assert stage["early_stopping"]["patience"] == 2 and stage["samples"]["from_validation"] == 3


# ---- the verdict --------------------------------------------------------------------------------------------

LOSS = Rule("eval_loss", "min", patience=2)


def test_a_lower_loss_improves_a_tie_or_worse_does_not_and_patience_stops():
    first = judge(LOSS, {"eval_loss": 2.0}, 5, None, None, 0)
    assert first.improved and not first.stop and (first.best_value, first.best_step) == (2.0, 5)
    tie = judge(LOSS, {"eval_loss": 2.0}, 10, 2.0, 5, 0)
    assert not tie.improved and not tie.stop and tie.evals_without_gain == 1 and tie.best_step == 5
    worse = judge(LOSS, {"eval_loss": 2.5}, 15, 2.0, 5, 1)
    assert worse.stop and worse.best_step == 5 and worse.evals_without_gain == 2
    better = judge(LOSS, {"eval_loss": 1.9}, 15, 2.0, 5, 1)
    assert better.improved and better.evals_without_gain == 0 and better.best_step == 15


def test_max_mode_min_delta_nan_and_an_uncheckpointable_step():
    rule = Rule("eval_rouge_l", "max", patience=3, min_delta=0.5)
    assert judge(rule, {"eval_rouge_l": 10.4}, 4, 10.0, 2, 0).improved is False  # within min_delta
    assert judge(rule, {"eval_rouge_l": 10.6}, 4, 10.0, 2, 0).improved is True
    assert judge(rule, {"eval_rouge_l": math.nan}, 4, None, None, 0).improved is False
    assert judge(rule, {"eval_loss": 1.0}, 4, None, None, 0).improved is False  # the metric is missing
    assert judge(rule, {"eval_rouge_l": 50.0}, 4, 10.0, 2, 0, can_keep=False).improved is False


# ---- the loop around it -------------------------------------------------------------------------------------

class Engine:
    device = "cpu"

    def __init__(self):
        self.module = torch.nn.Linear(1, 1)

    def __call__(self, **batch):
        return torch.tensor(1.0)

    def backward(self, loss):
        pass

    def step(self):
        pass

    def get_lr(self):
        return [1e-3]

    def get_global_grad_norm(self):
        return 1.0

    def fp16_enabled(self):
        return False


@pytest.fixture
def one_rank(monkeypatch):
    monkeypatch.setattr(loop.ds, "all_reduce_max", lambda value: value)
    monkeypatch.setattr(loop.ds, "all_reduce_mean", lambda value: value)
    monkeypatch.setattr(loop.ds, "parameters_finite", lambda engine: True)


def run(values: dict[int, float], steps: int, every: int | None = None, state: LoopState | None = None):
    """The loop with eval_every 2 and patience 2 on eval_loss; `values`: the loss evaluated at each step."""
    state = state or LoopState()
    saved, rows, evaluated = [], [], []

    def evaluate(step):
        evaluated.append(step)
        return {"eval_loss": values[step]}

    hooks = LoopHooks(evaluate=evaluate, checkpoint=lambda s, best: saved.append((s.step, best)),
                      stop_requested=lambda: False, log=rows.append, step_extras=lambda s: {})
    cfg = LoopConfig(total_steps=steps, grad_accum=1, data_parallel=1, checkpoint_every=every, eval_every=2,
                     early_stopping=Rule("eval_loss", "min", patience=2))
    batches = iter(lambda: {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, None)
    return run_loop(Engine(), batches, state, cfg, hooks), state, saved, evaluated


def test_each_improvement_is_checkpointed_as_the_best_and_patience_stops_the_loop(one_rank):
    outcome, state, saved, evaluated = run({2: 3.0, 4: 2.0, 6: 2.5, 8: 2.1, 10: 1.0}, steps=10, every=3)
    assert outcome == "early_stopped" and evaluated == [2, 4, 6, 8]
    assert saved == [(2, True), (3, False), (4, True), (6, False), (8, False)]  # 8: the early stop's own
    assert (state.best_step, state.best_value, state.early_stopped) == (4, 2.0, True)
    again = run({}, steps=10, state=LoopState.from_state_dict(state.state_dict()))
    assert again[0] == "early_stopped" and again[2] == [] and again[3] == [], "a restart trains no further"


def test_the_end_is_evaluated_once_and_its_checkpoint_can_be_the_best(one_rank):
    outcome, state, saved, evaluated = run({2: 3.0, 4: 2.0, 5: 1.5}, steps=5)
    assert outcome == "finished" and evaluated == [2, 4, 5]
    assert saved == [(2, True), (4, True), (5, True)] and state.best_step == 5
    outcome, state, saved, evaluated = run({2: 3.0, 4: 2.0}, steps=4)
    assert evaluated == [2, 4] and saved == [(2, True), (4, True)], "the last step was evaluated already"


def test_a_checkpoint_from_before_early_stopping_existed_still_resumes():
    saved = {"step": 7, "tokens_seen": 70, "nonfinite_steps": 0, "best_eval": 2.5, "evals_without_gain": 1}
    state = LoopState.from_state_dict({k: v for k, v in saved.items() if k != "best_eval"})
    assert state.step == 7 and state.best_step is None and not state.early_stopped


# ---- rotation keeps the best --------------------------------------------------------------------------------

def save(folder, step, best=False, keep_last=1):
    (folder / tag_for(step)).mkdir(parents=True)
    (folder / tag_for(step) / "mp_rank_00_model_states.pt").write_bytes(b"shard")
    commit(folder, tag_for(step), {"step": step, "dp": 2}, keep_last=keep_last, best=best)


def test_rotation_keeps_the_best_until_a_better_one_replaces_it(tmp_path):
    save(tmp_path, 2, best=True)
    save(tmp_path, 4)
    save(tmp_path, 6)
    assert tag_folders(tmp_path) == [tag_for(2), tag_for(6)] and best_tag(tmp_path) == tag_for(2)
    save(tmp_path, 8, best=True)
    assert tag_folders(tmp_path) == [tag_for(8)]
    save(tmp_path, 10)
    assert tag_folders(tmp_path) == [tag_for(8), tag_for(10)] and best_tag(tmp_path) == tag_for(8)


def test_a_best_pointer_to_an_incomplete_or_foreign_tag_protects_nothing(tmp_path):
    save(tmp_path, 2, best=True)
    (tmp_path / tag_for(2) / "dist_ft.json").write_text('{"step": 2')  # damaged
    save(tmp_path, 4)
    assert best_tag(tmp_path) is None and tag_folders(tmp_path) == [tag_for(4)]
    write_atomic(tmp_path / "best", "../../etc")
    save(tmp_path, 6)
    assert best_tag(tmp_path) is None and tag_folders(tmp_path) == [tag_for(6)]


# ---- what generation answers --------------------------------------------------------------------------------

def test_examples_of_packed_rows_are_their_prompts_and_first_trained_spans():
    from dist_ft.rank.data import IGNORE_INDEX, answer_examples, pack_examples

    first = {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX]}
    second = {"input_ids": [6, 7, 8], "labels": [IGNORE_INDEX, 7, 8]}
    packed = pack_examples([first, second], seq_len=10, pad_id=0, packing=True)
    assert len(packed) == 1
    assert answer_examples(packed) == [([1, 2], [3, 4]), ([6], [7, 8])]
    assert answer_examples(pack_examples([first, second], seq_len=10, pad_id=0, packing=False)) == \
        [([1, 2], [3, 4]), ([6], [7, 8])]


def test_a_fixed_prompt_is_rendered_as_training_renders_an_instruction():
    from dist_ft.rank.data import IGNORE_INDEX, prompt_ids, sft_example
    from dist_ft.rank.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    for template in ("chat_template", "alpaca"):
        example = sft_example({"instruction": "Add 2 and 3.", "output": "5"}, tokenizer, "instruction", template, 512)
        cut = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        assert prompt_ids("Add 2 and 3.", tokenizer, "instruction", template, 512) == example["input_ids"][:cut]
    assert prompt_ids("x" * 600, tokenizer, "instruction", "alpaca", 512) is None


# ---- the summary --------------------------------------------------------------------------------------------

def test_the_summary_says_which_weights_were_exported_and_shows_samples_before_and_after(tmp_path):
    folder = StageDir(tmp_path)
    folder.done.write_text(json.dumps({"step": 6, "outcome": "early_stopped",
                                       "best": {"step": 4, "metric": "eval_loss", "value": 1.23456}}))
    folder.metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 4, "loss": 2.0}, {"step": 4, "eval_loss": 1.23456, "eval_rouge_l": 12.5},
        {"step": 6, "eval_loss": 1.5, "eval_rouge_l": 10.0}]) + "\n")
    folder.test_metrics.write_text(json.dumps({"step": 4, "rows": 3, "test_loss": 1.4}))
    folder.samples.write_text("\n".join(json.dumps({"step": s, "prompt": f"p{i}", "output": f"o{s}",
                                                    "reference": "r"}) for s in (0, 4, 6) for i in range(4)))
    lines = evaluation_lines(folder, "")
    assert lines[0] == "exported the best weights: step 4, eval_loss 1.2346"
    assert lines[1] == "eval (step 4): loss 1.235  rouge_l 12.5", "the exported weights' evaluation, not the last"
    assert lines[2] == "test (weights of step 4): loss 1.4"
    assert lines[3] == "samples before (step 0):" and lines[7] == "samples after (step 4):"
    assert lines[4] == "  'p0' -> 'o0'  (reference: 'r')" and len(lines) == 11


def test_the_summary_sets_the_exported_evaluation_against_the_model_before_the_stage(tmp_path):
    folder = StageDir(tmp_path)
    folder.done.write_text(json.dumps({"step": 6, "outcome": "finished"}))
    folder.metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "eval_loss": 4.25, "eval_exact_match": 0.0}, {"step": 3, "loss": 2.0},
        {"step": 3, "eval_loss": 1.5, "eval_exact_match": 25.0}, {"step": 6, "eval_loss": 0.5, "eval_exact_match": 62.5,
                                                                  "eval_new": 1.0}]) + "\n")
    assert evaluation_lines(folder, "") == ["eval (step 0 -> 6): loss 4.25 -> 0.5  exact_match 0 -> 62.5"]


# ---- generating inside a training process -------------------------------------------------------------------

class ModelHolder(torch.nn.Module):
    """What generation_mode uses of a DeepSpeed engine: the loss wrapper's `lm`, and eval()/train()."""

    def __init__(self, lm):
        super().__init__()
        self.module = torch.nn.Module()
        self.module.lm = lm


def test_generation_mode_swaps_to_sdpa_and_leaves_attention_mode_and_rng_as_they_were():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_ft.decoding.generate import Sampling, generate_ids
    from dist_ft.rank.attention import SDPA_VARLEN, register
    from dist_ft.rank.stage_eval import generation_mode
    from dist_ft.rank.tokenizer import byte_tokenizer

    register()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=259, attn_implementation=SDPA_VARLEN))
    engine, tokenizer = ModelHolder(lm).train(), byte_tokenizer()
    prompt = tokenizer("Reverse the word: rocket\n", add_special_tokens=False)["input_ids"]
    rng = torch.get_rng_state()
    with generation_mode(engine) as model:
        assert model.config._attn_implementation == "sdpa" and not engine.training
        answer = generate_ids(model, tokenizer, prompt, Sampling(max_new_tokens=6))
        first = int(model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=1, do_sample=False)[0, -1])
        stopped = generate_ids(model, tokenizer, prompt, Sampling(max_new_tokens=6), stop_ids=(first,))
    assert lm.config._attn_implementation == SDPA_VARLEN and engine.training
    assert torch.equal(torch.get_rng_state(), rng), "the training RNG is untouched"
    assert len(answer) > len(stopped) and stopped == tokenizer.decode([first]), "a stop token ends the answer"
