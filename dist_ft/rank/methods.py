"""Fine-tuning methods: each decides which parameters train, nothing else.

The training loop is the same for all of them; a method either marks parameters
trainable on the model itself (full, bitfit, freeze) or wraps it in a peft
adapter (the LoRA family and the prompt-learning methods).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import sys
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dist_ft.recipe.config import BASE_CHANGING_INITS, MethodOptions
from dist_ft.recipe.strict import RecipeError, build
from .model import export_model_dir, keep_4bit_trainable


if TYPE_CHECKING:
    from peft import PeftModel

# peft (and the bitsandbytes it imports) is imported by the methods that wrap a model, not at module
# import: it adds about 1.2 s of CPU to every rank's start-up, and full training never needs it.


class MethodError(ValueError):
    """A method cannot apply to this model or with these options."""


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft wrapper; one can exist only once something imported peft."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def apply_method(model: PreTrainedModel, method: str, opts: MethodOptions | Mapping[str, Any] | None = None, *,
                 gradient_checkpointing: bool = False, tokenizer: PreTrainedTokenizerBase | None = None,
                 gather: Callable[[list[torch.nn.Parameter]], contextlib.AbstractContextManager] | None = None,
                 ) -> torch.nn.Module:
    """Make `method`'s parameters trainable (and only those); returns the model or its peft wrapper.

    `opts` is the recipe's `finetune.options` (a mapping is read as one, with its defaults).
    `tokenizer` turns `prompt_tuning_init_text` into tokens; `gather` makes partitioned (ZeRO-3)
    parameters whole while they are read (the input embeddings, for that text).
    The model is put in train mode first: a 4-bit model's first eval-mode forward
    would otherwise take bitsandbytes' inference-only path (see keep_4bit_trainable).
    """
    if method not in APPLY:
        raise MethodError(f"unknown method {method!r}{_suggest(method, APPLY)}; known: {', '.join(APPLY)}")
    if method == "prefix" and gradient_checkpointing:
        raise MethodError("prefix tuning does not work with gradient checkpointing (peft refuses it): "
                          "turn gradient checkpointing off, or use prompt tuning or LoRA")
    o = _options(opts)
    if o.modules_to_save:
        _check_modules_exist(model, o.modules_to_save)
    model.train()
    wrapped = APPLY[method](model, o)
    if method == "prompt" and o.prompt_tuning_init_text is not None:
        _init_prompt_from_text(wrapped, o.prompt_tuning_init_text, tokenizer, gather or _no_gather)
    return wrapped


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


def _lora(model: PreTrainedModel, o: MethodOptions, *, use_dora: bool = False,
          modules_to_save: list[str] = ()) -> PeftModel:
    from peft import LoraConfig, get_peft_model

    init = o.init_lora_weights
    if init in BASE_CHANGING_INITS:
        if getattr(model, "is_loaded_in_4bit", False):
            raise MethodError(f"init_lora_weights {init} on a 4-bit base: the decomposition would change the "
                              "quantized weights, and no exported adapter reproduces that; use default or gaussian")
        if use_dora:
            raise MethodError(f"init_lora_weights {init} does not combine with dora (the magnitude is taken from "
                              "the changed base, so the export cannot become an adapter over the original base)")
    saved = [*modules_to_save, *(o.modules_to_save or [])]
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and _names_embeddings(model, saved)
    # peft ties lm_head's saved copy to the embedding's only when asked (and only by their short names).
    config = LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=_lora_targets(model, o),
                        bias=o.bias, use_rslora=o.use_rslora, init_lora_weights=_PEFT_INIT.get(init, init),
                        layers_to_transform=_layers(model, o.layers_to_transform),
                        modules_to_save=saved or None, use_dora=use_dora, task_type="CAUSAL_LM",
                        **({"ensure_weight_tying": True} if tied else {}))
    peft_model = get_peft_model(model, config)
    if init in BASE_CHANGING_INITS:
        _remember_initial_adapter(peft_model)
    return peft_model


_PEFT_INIT = {"default": True}


def _lora_targets(model: PreTrainedModel, o: MethodOptions) -> list[str] | str:
    """target_modules for peft; all-linear spelled out when layers are chosen (peft refuses a string then)."""
    targets = o.target_modules or "all-linear"
    if targets != "all-linear" or o.layers_to_transform is None:
        return targets
    output = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not output})


def _layers(model: PreTrainedModel, layers: list[int] | None) -> list[int] | None:
    count = model.config.num_hidden_layers
    beyond = [i for i in layers or [] if i >= count]
    if beyond:
        raise MethodError(f"layers_to_transform {beyond} are beyond the model's {count} layers (0-based)")
    return layers


def _names_embeddings(model: PreTrainedModel, saved: list[str]) -> bool:
    ends = {_module_name(model, m).rsplit(".", 1)[-1]
            for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return any(name in ends for name in saved)


def _dora(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    return _lora(model, o, use_dora=True)


def _qlora(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    if not getattr(model, "is_loaded_in_4bit", False):
        raise MethodError("qlora needs a 4-bit base model: build it with build_model(..., quantize_4bit=True)")
    # Checkpointing is the trainer's decision, not a side effect of preparing the base.
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_4bit_trainable(model)
    return _lora(model.train(), o)


def _longlora(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    """LoRA plus fully trained embeddings and norms (LongLoRA's "LoRA+")."""
    embedding = _module_name(model, model.get_input_embeddings())
    norms = [name for name, module in model.named_modules() if type(module).__name__.endswith("Norm")]
    # peft matches modules_to_save by name suffix; it recognises the embedding (and
    # ties lm_head's copy to it) only by its short name, e.g. "embed_tokens".
    return _lora(model, o, modules_to_save=[embedding.rsplit(".", 1)[-1], *norms])


def _prefix(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(
        num_virtual_tokens=o.num_virtual_tokens, prefix_projection=o.prefix_projection,
        encoder_hidden_size=o.encoder_hidden_size if o.prefix_projection else None,
        modules_to_save=o.modules_to_save, task_type="CAUSAL_LM"))


def _prompt(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(model, PromptTuningConfig(num_virtual_tokens=o.num_virtual_tokens,
                                                    modules_to_save=o.modules_to_save, task_type="CAUSAL_LM"))


def _ptuning(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    from peft import PromptEncoderConfig, get_peft_model

    return get_peft_model(model, PromptEncoderConfig(num_virtual_tokens=o.num_virtual_tokens,
                                                     encoder_hidden_size=o.encoder_hidden_size,
                                                     encoder_reparameterization_type=o.encoder_reparameterization_type,
                                                     modules_to_save=o.modules_to_save, task_type="CAUSAL_LM"))


def _ia3(model: PreTrainedModel, o: MethodOptions) -> PeftModel:
    from peft import IA3Config, get_peft_model

    return get_peft_model(model, IA3Config(target_modules=o.target_modules, feedforward_modules=o.feedforward_modules,
                                           modules_to_save=o.modules_to_save, task_type="CAUSAL_LM"))


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


def _check_modules_exist(model: PreTrainedModel, wanted: list[str]) -> None:
    """peft silently skips a modules_to_save name that matches nothing: say so before training instead."""
    names = [name for name, _ in model.named_modules() if name]
    for name in wanted:
        if not any(module.endswith(name) for module in names):
            known = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
            raise MethodError(f"modules_to_save: {name!r} names no module of this {model.config.model_type} model"
                              f"{_suggest(name, tuple(known))}; module names end in: {', '.join(known)}")


def _no_gather(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _init_prompt_from_text(model: PeftModel, text: str, tokenizer: PreTrainedTokenizerBase | None,
                           gather: Callable[[list[torch.nn.Parameter]], contextlib.AbstractContextManager]) -> None:
    """peft's TEXT initialisation with the stage's own tokenizer (peft's loads one by name, which a byte
    or GGUF tokenizer does not have): the text's token embeddings, cut or repeated to the virtual tokens."""
    if tokenizer is None:
        raise MethodError("prompt_tuning_init_text needs the tokenizer: pass apply_method(..., tokenizer=...)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MethodError(f"prompt_tuning_init_text {text!r} has no tokens")
    encoder = model.prompt_encoder[model.active_adapter].embedding
    count = encoder.weight.shape[0]
    ids = (ids * math.ceil(count / len(ids)))[:count]
    words = model.get_input_embeddings()
    with gather([words.weight]), torch.no_grad():
        vectors = words(torch.tensor(ids, device=words.weight.device)).detach().float()
        encoder.weight.copy_(vectors.to(encoder.weight.device, encoder.weight.dtype))


# The initial A and B of a PiSSA/OLoRA adapter (its state-dict keys → CPU copies): the export subtracts them.
_INITIAL_ADAPTER = "_dist_ft_initial_adapter"


def _remember_initial_adapter(model: PeftModel) -> None:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    setattr(model, _INITIAL_ADAPTER, {key: value.detach().to("cpu", copy=True) for key, value in state.items()
                                      if ".lora_A." in key or ".lora_B." in key})


def _convert_to_plain_lora(model: PeftModel, out: Path) -> None:
    """Rewrite a saved PiSSA/OLoRA adapter as plain LoRA over the original base (peft's
    `path_initial_model_for_weight_conversion`, done in memory: peft's drops modules_to_save and refuses
    biases). The trained model is W_res + s·BA = W + s·(BA − B0·A0) = W + s·B'A' with A' = [A; A0] and
    B' = [B, −B0]: rank 2r at the same scaling s (alpha doubled, or ×√2 under rsLoRA)."""
    from safetensors.torch import load_file, save_file

    initial = getattr(model, _INITIAL_ADAPTER)
    weights_file = out / "adapter_model.safetensors"
    weights = load_file(weights_file)
    for key, value in list(weights.items()):
        if ".lora_A." in key:
            weights[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0).contiguous()
        elif ".lora_B." in key:
            weights[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1).contiguous()
    save_file(weights, weights_file, metadata={"format": "pt"})
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(r=2 * config["r"], init_lora_weights=True,
                  lora_alpha=config["lora_alpha"] * (math.sqrt(2) if config.get("use_rslora") else 2))
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


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
    if not is_peft_model(model):
        return export_model_dir(model, tokenizer, out)
    if not merge:
        model.save_pretrained(out)
        if hasattr(model, _INITIAL_ADAPTER):
            _convert_to_plain_lora(model, out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out
    if model.peft_config[model.active_adapter].peft_type.value != "LORA":
        raise MethodError("merge applies to the LoRA family; prompt-learning and IA3 adapters stay adapters")
    if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
        raise MethodError("merging into a 4-bit base would re-quantize the result: save the adapter, then load "
                          "it on the full-precision base (load_trained) and merge there")
    return export_model_dir(model.merge_and_unload(), tokenizer, out)


def load_adapter_weights(model: torch.nn.Module, adapter_dir: Path,
                         gather: Callable[[list[torch.nn.Parameter]], contextlib.AbstractContextManager]) -> None:
    """Start `model`'s adapter (peft, same method and options) from the weights saved in `adapter_dir`;
    `gather` makes partitioned (ZeRO-3) trainable parameters whole while they are written."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    with gather([p for p in model.parameters() if p.requires_grad]):
        result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise MethodError(f"{adapter_dir} does not fit this adapter: {result.unexpected_keys[:3]} ...")


def load_trained(path: str | Path, *, base_model: PreTrainedModel | None = None,
                 trainable: bool = False) -> torch.nn.Module:
    """Reload what save_trained wrote: an adapter onto `base_model`, or a full directory."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path)
    if base_model is None:
        raise MethodError(f"{path} holds an adapter; pass the base model it was trained on")
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, path, is_trainable=trainable)
