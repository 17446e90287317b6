"""Fine-tuning methods: each decides which parameters train, nothing else.

The training loop is the same for all of them; a method either marks parameters
trainable on the model itself (full, bitfit, freeze) or wraps it in a peft
adapter (the LoRA family and the prompt-learning methods).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from peft import (IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                  get_peft_model, prepare_model_for_kbit_training)
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dist_ft.recipe.config import MethodOptions
from dist_ft.recipe.strict import RecipeError, build
from .model import export_model_dir, keep_4bit_trainable


class MethodError(ValueError):
    """A method cannot apply to this model or with these options."""


def apply_method(model: PreTrainedModel, method: str, opts: MethodOptions | Mapping[str, Any] | None = None, *,
                 gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Make `method`'s parameters trainable (and only those); returns the model or its peft wrapper.

    `opts` is the recipe's `finetune.options` (a mapping is read as one, with its defaults).
    The model is put in train mode first: a 4-bit model's first eval-mode forward
    would otherwise take bitsandbytes' inference-only path (see keep_4bit_trainable).
    """
    if method not in APPLY:
        raise MethodError(f"unknown method {method!r}{_suggest(method, APPLY)}; known: {', '.join(APPLY)}")
    if method == "prefix" and gradient_checkpointing:
        raise MethodError("prefix tuning does not work with gradient checkpointing (peft refuses it): "
                          "turn gradient checkpointing off, or use prompt tuning or LoRA")
    model.train()
    return APPLY[method](model, _options(opts))


def _options(opts: MethodOptions | Mapping[str, Any] | None) -> MethodOptions:
    if isinstance(opts, MethodOptions):
        return opts
    known = [f.name for f in dataclasses.fields(MethodOptions)]
    unknown = sorted(set(opts or {}) - set(known))
    if unknown:
        raise MethodError(f"unknown method option {unknown[0]!r}{_suggest(unknown[0], known)}; known: {', '.join(known)}")
    try:
        return build(MethodOptions, dict(opts or {}))
    except RecipeError as err:
        raise MethodError(f"method options: {err}") from None


def _suggest(name: str, known: Mapping[str, Any] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _full(model: PreTrainedModel, o: MethodOptions) -> PreTrainedModel:
    model.requires_grad_(True)
    return model


def _lora(model: PreTrainedModel, o: MethodOptions, **extra: Any) -> PeftModel:
    config = LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout,
                        target_modules=o.target_modules or "all-linear", task_type="CAUSAL_LM", **extra)
    return get_peft_model(model, config)


def _dora(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    return _lora(model, o, use_dora=True)


def _qlora(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    if not getattr(model, "is_loaded_in_4bit", False):
        raise MethodError("qlora needs a 4-bit base model: build it with build_model(..., quantize_4bit=True)")
    # Checkpointing is the trainer's decision, not a side effect of preparing the base.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_4bit_trainable(model)
    return _lora(model.train(), o)


def _longlora(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    """LoRA plus fully trained embeddings and norms (LongLoRA's "LoRA+")."""
    embedding = _module_name(model, model.get_input_embeddings())
    norms = [name for name, module in model.named_modules() if type(module).__name__.endswith("Norm")]
    # peft matches modules_to_save by name suffix; it recognises the embedding (and
    # ties lm_head's copy to it) only by its short name, e.g. "embed_tokens".
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return _lora(model, o, modules_to_save=[embedding.rsplit(".", 1)[-1], *norms],
                 **({"ensure_weight_tying": True} if tied else {}))


def _prefix(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=o.num_virtual_tokens,
                                                    task_type="CAUSAL_LM"))


def _prompt(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    return get_peft_model(model, PromptTuningConfig(num_virtual_tokens=o.num_virtual_tokens,
                                                    task_type="CAUSAL_LM"))


def _ptuning(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    return get_peft_model(model, PromptEncoderConfig(num_virtual_tokens=o.num_virtual_tokens,
                                                     encoder_hidden_size=o.encoder_hidden_size,
                                                     task_type="CAUSAL_LM"))


def _ia3(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    return get_peft_model(model, IA3Config(target_modules=o.target_modules,
                                           feedforward_modules=o.feedforward_modules, task_type="CAUSAL_LM"))


def _bitfit(model: PreTrainedModel, o: MethodOptions) -> PreTrainedModel:
    biases = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    if not biases:
        raise MethodError(f"bitfit trains only biases and this {model.config.model_type} model has none: enable "
                          "them in the model config (llama: attention_bias / mlp_bias) or choose another method")
    model.requires_grad_(False)
    for bias in biases:
        bias.requires_grad_(True)
    return model


def _freeze(model: PreTrainedModel, o: MethodOptions) -> PreTrainedModel:
    """Train the last `trainable_layers` decoder layers and parameters matching `trainable_patterns` (regex)."""
    wanted = [re.compile(pattern) for pattern in o.trainable_patterns]
    prefixes = _last_layer_prefixes(model, o.trainable_layers)
    chosen = [p for name, p in model.named_parameters()
              if name.startswith(prefixes) or any(pattern.search(name) for pattern in wanted)]
    if not chosen:
        raise MethodError("freeze would train nothing: set trainable_layers > 0 or trainable_patterns matching "
                          f"parameter names (e.g. {next(iter(dict(model.named_parameters())))!r})")
    model.requires_grad_(False)
    for parameter in chosen:
        parameter.requires_grad_(True)
    return model


def _last_layer_prefixes(model: PreTrainedModel, count: int) -> tuple[str, ...]:
    if count <= 0:
        return ()
    layers = model.config.num_hidden_layers
    if count > layers:
        raise MethodError(f"trainable_layers is {count} but the model has {layers} layers")
    name = next((name for name, module in model.named_modules()
                 if isinstance(module, torch.nn.ModuleList) and len(module) == layers), None)
    if name is None:
        raise MethodError("cannot find the decoder layer list; use trainable_patterns instead")
    return tuple(f"{name}.{index}." for index in range(layers - count, layers))


def _module_name(model: torch.nn.Module, target: torch.nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


APPLY: dict[str, Callable[[PreTrainedModel, MethodOptions], torch.nn.Module]] = {
    "full": _full, "lora": _lora, "qlora": _qlora, "dora": _dora, "longlora": _longlora, "prefix": _prefix,
    "prompt": _prompt, "ptuning": _ptuning, "ia3": _ia3, "bitfit": _bitfit, "freeze": _freeze,
}


def trainable_summary(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights and ZeRO-3 shards count at full size."""
    trainable = total = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", None) or parameter.numel()
        if getattr(parameter, "quant_state", None) is not None:
            count *= 2  # bitsandbytes packs two 4-bit values per uint8 element
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total


def save_trained(model: torch.nn.Module, out_dir: str | Path, *, tokenizer: PreTrainedTokenizerBase | None = None,
                 merge: bool = False) -> Path:
    """Save a model trained without ZeRO-3 partitioning: adapter files for peft, a full HF directory otherwise.

    `merge` (LoRA family) folds the adapter into the base and writes a full
    directory instead; the merged model is no longer an adapter, so call it last.
    """
    out = Path(out_dir)
    if not isinstance(model, PeftModel):
        return export_model_dir(model, tokenizer, out)
    if not merge:
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out
    if model.peft_config[model.active_adapter].peft_type.value != "LORA":
        raise MethodError("merge applies to the LoRA family; prompt-learning and IA3 adapters stay adapters")
    if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
        raise MethodError("merging into a 4-bit base would re-quantize the result: save the adapter, then load "
                          "it on the full-precision base (load_trained) and merge there")
    return export_model_dir(model.merge_and_unload(), tokenizer, out)


def load_trained(path: str | Path, *, base_model: PreTrainedModel | None = None,
                 trainable: bool = False) -> torch.nn.Module:
    """Reload what save_trained wrote: an adapter onto `base_model`, or a full directory."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path)
    if base_model is None:
        raise MethodError(f"{path} holds an adapter; pass the base model it was trained on")
    return PeftModel.from_pretrained(base_model, path, is_trainable=trainable)
