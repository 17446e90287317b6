"""What a fine-tuning method trains on a model shape, and whether its options fit that shape. Pure.

The counts follow what peft and dist_ft.rank.methods really do, on the module tree of
`model_shape.layout` (exact for the model types in LAYOUT_TYPES, an estimate on a Llama-shaped
tree otherwise); tests/unit/test_trainable_count.py compares them with real models, method by method.
peft's matching rules, mirrored here:
- LoRA/IA3 `target_modules` as a list: a module whose name is, or ends in `.` + , an entry; as a string:
  a regular expression matched against the whole name; `all-linear`: every linear layer but the output layer.
- `layers_to_transform`: only modules inside those decoder layers.
- `modules_to_save`: every module whose name ends with an entry (plain string suffix: `norm` matches
  `input_layernorm`); its parameters train as a copy, saved with the adapter. An adapter never targets a
  saved module or anything inside one (the entry then counts as whole name components: `q_proj`, `mlp`).
"""

from __future__ import annotations

import difflib
import re

from dist_ft.recipe.config import (BASE_CHANGING_INITS, LORA_FAMILY, OPTION_METHODS, WARN_ONLY_OPTIONS,
                                   MethodOptions, Recipe)
from dist_ft.recipe.model_shape import Layout, Linear, ModelShape, layout
from dist_ft.recipe.strict import Problem

# peft's per-model IA3 defaults (TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING), for the
# model types with an exact layout; others are estimated with Llama's. Checked against peft by the tests.
IA3_DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
}
PTUNING_LSTM_LAYERS = 2  # peft's PromptEncoderConfig.encoder_num_layers default


def trainable_params(shape: ModelShape, method: str, opts: MethodOptions | None = None) -> int:
    """How many parameters `method` trains on a model of `shape` (what `trainable_summary` reports)."""
    o = opts or MethodOptions()
    tree = layout(shape)
    params = tree.parameters
    if method == "full":
        return sum(params.values())
    if method == "bitfit":
        return sum(n for name, n in params.items() if name.endswith(".bias"))
    if method == "freeze":
        return sum(params[name] for name in _frozen_out(tree, shape, o))
    entries = saved_entries(tree, method, o)
    extra = _saved_modules(tree, shape, entries)
    if method in LORA_FAMILY:
        targets = lora_targets(tree, o, entries)
        count = sum(o.r * (t.inputs + t.outputs) for t in targets)
        if method == "dora":
            count += sum(t.outputs for t in targets)  # the magnitude vector
        if o.bias == "all":
            extra |= {name for name in params if name.endswith(".bias")}
        elif o.bias == "lora_only":
            extra |= {f"{t.name}.bias" for t in targets if t.bias}
        return count + sum(params[name] for name in extra)
    whole = sum(params[name] for name in extra)
    if method == "ia3":
        targets, feedforward = ia3_targets(tree, shape, o, entries)
        return whole + sum(t.inputs if t in feedforward else t.outputs for t in targets)
    h, tokens = shape.hidden_size, o.num_virtual_tokens
    if method == "prompt":
        return whole + tokens * h
    if method == "prefix":
        kv = shape.num_kv_heads * shape.head_dim  # peft sizes prefixes by key/value width (GQA)
        out = shape.num_layers * 2 * kv
        if not o.prefix_projection:
            return whole + tokens * out
        e = o.encoder_hidden_size
        return whole + tokens * kv + (kv * e + e) + (e * out + out)
    if method == "ptuning":
        e = o.encoder_hidden_size
        if o.encoder_reparameterization_type == "MLP":
            return whole + tokens * h + (h * e + e) + (e * e + e) + (e * h + h)
        lstm = 2 * (4 * e * h + 4 * e * e + 8 * e)  # first layer, both directions
        lstm += (PTUNING_LSTM_LAYERS - 1) * 2 * (4 * e * 2 * e + 4 * e * e + 8 * e)
        return whole + tokens * h + lstm + (2 * e * 2 * e + 2 * e) + (2 * e * h + h)
    raise ValueError(f"unknown method {method!r}")


def saved_entries(tree: Layout, method: str, o: MethodOptions) -> list[str]:
    """The method's modules_to_save entries: the recipe's, and longlora's embedding and norms."""
    own = [tree.embedding.rsplit(".", 1)[-1], *tree.norms] if method == "longlora" else []
    return [*own, *(o.modules_to_save or [])]


def lora_targets(tree: Layout, o: MethodOptions, saved: list[str] = ()) -> list[Linear]:
    """The linear layers LoRA adapts (peft's matching of target_modules and layers_to_transform)."""
    found = [t for t in tree.linears if _targeted(t.name, o.target_modules, tree) and not _inside_saved(t.name, saved)]
    if o.layers_to_transform is not None:
        found = [t for t in found if t.layer in o.layers_to_transform]
    return found


def ia3_targets(tree: Layout, shape: ModelShape, o: MethodOptions,
                saved: list[str] = ()) -> tuple[list[Linear], list[Linear]]:
    """(scaled modules, those scaled on their input) under peft's IA3 defaults for the model type."""
    default_targets, default_feedforward = IA3_DEFAULTS.get(shape.model_type, IA3_DEFAULTS["llama"])
    targets = [t for t in tree.linears if _targeted(t.name, o.target_modules or list(default_targets), tree)
               and not _inside_saved(t.name, saved)]
    feedforward = o.feedforward_modules if o.feedforward_modules is not None else list(default_feedforward)
    return targets, [t for t in targets if _targeted(t.name, feedforward, tree)]


def _targeted(name: str, targets: list[str] | str | None, tree: Layout) -> bool:
    if targets is None or targets == "all-linear":
        return name != tree.output
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _inside_saved(name: str, saved: list[str]) -> bool:
    """peft's exclusion of saved modules from adapter targets (the entry read as a regular expression)."""
    return any(re.match(rf"(^|.*\.){entry}($|\..*)", name) for entry in saved)


def saved_module_names(tree: Layout, wanted: list[str]) -> list[str]:
    """The modules peft wraps for `modules_to_save` (names ending with an entry)."""
    return [m for m in tree.modules if any(m.endswith(w) for w in wanted)]


def _saved_modules(tree: Layout, shape: ModelShape, wanted: list[str]) -> set[str]:
    """The parameters `modules_to_save` trains; a tied output layer trains the embedding's weight."""
    names: set[str] = set()
    for module in saved_module_names(tree, wanted):
        names |= {p for p in tree.parameters if p.startswith(module + ".")}
        if module == tree.output and shape.tie_word_embeddings:
            names.add(f"{tree.embedding}.weight")
    return names


def _frozen_out(tree: Layout, shape: ModelShape, o: MethodOptions) -> list[str]:
    """freeze: the parameters of the last `trainable_layers` layers and those matching a pattern."""
    count = min(o.trainable_layers, shape.num_layers)
    prefixes = tuple(f"{tree.layers}.{n}." for n in range(shape.num_layers - count, shape.num_layers))
    patterns = [re.compile(p) for p in o.trainable_patterns]
    return [name for name in tree.parameters
            if (prefixes and name.startswith(prefixes)) or any(p.search(name) for p in patterns)]


# ---- plan-time checks ---------------------------------------------------------------------------------

def check_options(recipe: Recipe, shape: ModelShape | None, problems: list[Problem], warnings: list[str]) -> None:
    """The fine-tuning method's options against the method, the engine settings and the model's shape."""
    if recipe.finetune is not None:
        check_method_options(recipe, recipe.finetune.method, recipe.finetune.options, "finetune", shape, problems,
                             warnings)


def check_long_context_method(recipe: Recipe, method: str, o: MethodOptions, path: str, shape: ModelShape | None,
                              problems: list[Problem], warnings: list[str]) -> None:
    """A long-context stage's method: fine-tuning's vocabulary and checks, and where its engine can run it."""
    check_method_options(recipe, method, o, path, shape, problems, warnings)
    if method == "qlora" and not recipe.cluster.gpus_per_node:
        problems.append(Problem(f"{path}.method", "qlora needs GPUs (bitsandbytes 4-bit training on CPU ranks is "
                                "impractically slow and unsupported by ZeRO)",
                                "use `longlora` or `lora` on CPU ranks, or set `cluster.gpus_per_node`"))
    if method == "qlora" and recipe.parallelism.zero_stage == 3:
        problems.append(Problem("parallelism.zero_stage", "qlora keeps 4-bit weights that ZeRO-3 cannot "
                                "partition here", "use `zero_stage: 2` with qlora"))


def carries_adapter(recipe: Recipe, method: str, o: MethodOptions, previous, path: str,
                    problems: list[Problem]) -> bool:
    """Whether a long-context stage keeps training the previous stage's adapter (long_context.adapter: carry):
    both are adapter stages, with the same method and options (else refused: there is nothing to carry)."""
    if recipe.long_context.adapter != "carry" or previous is None or "full" in (method, previous.method):
        return False
    if (method, o) != (previous.method, previous.method_options):
        problems.append(Problem(f"{path}.method", f"carries stage {previous.name}'s adapter, which is {previous.method} "
                                "with other options", "give adapter stages one method and options under "
                                "`adapter: carry`, or set `long_context.adapter: merge`"))
        return False
    return True


def check_method_options(recipe: Recipe, method: str, o: MethodOptions, path: str, shape: ModelShape | None,
                         problems: list[Problem], warnings: list[str]) -> None:
    """A stage's method options (the section at `path`: finetune, long_context.stages[i], ...)."""
    for name in o.set_options():
        methods = OPTION_METHODS[name]
        if method in methods:
            continue
        what = f"applies to method{'s' if len(methods) > 1 else ''} {', '.join(methods)} only, not {method}"
        if name in WARN_ONLY_OPTIONS:
            warnings.append(f"{path}.options.{name} {what}: ignored")
        else:
            problems.append(Problem(f"{path}.options.{name}", what,
                                    f"remove it, or use method {methods[0]}"))
    if method in LORA_FAMILY and o.init_lora_weights in BASE_CHANGING_INITS:
        _check_base_changing_init(recipe, method, o.init_lora_weights, path, problems, warnings)
    if shape is not None:
        _check_against_shape(method, o, shape, path, problems)


def _check_base_changing_init(recipe: Recipe, method: str, init: str, section: str, problems: list[Problem],
                              warnings: list[str]) -> None:
    path = f"{section}.options.init_lora_weights"
    if method == "qlora":
        why = ("peft refuses to decompose 4-bit weights" if init == "pissa" else
               "the base would be re-quantized after the decomposition, so no adapter over the original 4-bit "
               "base reproduces the trained model")
        problems.append(Problem(path, f"{init} does not combine with qlora: {why}",
                                "use init_lora_weights default or gaussian with qlora, or method lora"))
    if method == "dora":
        problems.append(Problem(path, f"{init} does not combine with dora: DoRA's magnitude is taken from the "
                                "changed base weight, so the export cannot be converted to an adapter over the "
                                "original base", "use method lora, or init_lora_weights default/gaussian"))
    if recipe.parallelism.zero_stage == 3:
        problems.append(Problem(path, f"{init} decomposes each whole weight when the adapter is created; ZeRO-3 "
                                "has partitioned the weights by then", "use parallelism.zero_stage 1 or 2"))
    if recipe.model.dtype != "fp32":
        warnings.append(f"{path} {init} under {recipe.model.dtype}: the base's "
                        f"residual weights are rounded to {recipe.model.dtype} after the decomposition, so the "
                        "exported adapter (converted to plain LoRA over the original base) matches the trained "
                        "model up to that rounding; model.dtype fp32 exports it exactly")


def _check_against_shape(method: str, o: MethodOptions, shape: ModelShape, path: str,
                         problems: list[Problem]) -> None:
    if method in LORA_FAMILY and o.layers_to_transform is not None:
        beyond = [i for i in o.layers_to_transform if i >= shape.num_layers]
        if beyond:
            problems.append(Problem(f"{path}.options.layers_to_transform",
                                    f"{beyond} are beyond the model's {shape.num_layers} layers (0-based)",
                                    f"use indices 0..{shape.num_layers - 1}"))
            return
    if not shape.exact_layout:  # module names are known only for the layouts dist-ft models exactly
        return
    tree = layout(shape)
    if method == "bitfit" and not any(name.endswith(".bias") for name in tree.parameters):
        problems.append(Problem(f"{path}.method", f"bitfit trains only biases and this {shape.model_type} model "
                                "has none: it would train nothing",
                                "choose another method (lora, ia3, freeze), or a model whose layers have biases "
                                "(qwen2: the q/k/v projections)"))
        return
    saved = saved_entries(tree, method, o)
    targets = lora_targets(tree, o, saved) if method in LORA_FAMILY else \
        ia3_targets(tree, shape, o, saved)[0] if method == "ia3" else []
    regex = o.target_modules if isinstance(o.target_modules, str) and o.target_modules != "all-linear" else None
    linear_names = {t.name for t in tree.linears}
    other = [m for m in tree.modules if m not in linear_names and re.fullmatch(regex, m)] if regex else []
    if other and method in (*LORA_FAMILY, "ia3"):
        problems.append(Problem(f"{path}.options.target_modules", f"{regex!r} also matches {other[0]}, which is "
                                "not a linear layer (peft adapts only those and refuses the rest)",
                                "narrow the expression, e.g. end it in _proj, or list module names"))
    if method in (*LORA_FAMILY, "ia3") and not targets:
        where = " in layers_to_transform" if o.layers_to_transform and method in LORA_FAMILY else ""
        problems.append(Problem(f"{path}.options.target_modules",
                                f"leaves the adapter no linear layer of this {shape.model_type} model{where} "
                                "(modules_to_save ones are trained whole instead of adapted)",
                                f"use names such as {', '.join(_short_names(tree.linears[:7]))}"))
    if o.modules_to_save and method in OPTION_METHODS["modules_to_save"]:
        _check_modules_to_save(o.modules_to_save, tree, shape, path, problems)


def _check_modules_to_save(wanted: list[str], tree: Layout, shape: ModelShape, path: str,
                           problems: list[Problem]) -> None:
    known = sorted({m.rsplit(".", 1)[-1] for m in tree.modules if not m.split(".")[-1].isdigit()})
    for index, name in enumerate(wanted):
        if not saved_module_names(tree, [name]):
            close = difflib.get_close_matches(name, known, n=1)
            problems.append(Problem(f"{path}.options.modules_to_save[{index}]",
                                    f"{name!r} names no module of this {shape.model_type} model",
                                    f"did you mean {close[0]!r}?" if close else f"use one of: {', '.join(known)}"))


def _short_names(linears: tuple[Linear, ...]) -> list[str]:
    return list(dict.fromkeys(t.name.rsplit(".", 1)[-1] for t in linears))
