"""`dist-ft eval` on a tiny random Llama with the byte tokenizer: the maths, the bookkeeping, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dist_ft.cli import main
from dist_ft.recipe.config import apply_overrides, recipe_from_dict
from dist_ft.evaluation.eval_model import resolve_target
from dist_ft.decoding.bands import Band, band_edges
from dist_ft.evaluation.eval_nll import BandTotal, add_to_bands, stdlib_files, token_nll
from dist_ft.evaluation.eval_passkey import FILLER, INTRO, NEEDLE, QUESTION, make_haystack
from dist_ft.rank.model import build_model
from dist_ft.recipe.model_shape import shape_from_config
from dist_ft.plan.plan import Plan, make_plan
from dist_ft.rank.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer
from tests.conftest import demo_raw
from tests.helpers import tiny_llama

NATIVE = 128
TINY = tiny_llama(max_position_embeddings=NATIVE, vocab_size=BYTE_VOCAB_SIZE)
QUICK = ["--lengths", "64,128", "--passkey-lengths", "512", "--depths", "0,1", "--trials", "1", "--windows", "1",
         "--dtype", "fp32"]


def tiny_model():
    return build_model(name_or_path=None, config_overrides=TINY, attn_implementation="sdpa", seed=3).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_chunked_nll_equals_full_logits_nll():
    model = tiny_model()
    ids = torch.randint(0, BYTE_VOCAB_SIZE, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    expected = F.cross_entropy(logits.float(), ids[0, 1:], reduction="none")
    chunked = token_nll(model, ids, chunk=64)  # 299 targets: four full chunks and a partial one
    assert chunked.shape == (299,)
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=0)


def test_bands_split_at_shorter_lengths_and_native_context():
    lengths = [2048, 4096, 8192, 16384]
    assert [b.label for b in band_edges(16384, lengths, native=8192)] == ["0-2k", "2k-4k", "4k-8k", "8k-16k"]
    assert [b.label for b in band_edges(2048, lengths, native=8192)] == ["0-512", "512-1k", "1k-2k"]
    assert [(b.start, b.end) for b in band_edges(1000, [], native=300)] == [(0, 250), (250, 300), (300, 500),
                                                                            (500, 1000)]


def test_band_totals_count_every_predicted_token_once():
    length = 64
    nll = torch.arange(1, length, dtype=torch.float32)  # entry i = position i+1, value = its position
    bands = band_edges(length)
    totals: dict[Band, BandTotal] = {}
    add_to_bands(totals, nll, bands)
    add_to_bands(totals, nll, bands)
    assert sum(t.tokens for t in totals.values()) == 2 * (length - 1)
    first, last = totals[bands[0]], totals[bands[-1]]
    assert first.tokens == 2 * 15 and first.nll_sum == 2 * sum(range(1, 16))  # position 0 is never predicted
    assert last.tokens == 2 * 32 and last.nll_sum == 2 * sum(range(32, 64))


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_haystack_has_exact_length_and_needle_at_depth(depth):
    tok = byte_tokenizer()
    hay = make_haystack(tok, 2000, depth, "48213")
    assert hay.prompt_len == 2000
    assert tok.decode(hay.input_ids[hay.prompt_len:]) == " 48213"
    assert tok.decode(hay.input_ids[:hay.prompt_len]).endswith(QUESTION)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    needle = ids(NEEDLE.format(key="48213"))
    assert hay.input_ids[hay.needle_start:hay.needle_start + len(needle)] == needle
    filler_len = 2000 - len(ids(INTRO)) - len(needle) - len(ids(QUESTION))
    filler_before = hay.needle_start - len(ids(INTRO))
    # The needle snaps to a filler-sentence boundary: at most half a sentence from the exact depth.
    assert abs(filler_before - depth * filler_len) <= len(ids(FILLER)) / 2


def test_cli_writes_results_and_both_plots(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", str(model_dir), *QUICK, "--rope-type", "none", "yarn", "--rope-factor", "2",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == ["none", "yarnx2"]
    yarn = results["variants"]["yarnx2"]
    assert yarn["rope_parameters"]["rope_type"] == "yarn" and yarn["native_context"] == NATIVE
    assert [b["band"] for b in yarn["perplexity"]["128"]["bands"]] == ["0-32", "32-64", "64-128"]
    assert yarn["perplexity"]["128"]["tokens"] == 127
    assert set(yarn["passkey"]["512"]) == {"0.0", "1.0"}
    assert (out / "ppl_vs_length.png").stat().st_size > 0 and (out / "passkey.png").stat().st_size > 0
    assert "ppl @    128" in capsys.readouterr().out


def test_adapter_dir_evaluates_base_plus_adapter(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = build_model(name_or_path=str(model_dir), attn_implementation="sdpa")
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "stages" / "sft" / "export" / "adapter"
    adapted.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)

    for name, source in (("base", model_dir), ("adapter", adapter)):
        assert main(["eval", str(source), *QUICK, "--passkey-lengths", "", "--out", str(tmp_path / name)]) == 0
    with_adapter = json.loads((tmp_path / "adapter" / "results.json").read_text())
    without = json.loads((tmp_path / "base" / "results.json").read_text())
    assert with_adapter["adapter_dir"] == str(adapter) and with_adapter["model_dir"] == str(model_dir)
    ppl = lambda r: r["variants"]["keep"]["perplexity"]["128"]["ppl"]  # noqa: E731
    assert ppl(with_adapter) != pytest.approx(ppl(without), rel=1e-6)  # the random LoRA weights were applied


def test_run_dir_resolves_to_last_finished_stage(model_dir, tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "plan.json").write_text(plan_with_stages(run, "r", ["ctx256", "ctx512", "sft"]).to_json())
    for name in ("ctx256", "ctx512"):
        (run / "stages" / name / "export").mkdir(parents=True)
        (run / "stages" / name / "export" / "config.json").write_text("{}")
    (run / "stages" / "ctx256" / "DONE").touch()  # ctx512 stopped early, sft never ran
    target = resolve_target(str(run))
    assert target.model_dir == str(run / "stages" / "ctx256" / "export") and target.label == "r/ctx256"


def plan_with_stages(run, name, stages):
    """The demo's plan, named `name`, with the stages `stages` (two long-context ones, then sft)."""
    raw = apply_overrides(demo_raw(), [f"name={name}", "tracking.mode=disabled", "long_context.progressive.start=256",
                                       "long_context.progressive.target=512", f"finetune.name={stages[-1]}"])
    recipe = recipe_from_dict(raw)
    plan = make_plan(recipe, shape_from_config(recipe.model.config, "test"), str(run))
    assert [s.name for s in plan.stages] == stages
    return plan


def test_heldout_text_leaves_out_the_demo_training_packages():
    parts = {part for path in stdlib_files() for part in path.parts}
    assert stdlib_files() and "json" not in parts and "email" not in parts


@pytest.mark.parametrize("extra, message", [
    (["--lengths", "1024"], "exceed what RoPE keep can address (512 tokens"),
    (["--rope-type", "yarn"], "needs --rope-factor"),
    (["--depths", "0,2"], "every depth must be in [0, 1]"),
    (["--lengths", "12x"], "expected comma-separated integers"),
    (["--text", "/no/such/file.txt"], "no such file or folder"),
])
def test_bad_inputs_exit_2_with_one_clear_line(model_dir, capsys, extra, message):
    assert main(["eval", str(model_dir), *QUICK, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_model_path_exits_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), *QUICK]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["eval", "package:surely_not_installed_pkg", *QUICK]) == 2


def finished_run(tmp_path, model_dir, base: str | None = None):
    """A run dir whose two long-context stages finished (exports: the tiny model, then a retrained one)."""
    run = tmp_path / "run"
    run.mkdir()
    plan = plan_with_stages(run, "r", ["ctx256", "ctx512", "sft"])
    if base:  # the same plan over a pretrained starting model
        from dataclasses import replace

        plan = replace(plan, model=replace(plan.model, name_or_path=base, config=None))
    (run / "plan.json").write_text(plan.to_json())
    for name, seed in (("ctx256", 3), ("ctx512", 4)):
        export = run / "stages" / name / "export"
        build_model(name_or_path=None, config_overrides=TINY, attn_implementation="sdpa", seed=seed).save_pretrained(export)
        byte_tokenizer().save_pretrained(export)
        (run / "stages" / name / "DONE").touch()
    return run


def test_stages_all_compares_every_finished_stage_with_the_starting_model(model_dir, tmp_path, capsys):
    run = finished_run(tmp_path, model_dir, base=str(model_dir))
    assert main(["eval", str(run), *QUICK, "--stages", "all"]) == 0
    comparison = json.loads((run / "eval" / "stages.json").read_text())
    assert comparison["stages"] == ["base", "ctx256", "ctx512"]
    per_stage = {name: json.loads((run / "eval" / name / "results.json").read_text()) for name in comparison["stages"]}
    for row in comparison["rows"]:
        own = per_stage[row["stage"]]["variants"]["keep"]
        assert row["ppl"]["128"]["all"] == own["perplexity"]["128"]["ppl"]
        assert set(row["ppl"]["128"]["bands"]) == {"0-32", "32-64", "64-128"}
        assert row["passkey"]["512"] == sum(own["passkey"]["512"].values()) / 2
    assert per_stage["base"]["model_dir"] == str(model_dir)
    # the base and ctx256 are the same weights (seed 3), ctx512 other ones
    assert comparison["rows"][0]["ppl"]["128"]["all"] == pytest.approx(comparison["rows"][1]["ppl"]["128"]["all"])
    assert comparison["rows"][2]["ppl"]["128"]["all"] != pytest.approx(comparison["rows"][1]["ppl"]["128"]["all"])
    assert (run / "eval" / "stages.png").stat().st_size > 0
    assert "what each stage bought" in capsys.readouterr().out


def test_stages_of_a_random_init_run_and_bad_stage_names(model_dir, tmp_path, capsys):
    run = finished_run(tmp_path, model_dir)
    assert main(["eval", str(run), *QUICK, "--stages", "ctx512,ctx256"]) == 0
    out = capsys.readouterr().out
    assert "starting model not evaluated: the recipe initialises it at random" in out
    assert json.loads((run / "eval" / "stages.json").read_text())["stages"] == ["ctx256", "ctx512"]  # run order
    assert main(["eval", str(run), *QUICK, "--stages", "sft"]) == 2
    assert "['sft'] not among the run's finished stages (ctx256, ctx512)" in capsys.readouterr().err
    assert main(["eval", str(model_dir), *QUICK, "--stages", "all"]) == 2
    assert "--stages needs a run dir" in capsys.readouterr().err


def test_several_windows_report_their_range_and_one_window_warns(model_dir, tmp_path, capsys):
    argv = ["eval", str(model_dir), "--lengths", "128", "--passkey-lengths", "", "--dtype", "fp32"]
    assert main([*argv, "--windows", "3", "--out", str(tmp_path / "three")]) == 0
    row = json.loads((tmp_path / "three" / "results.json").read_text())["variants"]["keep"]["perplexity"]["128"]
    assert row["windows"] == 3 and len(row["window_ppl"]) == 3
    assert min(row["window_ppl"]) <= row["ppl"] <= max(row["window_ppl"])
    out = capsys.readouterr().out
    assert f"per window {min(row['window_ppl']):.2f}-{max(row['window_ppl']):.2f}" in out and "warning" not in out
    assert main([*argv, "--windows", "1", "--out", str(tmp_path / "one")]) == 0
    assert "warning: each perplexity rests on one window" in capsys.readouterr().out


def test_stages_all_defaults_to_the_runs_own_evaluation_lengths(model_dir, tmp_path, capsys):
    """Without --lengths a run dir is evaluated at its recipe's evaluation lengths, which its stages can address
    (the CLI's 2k-16k defaults exceed the demo's reach)."""
    from dataclasses import replace

    run = finished_run(tmp_path, model_dir)
    plan = Plan.from_json((run / "plan.json").read_text())
    plan = replace(plan, evaluation=replace(plan.evaluation, lengths=[64, 128], passkey_lengths=[256]))
    (run / "plan.json").write_text(plan.to_json())
    assert main(["eval", str(run), "--stages", "all", "--windows", "1", "--trials", "1", "--depths", "0",
                 "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "[eval] r/ctx256: RoPE keep, fp32 on cpu\n" in out
    variant = json.loads((run / "eval" / "ctx512" / "results.json").read_text())["variants"]["keep"]
    assert (list(variant["perplexity"]), list(variant["passkey"])) == (["64", "128"], ["256"])
    (run / "plan.json").write_text(replace(plan, evaluation=None).to_json())  # no section: the stages' seq_len
    assert main(["eval", str(run), "--passkey-lengths", "", "--windows", "1", "--dtype", "fp32"]) == 0
    assert list(json.loads((run / "eval" / "ctx512" / "results.json").read_text())["variants"]["keep"]["perplexity"]) \
        == ["256", "512"]


def test_a_length_beyond_reach_is_named_once(model_dir, capsys):
    assert main(["eval", str(model_dir), "--lengths", "2048,1024", "--dtype", "fp32"]) == 2
    assert "error: length(s) [1024, 2048] exceed what RoPE keep can address (512 tokens, native 128)" \
        in capsys.readouterr().err


def test_lm_eval_without_the_package_names_it(model_dir, capsys):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here: the missing-package message cannot show")
    assert main(["eval", str(model_dir), "--lm-eval", "hellaswag"]) == 2
    assert capsys.readouterr().err == ("error: --lm-eval needs the `lm-eval` package (EleutherAI's "
                                       "lm-evaluation-harness), which is not installed here: pip install lm-eval\n")


def test_the_short_context_check_compares_the_stage_with_the_starting_model_inside_the_native_window(tmp_path):
    from dist_ft.evaluation.short_context import check_short_context

    plan = plan_with_stages(tmp_path, "r", ["ctx256", "ctx512", "sft"])  # the demo's shape: native 256

    def write(name, ppl_by_length):
        folder = plan.run.eval(name)
        folder.mkdir(parents=True, exist_ok=True)
        perplexity = {str(n): {"ppl": v} for n, v in ppl_by_length.items()}
        (folder / "results.json").write_text(json.dumps({"variants": {"keep": {"perplexity": perplexity}}}))

    said = []
    write("ctx256", {128: 9.0, 256: 10.0, 1024: 12.0})
    assert check_short_context(plan, "ctx256", said.append) is None
    write("base", {128: 9.0, 256: 9.0, 1024: 40.0})
    record = check_short_context(plan, "ctx256", said.append)
    write("ctx512", {256: 9.3, 1024: 11.0})
    check_short_context(plan, "ctx512", said.append)
    assert said == ["[eval] short-context check skipped: the starting model was not evaluated",
                    "[eval] warning: short-context regression: ppl @ 256 (inside the native 256) 9.000 -> 10.000 "
                    "(+11.1%; threshold +5%)",
                    "[eval] short-context check: ppl @ 256 (inside the native 256) 9.000 -> 9.300 (+3.3%; threshold +5%)"]
    assert record == {"stage": "ctx256", "length": 256, "native": 256, "ppl": 10.0, "base_ppl": 9.0,
                      "change": pytest.approx(1 / 9), "threshold": 0.05, "regressed": True}
    assert json.loads((plan.run.eval("ctx256") / "short_context.json").read_text())["regressed"] is True
    assert check_short_context(plan, "sft", said.append) is None and len(said) == 3  # not a long-context stage


def test_tasks_ruler_writes_a_per_length_per_task_table_and_plot(model_dir, tmp_path, capsys):
    out = tmp_path / "ruler"
    assert main(["eval", str(model_dir), "--tasks", "ruler", "--passkey-lengths", "1024", "--depths", "0",
                 "--trials", "1", "--dtype", "fp32", "--out", str(out), "--allow-beyond"]) == 0
    printed = capsys.readouterr().out
    variant = json.loads((out / "results.json").read_text())["variants"]["keep"]
    assert variant["perplexity"] == {} and variant["passkey"] == {}  # only what --tasks asked for
    assert list(variant["ruler"]["scores"]) == ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                                               "vt", "cwe"]
    assert all(list(row) == ["1024"] and 0 <= row["1024"] <= 100 for row in variant["ruler"]["scores"].values())
    assert "RULER (keep): string_match_all, % of references found in the answer\n| task | 1024 |" in printed
    assert (out / "ruler.png").stat().st_size > 0
    assert main(["eval", str(model_dir), "--tasks", "ruler,bogus"]) == 2
    assert "--tasks 'ruler,bogus': choose from ppl, passkey, ruler" in capsys.readouterr().err
