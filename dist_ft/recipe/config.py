"""The recipe: typed, frozen, strictly loaded. No I/O here beyond reading the YAML text.

Single-object checks live in `__post_init__`; checks that need several sections
or the model's shape live in `dist_ft/plan/checks.py`. The data section is in `data_section.py`, the
run's infrastructure in `run_sections.py`, optimizer and schedule in `optimization.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from .finetune_options import (  # noqa: F401 - re-exported: the method's vocabulary is the recipe's
    ADAPTER_DOC, ANSWER_METRICS, ATTENTION_DOC, BASE_CHANGING_INITS, EVAL_METRICS, GROUP_DOC, LONG_CONTEXT_METHOD_DOC,
    LONG_EVAL_EVERY_DOC, LORA_FAMILY, LOSS_METRICS, MAX_NEW_TOKENS, MAX_SAMPLES, OPTION_METHODS, PEFT_ADAPTERS,
    PEFT_WITH_MODULES_TO_SAVE, VIRTUAL_TOKEN_METHODS, WARN_ONLY_OPTIONS, EarlyStopping, LongContextMethod, LoraBias,
    LoraInit, Method, MethodOptions, Samples, metric_direction)
from .limits import (  # noqa: F401 - re-exported: the bounds are part of the recipe's vocabulary
    MAX_ADAPTER_SIZE, MAX_BATCH, MAX_EPOCHS, MAX_GPUS_PER_NODE, MAX_MICRO_BATCH, MAX_NAME, MAX_NODES,
    MAX_PROCS_PER_NODE, MAX_ROPE_FACTOR, MAX_ROPE_THETA, MAX_SEED, MAX_SEQ_LEN, MAX_STAGES, MAX_STEPS, MAX_TOKENS,
    MAX_TOKENS_PER_STEP)
from .data_section import FORMAT_FIELDS, MAX_SOURCES, Data, Source, UpsampleLong  # noqa: F401 - re-exported
from .model_shape import SHAPE_KEYS
from .optimization import (  # noqa: F401 - re-exported: the sections are the recipe's
    ADAM_FAMILY, FLOOR_SHORTHAND_DOC, OPTIMIZER_DEFAULTS, OPTIMIZER_DOC, SCHEDULER_DOC, WARMUP_SHORTHAND_DOC,
    Optimizer, Scheduler, effective_scheduler)
from .prompts import template_problem
from .raw_recipe import apply_overrides, to_dict  # noqa: F401 - re-exported: loading is the recipe's
from .recipe_yaml import read_recipe
from .run_sections import (  # noqa: F401 - re-exported: the sections are the recipe's
    Checkpointing, Cluster, Evaluation, Parallelism, Tracking, printable_line)
from .names import check_name
from .strict import Invalid, build, spec

RopeType = Literal["none", "linear", "dynamic", "yarn", "llama3", "longrope"]
PositionExtension = Literal["none", "interpolate", "copy", "init"]
EXTEND_POSITIONS_DOC = ("Models with a learned position table (GPT-2 style) shorter than seq_len: how to grow "
                        "it. interpolate: resample the table over the new length (position interpolation); "
                        "copy: keep the rows, repeat them for the new positions; init: keep the rows, draw the "
                        "new ones from their statistics. RoPE models use `rope` instead.")
Precision = Literal["fp32", "bf16", "fp16"]
# torch's name of each precision (torch is imported only where tensors are made: not by the launcher).
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Upper bounds on user numbers: far beyond any real run, yet small enough that every loop and product

@dataclass(frozen=True)
class Rope:
    type: RopeType = spec("none", doc="RoPE scaling kind; none keeps the model's own (rope_theta may still change).")
    factor: float | None = spec(None, max=MAX_ROPE_FACTOR,
                                doc="Scale factor; derived from seq_len / original context when unset.")
    original_max_position_embeddings: int | None = spec(None, min=1, max=MAX_SEQ_LEN,
                                                        doc="The model's pre-training context.")
    rope_theta: float | None = spec(None, min=1, max=MAX_ROPE_THETA,
                                    doc="New RoPE base (theta raise, as Llama 3 / EasyContext).")
    beta_fast: float | None = spec(None, doc="YaRN: high-frequency boundary.")
    beta_slow: float | None = spec(None, doc="YaRN: low-frequency boundary.")
    attention_factor: float | None = spec(None, doc="YaRN/LongRoPE: attention temperature.")
    low_freq_factor: float | None = spec(None, doc="llama3: low-frequency factor (default 1).")
    high_freq_factor: float | None = spec(None, doc="llama3: high-frequency factor (default 4).")
    short_factor: list[float] | None = spec(None, doc="LongRoPE: per-frequency factors within the original window.")
    long_factor: list[float] | None = spec(None, doc="LongRoPE: per-frequency factors beyond it.")


@dataclass(frozen=True)
class Model:
    name_or_path: str | None = spec(None, doc="Local dir, hub name, or `package:NAME` (folder of an installed package).")
    gguf_file: str | None = spec(None, doc="GGUF file inside name_or_path.")
    revision: str | None = spec(None, doc="A hub id's branch, tag or commit. The plan reads that snapshot from this "
                                          "machine's Hugging Face cache (`dist-ft prepare` fetches it) and the ranks "
                                          "load the snapshot folder.")
    config: dict[str, Any] | None = spec(None, doc="Random-init model from this transformers config (tiny models) "
                                                   "when name_or_path is unset.")
    tokenizer: str | None = spec(None, doc="`byte` for the built-in byte tokenizer, or a tokenizer path.")
    dtype: Precision = spec("bf16", doc="Training precision.")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa_varlen", "sdpa", "eager"] = spec(
        "auto", doc="auto: flash_attention_2 when flash-attn imports and CUDA is present, else sdpa_varlen "
                    "(SDPA per packed document: memory linear in seq_len; sdpa and eager build an L×L mask).")
    gradient_checkpointing: bool = spec(False, doc="Recompute activations in backward.")
    offload_activations: bool = spec(False, doc="Keep the activation checkpoints in host memory between forward and "
                                                "backward (pinned, non-blocking copies): frees layers × tokens × "
                                                "hidden per micro-batch on the GPU for PCIe traffic. Needs "
                                                "gradient_checkpointing.")
    tiled_mlp_tokens: int | None = spec(None, min=1, max=MAX_SEQ_LEN,
                                        doc="Run each decoder MLP over tiles of this many tokens "
                                            "(DeepSpeed's TiledMLP, recomputed in backward): its "
                                            "intermediate activations shrink to one tile's. Unset: off; "
                                            "ALST uses the hidden size.")
    loss_chunk_tokens: int = spec(4096, max=MAX_SEQ_LEN,
                                  doc="The LM head and cross-entropy run over this many tokens at a time, so "
                                      "full-vocabulary logits never exist for a whole long sequence.")
    loss_kernel: Literal["auto", "chunked", "liger"] = spec(
        "auto", doc="How the LM head and cross-entropy run. chunked: loss_chunk_tokens at a time, each chunk's "
                    "gradients taken in forward (recomputed in backward under ZeRO-3); liger: Liger's fused linear cross-entropy (CUDA, liger-kernel installed, not under "
                    "ZeRO-3); auto: liger where it applies, else chunked.")
    trust_remote_code: bool = spec(False, doc="Allow model code from the hub repository.")

    def __post_init__(self) -> None:
        if self.loss_chunk_tokens < 1:
            raise Invalid("loss_chunk_tokens", f"must be at least 1, got {self.loss_chunk_tokens}",
                          "use e.g. 4096 (smaller saves memory at a little speed)")
        if self.offload_activations and not self.gradient_checkpointing:
            raise Invalid("offload_activations", "needs gradient_checkpointing: without checkpoints every "
                          "activation of every layer would cross to host memory and back each step",
                          "set `model.gradient_checkpointing: true` as well")
        if self.name_or_path is None and self.config is None:
            raise Invalid("name_or_path", "is required unless `model.config` builds a model from scratch",
                          "set `model.name_or_path` to a local dir or hub name")
        if self.config is not None and self.name_or_path is None and "model_type" not in self.config:
            raise Invalid("config.model_type", "is required to build a model from a config",
                          "add `model_type: llama` (or another transformers model type)")
        fixed = [key for key in SHAPE_KEYS if key in (self.config or {})] if self.name_or_path else []
        if fixed:  # the checkpoint's weights have these shapes: overriding them cannot load
            raise Invalid(f"config.{fixed[0]}", "is fixed by the pretrained model's weights (model.config "
                          "overrides a pretrained model's other settings, e.g. dropout)",
                          "remove it; RoPE and context change through the stages' `rope` and seq_len")


@dataclass(frozen=True)
class Stage:
    name: str = spec(doc="Unique stage name; used in file names.")
    seq_len: int = spec(min=16, max=MAX_SEQ_LEN, doc="Tokens per sequence.")
    steps: int | None = spec(None, min=1, max=MAX_STEPS, doc="Optimizer steps (or give tokens).")
    tokens: int | None = spec(None, min=1, max=MAX_TOKENS, doc="Tokens to train on; steps = tokens / tokens_per_step.")
    lr: float = spec(2e-5, min=0.0, doc="Peak learning rate (after the warmup).")
    min_lr_ratio: float | None = spec(None, min=0.0, max=1.0, doc=FLOOR_SHORTHAND_DOC)
    warmup_steps: int | None = spec(None, min=0, max=MAX_STEPS, doc=WARMUP_SHORTHAND_DOC)
    optimizer: Optimizer = spec(factory=Optimizer, doc=OPTIMIZER_DOC)
    scheduler: Scheduler = spec(factory=Scheduler, doc=SCHEDULER_DOC)
    rope: Rope = spec(factory=Rope, doc="RoPE scaling for this stage.")
    extend_positions: PositionExtension = spec("none", doc=EXTEND_POSITIONS_DOC)
    micro_batch_size: int | None = spec(None, min=1, max=MAX_MICRO_BATCH,
                                        doc="Sequences per rank per micro-step; planned when unset.")
    method: LongContextMethod = spec("full", doc=LONG_CONTEXT_METHOD_DOC)
    options: MethodOptions = spec(factory=MethodOptions, doc="Method options (as finetune.options).")

    def __post_init__(self) -> None:
        check_name(self.name)
        if (self.steps is None) == (self.tokens is None):
            raise Invalid("steps", "give exactly one of `steps` and `tokens`",
                          "keep `steps: N` or `tokens: N`, not both")
        effective_scheduler(self.scheduler, self.warmup_steps, self.min_lr_ratio)  # the shorthands agree with it

    @property
    def schedule(self) -> Scheduler:
        return effective_scheduler(self.scheduler, self.warmup_steps, self.min_lr_ratio)


@dataclass(frozen=True)
class Progressive:
    start: int = spec(min=16, max=MAX_SEQ_LEN, doc="First seq_len.")
    target: int = spec(min=16, max=MAX_SEQ_LEN, doc="Last seq_len.")
    growth: float = spec(2.0, min=1.1, max=64.0, doc="seq_len multiplier between stages.")
    steps: int | None = spec(None, min=1, max=MAX_STEPS, doc="Optimizer steps per stage.")
    tokens: int | None = spec(None, min=1, max=MAX_TOKENS, doc="Tokens per stage.")
    lr: float = spec(2e-5, min=0.0, doc="Peak learning rate (after the warmup).")
    min_lr_ratio: float | None = spec(None, min=0.0, max=1.0, doc=FLOOR_SHORTHAND_DOC)
    warmup_steps: int | None = spec(None, min=0, max=MAX_STEPS, doc=WARMUP_SHORTHAND_DOC)
    optimizer: Optimizer = spec(factory=Optimizer, doc="Every stage's optimizer, weight decay and gradient clipping.")
    scheduler: Scheduler = spec(factory=Scheduler, doc="Every stage's learning-rate schedule (its peak is `lr`).")
    rope: Rope = spec(factory=Rope, doc="Applied to every stage; factor derived per stage when unset.")
    extend_positions: PositionExtension = spec("none", doc="Applied to every stage: " + EXTEND_POSITIONS_DOC)
    name_prefix: str = spec("ctx", doc="Stage names are prefix + seq_len (ctx8k, ctx16k, ...).")
    method: LongContextMethod = spec("full", doc="Every stage's method: " + LONG_CONTEXT_METHOD_DOC)
    options: MethodOptions = spec(factory=MethodOptions, doc="Every stage's method options (as finetune.options).")

    def __post_init__(self) -> None:
        if self.target < self.start:
            raise Invalid("target", f"{self.target} is below start {self.start}",
                          "set target >= start")
        if (self.steps is None) == (self.tokens is None):
            raise Invalid("steps", "give exactly one of `steps` and `tokens`", "keep one of them")
        effective_scheduler(self.scheduler, self.warmup_steps, self.min_lr_ratio)  # the shorthands agree with it
        if len(self.lengths()) > MAX_STAGES:
            raise Invalid("growth", f"{self.start} to {self.target} by x{self.growth:g} is more than {MAX_STAGES} "
                          "stages", "raise growth (2 doubles seq_len per stage) or start")
        try:  # every stage name must be valid, not only the prefix
            check_name(f"{self.name_prefix}{_short(self.target)}")
        except Invalid as err:
            raise Invalid("name_prefix", err.what, err.fix) from None

    def lengths(self) -> list[int]:
        """Each stage's seq_len; stops counting past MAX_STAGES, so a tiny growth cannot loop for long."""
        lengths, n = [], self.start
        while n < self.target and len(lengths) <= MAX_STAGES:
            lengths.append(n)
            n = max(n + 1, int(n * self.growth))  # int() alone can stall: int(16 * 1.01) == 16
        return lengths + [self.target]

    def expand(self) -> list[Stage]:
        return [Stage(name=f"{self.name_prefix}{_short(n)}", seq_len=n, steps=self.steps, tokens=self.tokens,
                      lr=self.lr, min_lr_ratio=self.min_lr_ratio, warmup_steps=self.warmup_steps, rope=self.rope,
                      extend_positions=self.extend_positions, optimizer=self.optimizer, scheduler=self.scheduler,
                      method=self.method, options=self.options)
                for n in self.lengths()]


@dataclass(frozen=True)
class LongContext:
    tokens_per_step: int = spec(min=16, max=MAX_TOKENS_PER_STEP,
                                doc="Global tokens per optimizer step, kept as seq_len grows.")
    data: Data = spec(doc="Long documents for continued pretraining.")
    stages: list[Stage] = spec(factory=list, doc="Explicit stages, seq_len increasing.")
    progressive: Progressive | None = spec(None, doc="Compact form: start, target, growth.")
    eval_every: int | None = spec(None, min=1, max=MAX_STEPS, doc=LONG_EVAL_EVERY_DOC)
    attention: Literal["full", "shifted_sparse"] = spec("full", doc=ATTENTION_DOC)
    shifted_sparse_group: int | None = spec(None, min=2, max=MAX_SEQ_LEN, doc=GROUP_DOC)
    adapter: Literal["merge", "carry"] = spec("merge", doc=ADAPTER_DOC)

    def __post_init__(self) -> None:
        if self.eval_every and not self.data.has_validation:
            raise Invalid("eval_every", "has no held-out long documents to validate on",
                          "add `long_context.data.validation_fraction: 0.05` (or `validation_paths: [...]`)")
        if self.data.columns:
            raise Invalid("data.columns", "maps fine-tuning rows' fields; long-context documents read `text_field`",
                          "remove columns and set `text_field: <column>`")
        if self.shifted_sparse_group is not None and self.attention != "shifted_sparse":
            raise Invalid("shifted_sparse_group", "is read by `attention: shifted_sparse` only",
                          "set `attention: shifted_sparse`, or remove shifted_sparse_group")
        if not self.data.packing:  # the ranks pack every long-context stage: false would be ignored
            raise Invalid("data.packing", "long-context stages always pack documents into full rows",
                          "remove long_context.data.packing (`long_documents` chooses what happens to a document "
                          "longer than seq_len)")
        if bool(self.stages) == (self.progressive is not None):
            raise Invalid("stages", "give exactly one of `stages` and `progressive`",
                          "list stages explicitly or use `progressive: {start, target, growth}`")
        if len(self.stages) > MAX_STAGES:
            raise Invalid("stages", f"{len(self.stages)} stages are more than {MAX_STAGES}",
                          "grow seq_len in fewer, bigger steps")

    def expanded(self) -> list[Stage]:
        return self.progressive.expand() if self.progressive else list(self.stages)


@dataclass(frozen=True)
class Finetune:
    # Keys this section had before, answered with what to write instead (strict.py reads it).
    replaced_keys: ClassVar[dict[str, str]] = {
        "early_stopping_patience": "write `early_stopping: {patience: N}` (it keeps the best model by eval_loss; "
                                   "`metric` and `mode` choose another)"}

    data: Data = spec(doc="Task data.")
    name: str = spec("finetune", doc="Stage name.")
    method: Method = spec("lora", doc="Which parameters train and how the model is wrapped.")
    options: MethodOptions = spec(factory=MethodOptions, doc="Method options (see finetune.options).")
    format: Literal["text", "instruction", "chat"] = spec("instruction", doc="text: loss on all tokens; instruction: instruction/input/output rows; chat: messages rows (or ShareGPT `conversations`).")
    template: str | None = spec(None, doc="instruction rows: `alpaca`, `chat_template` (the tokenizer's) or a "
                                          "format string with {instruction} and {input}; unset: the tokenizer's "
                                          "chat template if it has one, else alpaca. chat rows: `chatml`, "
                                          "`llama3`, `mistral`, `chat_template` (the tokenizer's, the default) "
                                          "or a Jinja chat template. text rows: none.")
    seq_len: int | None = spec(None, min=16, max=MAX_SEQ_LEN, doc="Defaults to the last long-context stage's seq_len.")
    rope: Rope | None = spec(None, doc="RoPE for a fine-tune-only recipe; otherwise the last long-context "
                                       "stage's RoPE is kept.")
    extend_positions: PositionExtension = spec("none", doc="When seq_len outgrows the model's (or the last stage's) "
                                                           "learned position table: " + EXTEND_POSITIONS_DOC)
    epochs: float | None = spec(None, min=0.0, max=MAX_EPOCHS)
    steps: int | None = spec(None, min=1, max=MAX_STEPS)
    global_batch_size: int = spec(8, min=1, max=MAX_BATCH, doc="Sequences per optimizer step.")
    micro_batch_size: int | None = spec(None, min=1, max=MAX_MICRO_BATCH)
    lr: float = spec(2e-4, min=0.0, doc="Peak learning rate (after the warmup).")
    min_lr_ratio: float | None = spec(None, min=0.0, max=1.0, doc=FLOOR_SHORTHAND_DOC)
    warmup_steps: int | None = spec(None, min=0, max=MAX_STEPS, doc=WARMUP_SHORTHAND_DOC)
    optimizer: Optimizer = spec(factory=Optimizer, doc=OPTIMIZER_DOC)
    scheduler: Scheduler = spec(factory=Scheduler, doc=SCHEDULER_DOC)
    eval_every: int | None = spec(None, min=1, max=MAX_STEPS, doc="Evaluate every N steps (and at the stage's "
                                                                  "end): the metrics on the validation data, "
                                                                  "the samples.")
    metrics: list[str] = spec(factory=lambda: ["loss"], doc="Evaluation metrics on the validation (and test) "
                                                            "data: loss, perplexity, and scores of generated "
                                                            "answers against the references: exact_match, "
                                                            "rouge_l, bleu, chrf, accuracy (labels). Logged as "
                                                            "eval_<name> / test_<name>.")
    metric_rows: int | None = spec(None, min=1, max=MAX_BATCH, doc="Examples (the first N) whose answers are "
                                                                   "generated for the answer scores; unset: all "
                                                                   "of them. Each answer is at most its "
                                                                   "reference's length.")
    samples: Samples | None = spec(None, doc="Answers generated at every evaluation, before training and at "
                                             "the end: RUN/stages/<stage>/samples.jsonl and a W&B table.")
    early_stopping: EarlyStopping | None = spec(None, doc="Stop when `metric` stops improving; the best "
                                                          "checkpoint is kept out of keep_last rotation and is "
                                                          "what the stage exports.")
    merge_adapter: bool = spec(False, doc="Also export a merged model for adapter methods.")

    def __post_init__(self) -> None:
        check_name(self.name)
        if (self.steps is None) == (self.epochs is None):
            raise Invalid("steps", "give exactly one of `steps` and `epochs`", "keep one of them")
        template = template_problem(self.format, self.template)
        if template:
            raise Invalid("template", *template)
        if self.data.sources:
            raise Invalid("data.sources", "a mixture of sources is for long-context stages",
                          "give fine-tuning data as `paths`")
        self._check_read_keys()
        effective_scheduler(self.scheduler, self.warmup_steps, self.min_lr_ratio)  # the shorthands agree with it
        self._check_evaluation()

    @property
    def schedule(self) -> Scheduler:
        return effective_scheduler(self.scheduler, self.warmup_steps, self.min_lr_ratio)

    def _check_read_keys(self) -> None:
        """Keys fine-tuning would accept and then never read: refused, so a run does what its recipe says."""
        if self.epochs is not None and self.epochs <= 0:
            raise Invalid("epochs", f"{self.epochs:g} epochs train nothing", "give a positive number, e.g. 1 "
                          "(or `steps: N`)")
        if self.data.long_documents != "split":
            raise Invalid("data.long_documents", "is read by long-context stages only: fine-tuning truncates an "
                          "example longer than seq_len (counted as `truncated` in the data report)",
                          "remove finetune.data.long_documents")
        wrong = [f for f in self.data.columns if f not in FORMAT_FIELDS.get(self.format, ())]
        if wrong:
            raise Invalid(f"data.columns.{wrong[0]}", f"{self.format} rows have no field {wrong[0]!r}" +
                          (f" (they read {', '.join(FORMAT_FIELDS[self.format])})" if self.format != "text" else
                           " (text rows read `text_field`)"),
                          "map this format's fields, or set `text_field` for text rows")
        if self.format != "text" and self.data.text_field != "text":
            raise Invalid("data.text_field", f"is read from text rows only; {self.format} rows have fixed fields "
                          "(instruction/input/output, or messages)", "remove text_field, or use `format: text`")

    def _check_evaluation(self) -> None:
        unknown = [name for name in self.metrics if name not in EVAL_METRICS]
        if unknown:
            raise Invalid("metrics", f"{unknown[0]!r} is not a metric", f"choose from {', '.join(EVAL_METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise Invalid("metrics", "names a metric twice", "list each metric once")
        held_out = self.data.has_validation
        fix_data = "add `data.validation_paths: [...]` or `data.validation_fraction: 0.05`"
        es = self.early_stopping
        if es is not None:
            if not self.eval_every:
                raise Invalid("early_stopping", "needs `eval_every`: nothing would be evaluated",
                              "set `eval_every: N`")
            if not held_out:
                raise Invalid("early_stopping", "has no validation data to evaluate on", fix_data)
            if es.metric.removeprefix("eval_") not in self.metrics:
                raise Invalid("early_stopping.metric", f"{es.metric} is not computed: "
                              f"{es.metric.removeprefix('eval_')!r} is not in finetune.metrics",
                              f"add {es.metric.removeprefix('eval_')} to `finetune.metrics`")
        if not held_out and (self.metrics != ["loss"] or self.metric_rows):
            raise Invalid("metrics", "are computed on validation data, and there is none", fix_data)
        if self.eval_every and not held_out and not (self.samples and self.samples.prompts):
            raise Invalid("eval_every", "has nothing to evaluate: no validation data and no sample prompts",
                          fix_data)
        if self.samples and self.samples.from_validation and not held_out:
            raise Invalid("samples.from_validation", "has no validation data to take examples from", fix_data)
        answers = [name for name in self.metrics if name in ANSWER_METRICS]
        if self.format == "text" and (answers or (self.samples and self.samples.from_validation)):
            raise Invalid("metrics" if answers else "samples.from_validation",
                          "text rows have no prompt and reference to compare a generated answer with",
                          "use instruction or chat rows, or keep `metrics: [loss, perplexity]` and fixed "
                          "sample prompts")


@dataclass(frozen=True)
class Recipe:
    name: str = spec(doc="Run name; the run dir is output_root/name.")
    model: Model = spec(doc="What to train.")
    seed: int = spec(0, min=0, max=MAX_SEED, doc="Seeds model init, data order and splits.")
    long_context: LongContext | None = spec(None, doc="Continued-pretraining stages at growing seq_len.")
    finetune: Finetune | None = spec(None, doc="The task fine-tuning stage, after the long-context stages.")
    cluster: Cluster = spec(factory=Cluster, doc="Where it runs: nodes, ranks, SLURM settings.")
    parallelism: Parallelism = spec(factory=Parallelism, doc="ZeRO stage, offload, sequence parallelism.")
    tracking: Tracking = spec(factory=Tracking, doc="Weights & Biases.")
    checkpointing: Checkpointing = spec(factory=Checkpointing, doc="How often, how many, where.")
    evaluation: Evaluation | None = spec(None, doc="Long-context evaluation (perplexity by length, passkey).")

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.long_context is None and self.finetune is None:
            raise Invalid("long_context", "the recipe has no stage",
                          "add a `long_context` section, a `finetune` section, or both")


def _short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    return recipe_from_dict(apply_overrides(read_recipe(Path(path)), overrides))


def recipe_from_dict(raw: dict) -> Recipe:
    return build(Recipe, raw)
