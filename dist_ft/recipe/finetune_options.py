"""What `finetune` says about the method: which one, its options, and which methods read which option.

Split from config.py (re-exported there): the method's own vocabulary, checked one object at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from .limits import MAX_ADAPTER_SIZE, MAX_STEPS
from .strict import Invalid, spec

Method = Literal["full", "lora", "qlora", "dora", "prefix", "prompt", "ptuning", "ia3",
                 "bitfit", "freeze", "longlora"]
PEFT_ADAPTERS = ("lora", "qlora", "dora", "prefix", "prompt", "ptuning", "ia3", "longlora")
LORA_FAMILY = ("lora", "qlora", "dora", "longlora")
VIRTUAL_TOKEN_METHODS = ("prefix", "prompt", "ptuning")
# What a long-context (continued-pretraining) stage may train: every weight, or the LoRA family.
LongContextMethod = Literal["full", "longlora", "lora", "qlora", "dora"]
LONG_CONTEXT_METHOD_DOC = ("Which parameters train: full (every weight), longlora (LoRA+: LoRA plus trainable "
                           "embeddings and norms, as in LongLoRA), lora, qlora (CUDA only), dora. An adapter is "
                           "merged into the stage's export, so the next stage starts from merged weights.")
ATTENTION_DOC = ("Training-time attention of every long-context stage. full: causal attention over each packed "
                 "document; shifted_sparse: LongLoRA's S²-Attn: each document cut into groups of "
                 "shifted_sparse_group tokens, half of the heads attend within groups, the other half within "
                 "groups shifted by half a group (never across documents). Exports and evaluation always use "
                 "full attention.")
GROUP_DOC = "S²-Attn tokens per group (even); unset: a quarter of each stage's seq_len (LongLoRA's choice)."
ADAPTER_DOC = ("Adapter stages: merge (the next stage trains a new adapter over the merged weights) or carry (it keeps "
               "training this adapter over the same base). The export is merged either way.")
LONG_EVAL_EVERY_DOC = ("Validate every N steps of each stage (and at its end) on held-out long documents "
                       "(`data.validation_fraction` or `validation_paths`): loss and perplexity, overall and by "
                       "position band at the stage's seq_len. Unset: four times per stage when there is validation "
                       "data.")

LoraBias = Literal["none", "all", "lora_only"]
LoraInit = Literal["default", "gaussian", "pissa", "olora"]
# pissa and olora move the adapter's principal part out of the base weights (the base changes at initialisation).
BASE_CHANGING_INITS = ("pissa", "olora")
PEFT_WITH_MODULES_TO_SAVE = (*LORA_FAMILY, "ia3", *VIRTUAL_TOKEN_METHODS)
# Which methods read each option; setting one away from its default for another method is a plan error
# (the options that predate this table only warn: recipes carried them across methods for a long time).
OPTION_METHODS: dict[str, tuple[str, ...]] = {
    "r": LORA_FAMILY, "alpha": LORA_FAMILY, "dropout": LORA_FAMILY,
    "target_modules": (*LORA_FAMILY, "ia3"), "num_virtual_tokens": VIRTUAL_TOKEN_METHODS,
    "encoder_hidden_size": ("ptuning", "prefix"), "trainable_layers": ("freeze",),
    "trainable_patterns": ("freeze",), "feedforward_modules": ("ia3",),
    "bias": LORA_FAMILY, "use_rslora": LORA_FAMILY, "init_lora_weights": LORA_FAMILY,
    "layers_to_transform": LORA_FAMILY, "modules_to_save": PEFT_WITH_MODULES_TO_SAVE,
    "prefix_projection": ("prefix",), "prompt_tuning_init_text": ("prompt",),
    "encoder_reparameterization_type": ("ptuning",),
}
WARN_ONLY_OPTIONS = ("r", "alpha", "dropout", "target_modules", "num_virtual_tokens", "encoder_hidden_size",
                     "trainable_layers", "trainable_patterns", "feedforward_modules")


@dataclass(frozen=True)
class MethodOptions:
    r: int = spec(16, min=1, max=MAX_ADAPTER_SIZE, doc="LoRA rank.")
    alpha: float = spec(32.0, min=0.0, max=1e6, doc="LoRA scaling numerator.")
    dropout: float = spec(0.05, min=0.0, max=1.0)
    target_modules: list[str] | str | None = spec(None, doc="Module names, or all-linear; unset: all-linear for "
                                                            "the LoRA family, peft's per-model default for ia3.")
    num_virtual_tokens: int = spec(16, min=1, max=MAX_ADAPTER_SIZE, doc="prefix / prompt / ptuning tokens.")
    encoder_hidden_size: int = spec(128, min=1, max=MAX_ADAPTER_SIZE,
                                    doc="ptuning prompt-encoder width; prefix: the width of prefix_projection's MLP.")
    trainable_layers: int = spec(2, min=0, max=MAX_ADAPTER_SIZE, doc="freeze: last N decoder layers train.")
    trainable_patterns: list[str] = spec(factory=list, doc="freeze: regular expressions; parameters whose name contains a match also train.")
    feedforward_modules: list[str] | None = spec(None, doc="ia3: modules scaled on their input.")
    bias: LoraBias = spec("none", doc="LoRA family: biases that train too: none; all (every bias of the model); "
                                      "lora_only (the biases of the modules LoRA adapts). Exported with the adapter.")
    use_rslora: bool = spec(False, doc="LoRA family: rank-stabilised scaling alpha/sqrt(r) instead of alpha/r "
                                       "(same parameters, different step size per rank).")
    init_lora_weights: LoraInit = spec(
        "default", doc="LoRA family: how the adapter starts. default: B = 0 (the adapter starts as a no-op); "
                       "gaussian: A drawn with std 1/r; pissa / olora (lora, longlora; not qlora or dora, not ZeRO-3): "
                       "A and B start as the weight's principal singular (PiSSA) or QR (OLoRA) part, moved out of "
                       "the base weight; the export is converted to a plain LoRA adapter (rank 2r) over the "
                       "original base.")
    layers_to_transform: list[int] | None = spec(None, doc="LoRA family: adapt only these decoder layers "
                                                           "(0-based); unset: every layer.")
    modules_to_save: list[str] | None = spec(None, doc="Adapters (LoRA family, ia3, prefix, prompt, ptuning): "
                                                       "modules trained in full and saved with the adapter, "
                                                       "named as peft matches them (the end of the module name, "
                                                       "e.g. lm_head, embed_tokens, norm).")
    prefix_projection: bool = spec(False, doc="prefix: produce the prefix through a two-layer MLP of width "
                                              "encoder_hidden_size while training; the export keeps the prefix "
                                              "it produces.")
    prompt_tuning_init_text: str | None = spec(None, doc="prompt: start the virtual tokens as this text's token "
                                                         "embeddings (cut or repeated to num_virtual_tokens); "
                                                         "unset: random.")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = spec(
        "MLP", doc="ptuning: the prompt encoder, an MLP or a bidirectional LSTM with an MLP head; the export "
                   "keeps the virtual tokens it produces.")

    def __post_init__(self) -> None:
        patterns = [("target_modules", self.target_modules)] if isinstance(self.target_modules, str) else []
        patterns += [(f"trainable_patterns[{i}]", p) for i, p in enumerate(self.trainable_patterns)]
        for name, pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise Invalid(name, f"{pattern!r} is not a regular expression: {err}",
                              "fix the expression (escape `.` and brackets meant literally with a backslash)")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if not layers:
                raise Invalid("layers_to_transform", "is an empty list: LoRA would adapt no layer",
                              "list layer indices, or unset it to adapt every layer")
            if any(i < 0 or i >= MAX_ADAPTER_SIZE for i in layers):
                raise Invalid("layers_to_transform", f"{layers} has an index outside 0..{MAX_ADAPTER_SIZE - 1}",
                              "use 0-based decoder layer indices")
            if len(set(layers)) != len(layers):
                raise Invalid("layers_to_transform", f"{layers} names a layer twice", "list each layer once")
            if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
                raise Invalid("layers_to_transform", "peft cannot restrict layers when target_modules is a "
                              "regular expression", "give target_modules as a list of names (or unset it)")
        for index, name in enumerate(self.modules_to_save or []):
            if not name.strip() or name != name.strip():
                raise Invalid(f"modules_to_save[{index}]", f"{name!r} is not a module name",
                              "write a module name such as lm_head or embed_tokens")
        if self.modules_to_save is not None and len(set(self.modules_to_save)) != len(self.modules_to_save):
            raise Invalid("modules_to_save", "names a module twice", "list each module once")
        if self.prompt_tuning_init_text is not None and not self.prompt_tuning_init_text.strip():
            raise Invalid("prompt_tuning_init_text", "is empty", "give a text describing the task, or unset it")

    def set_options(self) -> list[str]:
        """The options that differ from their defaults, in field order."""
        import dataclasses

        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != _field_default(f)]


def _field_default(f: Any) -> Any:
    import dataclasses

    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


MAX_SAMPLES = 1000  # generated per evaluation: each one is max_new_tokens forwards
MAX_NEW_TOKENS = 4096
# What `finetune.metrics` may name: the validation loss and its perplexity, and scores of generated answers
# against the references (dist_ft.decoding.task_metrics). Logged as eval_<name> (test_<name> on the test set).
LOSS_METRICS = ("loss", "perplexity")
ANSWER_METRICS = ("exact_match", "rouge_l", "bleu", "chrf", "accuracy")  # task_metrics.METRICS (a test checks)
EVAL_METRICS = LOSS_METRICS + ANSWER_METRICS


def metric_direction(name: str) -> str:
    """`min` for the losses, `max` for the scores of answers."""
    return "min" if name in LOSS_METRICS else "max"


@dataclass(frozen=True)
class Samples:
    prompts: list[str] = spec(factory=list, doc="Fixed prompts, rendered as the stage renders an instruction "
                                                "(its template or chat template); no reference.")
    from_validation: int = spec(0, min=0, max=MAX_SAMPLES, doc="Also answer the first N validation examples, "
                                                               "shown with their references.")
    max_new_tokens: int = spec(32, min=1, max=MAX_NEW_TOKENS, doc="Tokens generated per sample (greedy).")

    def __post_init__(self) -> None:
        if len(self.prompts) > MAX_SAMPLES:
            raise Invalid("prompts", f"{len(self.prompts)} prompts are more than {MAX_SAMPLES}",
                          "keep a handful: every one is generated at every evaluation")
        for index, prompt in enumerate(self.prompts):
            if not prompt.strip():
                raise Invalid(f"prompts[{index}]", "is empty", "write a prompt or remove the entry")
        if not self.prompts and not self.from_validation:
            raise Invalid("prompts", "no samples: neither prompts nor from_validation",
                          "add `prompts: [...]` or `from_validation: 3`, or remove the samples section")


@dataclass(frozen=True)
class EarlyStopping:
    patience: int = spec(min=1, max=MAX_STEPS, doc="Stop after this many evaluations without improvement.")
    metric: str = spec("eval_loss", doc="The logged evaluation metric that decides: eval_<name> of a name in "
                                        "`finetune.metrics` (eval_loss, eval_perplexity, eval_rouge_l, ...).")
    mode: Literal["min", "max"] | None = spec(None, doc="min: lower is better (losses), max: higher is better "
                                                        "(answer scores); unset: the metric's own direction.")
    min_delta: float = spec(0.0, min=0.0, doc="An improvement must beat the best by more than this.")

    def __post_init__(self) -> None:
        name = self.metric.removeprefix("eval_")
        if not self.metric.startswith("eval_") or name not in EVAL_METRICS:
            raise Invalid("metric", f"{self.metric!r} is not an evaluation metric",
                          f"use one of {', '.join('eval_' + m for m in EVAL_METRICS)}")
        if self.mode is not None and self.mode != metric_direction(name):
            better = "lower" if metric_direction(name) == "min" else "higher"
            raise Invalid("mode", f"{self.metric} is better when {better}: mode {self.mode} would keep the "
                          "worst model", f"set `mode: {metric_direction(name)}` or leave it unset")

    @property
    def direction(self) -> str:
        return self.mode or metric_direction(self.metric.removeprefix("eval_"))
