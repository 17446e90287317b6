"""A stage's model: where its weights come from, its RoPE, its method — and its export."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_ft.plan.plan import Plan, StagePlan
from dist_ft.recipe.config import TORCH_DTYPE_NAMES, VIRTUAL_TOKEN_METHODS
from . import engine as ds
from .attention import SDPA_VARLEN
from .distributed import DistEnv
from .methods import MethodError, apply_method, is_peft_model, load_adapter_weights, load_trained, save_trained
from .model import build_model, export_model_dir, load_tokenizer, resolve_attn_implementation
from .shifted_sparse import register as register_shifted_sparse
from .tiled_mlp import tile_mlps



def stage_tokenizer(plan: Plan):
    m = plan.model
    return load_tokenizer(m.name_or_path, m.gguf_file, m.tokenizer)


def weights_source(plan: Plan, stage: StagePlan) -> tuple[str | None, str | None]:
    """(name_or_path, gguf_file): the previous stage's export, or the recipe's model."""
    if stage.init_from is None:
        return plan.model.name_or_path, plan.model.gguf_file
    if stage.carry_adapter:  # the adapter is carried over the previous stage's own base
        return weights_source(plan, plan.stage(stage.init_from))
    export = plan.run.stage(stage.init_from).export
    if not (export / "config.json").is_file():
        raise SystemExit(f"error: stage {stage.name} starts from stage {stage.init_from}, whose export "
                         f"{export} is missing: run {stage.init_from} first")
    return str(export), None


def build_stage_model(plan: Plan, stage: StagePlan, ds_config: dict, tokenizer) -> torch.nn.Module:
    """The stage's model, partitioned as it is built under ZeRO-3 (`ds_config`: the config the engine gets)."""
    m, zero3 = plan.model, plan.parallelism.zero_stage == 3
    with ds.model_construction(ds_config, zero3):
        model = _base_model(plan, stage, tokenizer)
    if m.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if m.tiled_mlp_tokens:
        tile_mlps(model, m.tiled_mlp_tokens)
    if stage.attention == "shifted_sparse":  # training only: the export reloads with the ordinary attention
        model.set_attn_implementation(register_shifted_sparse(stage.attention_group))
    if stage.phase == "finetune" or stage.method != "full":
        model = apply_method(model, stage.method, stage.method_options,
                             gradient_checkpointing=m.gradient_checkpointing, tokenizer=tokenizer,
                             gather=lambda params: ds.gathered(params, enabled=zero3))
        if stage.carry_adapter:
            carried = plan.run.stage(stage.init_from).merged_from
            load_adapter_weights(model, carried, lambda params: ds.gathered(params, zero3, modifier_rank=0))
    return model


def stage_attention(method: str, requested: str) -> str:
    """The attention a stage runs. Virtual-token methods get transformers' sdpa where sdpa_varlen
    would run: prefix tuning's cached keys are longer than the queries and prompt tuning drops
    position_ids; their rows are never packed (plan), so plain sdpa is exact and linear there."""
    resolved = resolve_attn_implementation(requested)
    return "sdpa" if method in VIRTUAL_TOKEN_METHODS and resolved == SDPA_VARLEN else resolved


def _base_model(plan: Plan, stage: StagePlan, tokenizer, quantize: bool | None = None) -> torch.nn.Module:
    name_or_path, gguf_file = weights_source(plan, stage)
    m = plan.model
    return build_model(
        name_or_path=name_or_path, gguf_file=gguf_file,
        # The recipe's model.config applies to the recipe's model, random-init or pretrained (the plan read
        # the same values); a later stage starts from an export whose config.json already carries them.
        config_overrides=m.config if stage.init_from is None else None,
        rope_parameters=stage.rope_parameters, max_position_embeddings=stage.max_position_embeddings,
        extend_positions=stage.extend_positions,
        attn_implementation=stage_attention(stage.method, m.attn_implementation), dtype=getattr(torch, TORCH_DTYPE_NAMES[m.dtype]),
        quantize_4bit=stage.method == "qlora" if quantize is None else quantize,
        trust_remote_code=m.trust_remote_code, vocab_size=len(tokenizer), seed=plan.seed)


def export_stage(plan: Plan, stage: StagePlan, engine, tokenizer, env: DistEnv) -> None:
    """An HF directory plain transformers/peft can load, RoPE in config.json. Adapters are gathered
    across ZeRO-3 ranks before saving (a naive save writes empty tensors)."""
    model = engine.module.lm
    zero3 = ds.is_zero3(engine)
    out = plan.run.stage(stage.name)
    if is_peft_model(model) and stage.phase == "continued_pretraining":
        _export_merged_stage(plan, stage, engine, tokenizer, env)
        return
    if is_peft_model(model):
        trainable = [p for p in model.parameters() if p.requires_grad]
        with ds.gathered(trainable, enabled=zero3):
            if env.is_main:
                save_trained(model, out.adapter, tokenizer=tokenizer)
        ds.barrier()
        if stage.merge_adapter and env.is_main:
            _export_merged(plan, stage, out.adapter, out.merged, tokenizer)
        return
    state = ds.full_state_dict(engine, env.is_main)
    if env.is_main:
        export_model_dir(model, tokenizer, out.export, state_dict=state)


def _export_merged_stage(plan: Plan, stage: StagePlan, engine, tokenizer, env: DistEnv) -> None:
    """A long-context adapter stage: the adapter alone (stages/<stage>/adapter) and merged into the export,
    which the next stage and evaluation load as a plain model with the stage's RoPE in config.json.
    The merge rebuilds the stage's peft model on rank 0 from the engine's full weights (a rebuilt random-init
    or ZeRO-3-initialised base would differ); qlora's 4-bit base is rebuilt in full precision instead."""
    model, out, zero3 = engine.module.lm, plan.run.stage(stage.name), ds.is_zero3(engine)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with ds.gathered(trainable, enabled=zero3):
        if env.is_main:
            save_trained(model, out.merged_from, tokenizer=tokenizer)
    ds.barrier()
    if stage.method == "qlora":
        if env.is_main:
            _export_merged(plan, stage, out.merged_from, out.export, tokenizer)
        return
    state = ds.full_state_dict(engine, env.is_main)
    if env.is_main:
        base = _base_model(plan, stage, tokenizer, quantize=False).float()
        rebuilt = apply_method(base, stage.method, stage.method_options)
        rebuilt.load_state_dict(state, strict=True)
        save_trained(rebuilt, out.export, tokenizer=tokenizer, merge=True)



def merge_stage_adapter(plan: Plan, stage: StagePlan, out: Path) -> Path:
    """`dist-ft export --merge`: the finished stage's adapter folded into its base, at any time after
    training; RoPE scaling and context length in config.json as the stage trained them."""
    adapter = plan.run.stage(stage.name).adapter
    if stage.phase == "continued_pretraining" and stage.method != "full":
        raise SystemExit(f"error: stage {stage.name} is a long-context {stage.method} stage: its export "
                         f"{plan.run.stage(stage.name).export} is already merged (the adapter alone is in "
                         f"{plan.run.stage(stage.name).merged_from})")
    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"error: stage {stage.name} has no adapter at {adapter} (method {stage.method}"
                         f"{'' if plan.run.stage(stage.name).done.exists() else ', not finished'}): "
                         "only a finished adapter stage can be merged")
    tokenizer = stage_tokenizer(plan)
    try:
        _export_merged(plan, stage, adapter, out, tokenizer)
    except MethodError as err:
        raise SystemExit(f"error: stage {stage.name}: {err}") from None
    return out


def _export_merged(plan: Plan, stage: StagePlan, adapter_dir: Path, out: Path, tokenizer) -> None:
    """Fold the adapter into a full-precision copy of the stage's base, built the way training built it
    (a GGUF or random-init base has no directory the adapter could name)."""
    base = _base_model(plan, stage, tokenizer, quantize=False).float()
    save_trained(load_trained(adapter_dir, base_model=base), out, tokenizer=tokenizer, merge=True)
