"""Every bad recipe fails at plan time: exit 2, the field's dotted path, a fix, nothing written."""

import subprocess
import sys

import pytest

from dist_ft.cli import main
from tests.conftest import demo_raw


def set_in(raw, dotted, value):
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


DELETE = object()
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "vocab_size": 259}
EXPLICIT_STAGES = {"tokens_per_step": 4096, "data": {"paths": ["package:json"]},
                   "stages": [{"name": "a", "seq_len": 1024, "steps": 2}, {"name": "b", "seq_len": 512, "steps": 2}]}

CASES = {
    "unknown key": ([("model.dtpye", "bf16")], "model.dtpye", "did you mean `dtype`"),
    "wrong type": ([("cluster.nodes", "four")], "cluster.nodes", "expected an integer"),
    "missing field": ([("long_context.tokens_per_step", DELETE)], "long_context.tokens_per_step", "required"),
    "zero size": ([("finetune.global_batch_size", 0)], "finetune.global_batch_size", ">= 1"),
    "negative size": ([("long_context.progressive.start", -8)], "long_context.progressive.start", ">= 16"),
    "seq_len not increasing": ([("long_context", EXPLICIT_STAGES)], "long_context.stages[1].seq_len",
                               "does not grow"),
    "rope factor below 1": ([("long_context.progressive.rope.factor", 0.5)],
                            "long_context.progressive.rope.factor", "must be >= 1"),
    "yarn without original context": ([("model.name_or_path", "some-org/unreadable-model"),
                                       ("model.config", None)],
                                      "long_context.progressive.rope.original_max_position_embeddings",
                                      "original context"),
    "sp not dividing world": ([("parallelism.sequence_parallel", 3)], "parallelism.sequence_parallel",
                              "does not divide the world size 2"),
    "sp not dividing heads": ([("cluster.procs_per_node", 3), ("parallelism.sequence_parallel", 3)],
                              "parallelism.sequence_parallel", "4 attention heads"),
    "sp with eager attention": ([("model.attn_implementation", "eager"), ("parallelism.sequence_parallel", 2)],
                                "parallelism.sequence_parallel", "eager attention"),
    "sp not fitting kv heads": ([("cluster.procs_per_node", 4), ("parallelism.sequence_parallel", 4),
                                 ("model.config.hidden_size", 96), ("model.config.num_attention_heads", 12),
                                 ("model.config.num_key_value_heads", 3)],
                                "parallelism.sequence_parallel", "3 key/value heads"),
    "prefix with checkpointing": ([("finetune.method", "prefix"), ("model.gradient_checkpointing", True),
                                   ("finetune.data.packing", False)],
                                  "finetune.method", "gradient checkpointing"),
    "prompt with sequence parallel": ([("finetune.method", "prompt"), ("parallelism.sequence_parallel", 2),
                                       ("finetune.data.packing", False),
                                       ("model.config.num_attention_heads", 4)],
                                      "finetune.method", "sequence parallelism"),
    "prompt tuning with packing": ([("finetune.method", "prompt")], "finetune.data.packing",
                                   "attend to each other"),
    "qlora on cpu ranks": ([("finetune.method", "qlora")], "finetune.method", "qlora needs GPUs"),
    "flash attention on cpu ranks": ([("model.attn_implementation", "flash_attention_2")],
                                     "model.attn_implementation", "needs GPUs"),
    "bad time limit": ([("cluster.time_limit", "1 day")], "cluster.time_limit", "not a SLURM time"),
    "missing data path": ([("finetune.data.paths", ["data/nope.jsonl"])], "finetune.data.paths[0]",
                          "does not exist"),
    "unknown method": ([("finetune.method", "lorra")], "finetune.method", "did you mean `lora`"),
    "offload on zero-1": ([("parallelism.zero_stage", 1), ("parallelism.offload_optimizer", "cpu")],
                          "parallelism.offload_optimizer", "ZeRO stage 2 or 3"),
    "rope scaling on learned positions": ([("model.config", {**GPT2, "n_positions": 2048})],
                                          "long_context.progressive.rope.type", "gpt2 has no RoPE to scale"),
    "learned position table too short": ([("model.config", GPT2), ("long_context.progressive.rope.type", "none")],
                                         "long_context.progressive.extend_positions", "learned table of 256"),
    "extend_positions on a rope model": ([("long_context.progressive.extend_positions", "copy")],
                                         "long_context.progressive.extend_positions", "no learned position table"),
    "longrope without factors": ([("long_context.progressive.rope.type", "longrope")],
                                 "long_context.progressive.rope.short_factor", "needs per-frequency factors"),
    "rope field the type ignores": ([("long_context.progressive.rope.short_factor", [1.0] * 8)],
                                    "long_context.progressive.rope.short_factor", "not used by `type: yarn`"),
    "dynamic inside the original context": ([("long_context.progressive.rope.type", "dynamic"),
                                             ("long_context.progressive.rope.original_max_position_embeddings", 512)],
                                            "long_context.progressive.rope.type", "only beyond the original"),
    "yarn beta_fast below beta_slow": ([("long_context.progressive.rope.beta_fast", 1.0),
                                        ("long_context.progressive.rope.beta_slow", 32.0)],
                                       "long_context.progressive.rope.beta_fast", "must exceed beta_slow"),
    "llama3 band upside down": ([("long_context.progressive.rope.type", "llama3"),
                                 ("long_context.progressive.rope.low_freq_factor", 4.0),
                                 ("long_context.progressive.rope.high_freq_factor", 1.0)],
                                "long_context.progressive.rope.high_freq_factor", "must exceed low_freq_factor"),
    "packed rows under flash attention": ([("cluster.gpus_per_node", 1), ("cluster.procs_per_node", DELETE),
                                           ("model.attn_implementation", "flash_attention_2"),
                                           ("finetune.micro_batch_size", 2)],
                                          "finetune.micro_batch_size", "attend across documents"),
    "eval beyond what a stage addresses": ([("evaluation", {"after_each_stage": True, "lengths": [65536]})],
                                           "evaluation.lengths", "beyond what stage"),
    "activation offload without checkpointing": ([("model.offload_activations", True),
                                                  ("model.gradient_checkpointing", False)],
                                                 "model.offload_activations", "needs gradient_checkpointing"),
    "mlp tiles of zero tokens": ([("model.tiled_mlp_tokens", 0)], "model.tiled_mlp_tokens", ">= 1"),
    "tiled mlp on experts": ([("model.config.num_local_experts", 4), ("model.tiled_mlp_tokens", 256)],
                             "model.tiled_mlp_tokens", "routes tokens to experts"),
    "liger on cpu ranks": ([("model.loss_kernel", "liger")], "model.loss_kernel", "CUDA only"),
    "liger under zero-3": ([("model.loss_kernel", "liger"), ("parallelism.zero_stage", 3)], "model.loss_kernel",
                           "ZeRO-3 partitions"),
    "eval depth outside [0, 1]": ([("evaluation", {"depths": [0.5, 2.0]})], "evaluation.depths", "outside [0, 1]"),
    "stage name read as an option": ([("finetune.name", "-x")], "finetune.name", "not a valid name"),
    "run name read as an option": ([("name", "--help")], "name", "not a valid name"),
    "stage name in another script": ([("finetune.name", "ſft")], "finetune.name", "not a valid name"),
    "stage name prefix read as an option": ([("long_context.progressive.name_prefix", "-c")],
                                            "long_context.progressive.name_prefix", "not a valid name"),
    "env key the script owns": ([("cluster.env", {"STAGE": "ctx512"})], "cluster.env.STAGE",
                                "variable of the generated launch script"),
    "env key bash owns": ([("cluster.env", {"SHELLOPTS": "xtrace"})], "cluster.env.SHELLOPTS", "special meaning"),
    "time limit not a time": ([("cluster.time_limit", -5)], "cluster.time_limit", "not a SLURM time"),
    "empty interpreter": ([("cluster.python", " ")], "cluster.python", "is empty"),
    "early stopping without validation data": ([("finetune.data.validation_fraction", DELETE),
                                                ("finetune.samples", DELETE), ("finetune.metrics", ["loss"]),
                                                ("finetune.metric_rows", DELETE)],
                                               "finetune.early_stopping", "no validation data"),
    "the replaced patience key": ([("finetune.early_stopping_patience", 3)], "finetune.early_stopping_patience",
                                  "was replaced"),
    "unknown task metric": ([("finetune.metrics", ["loss", "f1"])], "finetune.metrics", "'f1' is not a metric"),
    "missing test file": ([("finetune.data.test_paths", ["data/nope.jsonl"])], "finetune.data.test_paths[0]",
                          "does not exist"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("command", ["plan", "render", "launch"])
def test_bad_recipe_exits_2_with_the_path_and_writes_nothing(case, command, recipe_file, tmp_path, capsys):
    edits, path, message = CASES[case]
    raw = demo_raw()
    for dotted, value in edits:
        set_in(raw, dotted, value)
    recipe = recipe_file(raw)
    extra = ["--dry-run"] if command == "launch" else []
    assert main([command, str(recipe), *extra]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and message in err, err
    assert "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists(), "nothing may be written for a bad recipe"


def test_console_script_exit_code_and_no_traceback_without_debug(recipe_file):
    raw = demo_raw()
    raw["cluster"]["nodes"] = 0
    recipe = recipe_file(raw)
    run = [sys.executable, "-m", "dist_ft", "plan", str(recipe)]
    plain = subprocess.run(run, capture_output=True, text=True)
    assert plain.returncode == 2 and "cluster.nodes: must be >= 1" in plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run(run + ["--debug"], capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_local_backend_refuses_several_nodes(recipe_file, tmp_path, capsys):
    raw = demo_raw()
    raw["cluster"]["nodes"] = 2
    assert main(["launch", str(recipe_file(raw)), "--dry-run"]) == 2
    assert "cluster.nodes: the local backend runs one node" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
