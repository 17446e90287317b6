"""`dist-ft generate` on real exports: a full model dir, a LoRA adapter over its base and a
prompt-tuning adapter, each answering exactly what transformers' (or peft's) own generate answers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_ft.cli import main
from dist_ft.rank.tokenizer import byte_tokenizer
from tests.helpers import llama_kwargs, tiny_llama

TINY = llama_kwargs(tiny_llama(rope_theta=None))
PROMPT = "Reverse the word: rocket\n"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def load(path):
    return LlamaForCausalLM.from_pretrained(path).eval()


def reference(model, prompt, new_tokens=8, **sampling):
    tok = byte_tokenizer()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             pad_token_id=tok.pad_token_id, **sampling)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generate(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_prompt_streams_the_greedy_answer(base_dir, capsys):
    code, out, err = generate(capsys, base_dir, "--prompt", PROMPT, "--max-new-tokens", 8)
    want = reference(load(base_dir), PROMPT, do_sample=False)
    assert code == 0 and out.rstrip("\n") == want and want
    assert f"[generate] {base_dir}: fp32 on cpu\n" in err  # the device and dtype it used, off standard output


def test_a_prompts_file_writes_jsonl_with_references(base_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n\n"
                       + json.dumps({"instruction": "Add.", "input": "2 3", "output": "5"}) + "\n")
    out = tmp_path / "answers.jsonl"
    code, _, _ = generate(capsys, base_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", 6)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and len(rows) == 2
    assert rows[0] == {"prompt": PROMPT, "output": reference(load(base_dir), PROMPT, 6, do_sample=False)}
    assert rows[1]["prompt"].endswith("### Instruction:\nAdd.\n\n### Input:\n2 3\n\n### Response:\n")
    assert rows[1]["reference"] == "5"
    assert not list(tmp_path.glob(".*partial"))


def test_chat_wraps_the_prompt_in_the_tokenizers_template(base_dir, capsys):
    code, out, _ = generate(capsys, base_dir, "--prompt", "Hi", "--chat", "--max-new-tokens", 5)
    assert code == 0 and out.rstrip("\n") == reference(load(base_dir), "<|user|>\nHi<|eos|>\n<|assistant|>\n", 5,
                                                       do_sample=False)


def test_sampling_is_seeded(base_dir, capsys):
    argv = [base_dir, "--prompt", PROMPT, "--temperature", 1.5, "--top-k", 50, "--max-new-tokens", 12]
    first = generate(capsys, *argv, "--seed", 3)[1]
    assert generate(capsys, *argv, "--seed", 3)[1] == first
    assert generate(capsys, *argv, "--seed", 4)[1] != first


def test_a_lora_adapter_over_its_base(base_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(load(base_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    code, out, _ = generate(capsys, tmp_path / "adapter", "--prompt", PROMPT, "--max-new-tokens", 8)
    want = reference(peft_model.eval(), PROMPT, do_sample=False)
    assert code == 0 and out.rstrip("\n") == want
    assert want != reference(load(base_dir), PROMPT, do_sample=False)  # the adapter changed the answer


def test_a_prompt_tuning_adapter_keeps_its_virtual_tokens(base_dir, tmp_path, capsys):
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(2)
    peft_model = get_peft_model(load(base_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(std=3.0)
    peft_model.save_pretrained(tmp_path / "prompt")
    code, out, _ = generate(capsys, tmp_path / "prompt", "--prompt", PROMPT, "--max-new-tokens", 8)
    assert code == 0 and out.rstrip("\n") == reference(peft_model.eval(), PROMPT, do_sample=False)


@pytest.mark.parametrize("argv, says", [
    (["--prompt", "x", "--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature nan must be a number"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0 must be in"),
    (["--prompt", "x", "--top-k", "0"], "--top-k 0 must be at least 1"),
])
def test_bad_sampling_settings_exit_2(base_dir, capsys, argv, says):
    code, _, err = generate(capsys, base_dir, *argv)
    assert code == 2 and says in err and "Traceback" not in err


def test_bad_prompt_files_and_models_exit_2(base_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n{"prompt": 3}\n' + "[" * 100_000 + "\n")
    code, _, err = generate(capsys, base_dir, "--prompts", bad)
    assert code == 2 and "line(s) [2, 3, 4]" in err
    code, _, err = generate(capsys, tmp_path / "missing", "--prompt", "x")
    assert code == 2 and "no such model directory" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert generate(capsys, base_dir, "--prompts", empty)[0] == 2


def test_metrics_score_the_answers_against_the_references(base_dir, tmp_path, capsys):
    prompts = tmp_path / "task.jsonl"
    answer = reference(load(base_dir), PROMPT, 4, do_sample=False)
    prompts.write_text(json.dumps({"prompt": PROMPT, "reference": answer}) + "\n"
                       + json.dumps({"prompt": PROMPT, "reference": "something else"}) + "\n")
    out = tmp_path / "answers.jsonl"
    code, _, err = generate(capsys, base_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", 4,
                            "--metrics", "exact_match,chrf")
    metrics = json.loads((tmp_path / "answers.jsonl.metrics.json").read_text())
    assert code == 0 and metrics["prompts"] == 2 and metrics["exact_match"] == 50.0
    assert "exact_match 50.00" in err
    code, _, err = generate(capsys, base_dir, "--prompts", prompts, "--metrics", "bleu,exactness")
    assert code == 2 and "choose from" in err
