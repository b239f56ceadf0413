"""Turning a Hugging Face Llama-family causal LM into mixSGA (``convert``) or into the mean-pooled static
GQA baseline of the paper (``to_gqa``), in place, keeping the model's own weights."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..nn.router import ExpertChoiceRouter
from ..nn.shared_group_kv import pool_kv_weight
from . import hooks
from .attention import HFMixSGAAttention, HFMixSGAOPTAttention
from .config import CONFIG_KEY, MixSGASettings, base_model_type, mark_converted

#: model_type of the supported families: their decoder layers call ``self_attn`` with keyword arguments
#: (hidden_states, attention_mask, past_key_values, position_ids, and position_embeddings = RoPE cos/sin
#: except OPT), and their attention has q_proj/k_proj/v_proj/o_proj (OPT: out_proj).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "opt")


def convert(
    model: nn.Module,
    group_sizes: Sequence[int] = (1, 2, 4),
    ratios: Sequence[float] = (0.3, 0.1, 0.6),
    **options,
) -> nn.Module:
    """Replaces the attention of every layer of a transformers Llama-family causal LM (LlamaForCausalLM,
    MistralForCausalLM, Qwen2ForCausalLM; also OPTForCausalLM, whose KV heads are its query heads) with
    mixSGA attention, in place, and returns the model.

    Expert 1 (group size 1) is the original layer: q/k/v/o keep the model's own weights (the same
    Parameters), every expert shares k/v pooled over its groups; only the router (``D*E + E``
    parameters per layer, Kaiming init) is new. With ``ratios = (1, 0, ..., 0)`` the model computes the
    original logits.

    Args:
        model: a ``*ForCausalLM`` (or its base model) of a supported family.
        group_sizes: KV group size per expert, finest first, strictly increasing, each dividing the
            model's ``num_key_value_heads``. Default (1, 2, 4).
        ratios: capacity ratio per expert, summing to 1. Default (0.3, 0.1, 0.6).
        **options: ``aux_loss`` ("sigmoid_ce"), ``aux_alpha`` (0.1), ``prefill_routing``
            ("expert_choice" or "argmax"), ``detach_router_input`` (False), and the quality extensions
            ``key_scale`` ("none", "group" or "learned") and ``routing_signal`` ("router" or
            "pooling_error"), and ``aux_in_backward`` (True: the aux loss reaches the routers through backward,
            whatever loss the training loop backpropagates; see mixsga.hf.hooks); see MixSGAAttention and
            docs/METHOD.md. The defaults are the paper's method;
            ``mixsga.hf.RECOMMENDED`` holds the extensions the study found best, and
            ``mixsga.hf.prepare(model, blocks)`` calibrates key scales and warm-starts the routers.

    After conversion:
        - ``model.config.mixsga`` holds the settings and the config's class is the family's mixSGA
          config (``model_type`` "mixsga_llama" etc.), so ``save_pretrained`` stores both and
          ``mixsga.hf.from_pretrained(path)``, or ``AutoModelForCausalLM.from_pretrained(path)`` after
          ``import mixsga.hf``, rebuilds the model with its router weights.
        - ``model(...)`` returns the usual outputs plus ``aux_loss`` (the mean over layers of aux_alpha * L_aux,
          a value). In training mode ``loss`` (from ``labels``) is the LM loss plus the aux loss, and any loss
          backpropagated through the model trains the routers (mixsga.hf.hooks says how the scale follows
          the loop's normalisation; ``set_aux_loss_scale`` for loops that never read ``outputs.loss``). In
          eval mode ``loss`` is the plain cross-entropy.
        - A training forward never builds a KV cache; packed (padding-free) batches are refused.
        - ``model.generate(...)`` stores the compact ``MixSGACache``.
        - Padding is read from the 2D ``attention_mask`` given to the model: padded tokens take no
          capacity and are never cached.
        - Sliding-window attention (Mistral, Qwen2 configs) is not supported: layers attend causally to
          the whole context (a warning says so when the config sets a window).

    Raises:
        TypeError: ``model`` is not a supported transformers model, or is already converted.
        ValueError: bad group sizes / ratios / options, naming the argument and the value seen.
    """
    known = [f for f in MixSGASettings.__dataclass_fields__ if f not in ("group_sizes", "ratios")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"convert: unexpected option {unknown[0]!r}; the options are {', '.join(known)}")
    settings = MixSGASettings.create(group_sizes, ratios, **options)
    base, config = _base_model(model, "convert")
    num_kv = _num_kv_heads(config)
    for g in settings.group_sizes:
        if num_kv % g != 0:
            raise ValueError(f"group_sizes: {g} does not divide the model's num_key_value_heads ({num_kv})")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        warnings.warn(
            f"convert: the model's config sets sliding_window={config.sliding_window}; mixSGA layers attend to "
            "the whole causal context, so outputs differ from the original beyond that many tokens",
            stacklevel=2,
        )
    offsets = settings.decode_offsets
    if offsets is not None and len(offsets) != len(base.layers):
        raise ValueError(f"decode_offsets: expected one row per layer ({len(base.layers)}), got {len(offsets)}")
    for idx, layer in enumerate(base.layers):
        layer.self_attn = _mixsga_attention(layer.self_attn, idx, config, settings)
        if settings.decode_ratios is not None or offsets is not None:  # a budget set at inference
            layer.self_attn.set_routing(settings.decode_ratios or settings.ratios,
                                        None if offsets is None else offsets[idx])
    for cfg in {id(c): c for c in (model.config, base.config)}.values():
        setattr(cfg, CONFIG_KEY, settings.to_dict())
        mark_converted(cfg)  # model_type "mixsga_<family>": save_pretrained's config.json is not a plain model's
    hooks.install(model, base)
    return model


def to_gqa(model: nn.Module, kv_heads: int) -> nn.Module:
    """The paper's static GQA baseline: mean-pools groups of consecutive KV heads of every layer's k/v
    projections (weights and biases) into ``kv_heads`` heads, in place, and updates
    ``config.num_key_value_heads``. The result is a plain transformers model (it saves and loads as
    one) whose KV cache is ``kv_heads / num_key_value_heads`` of the original; it equals a mixSGA
    conversion with group sizes (1, g) and ratios (0, 1), g = num_key_value_heads / kv_heads.

    Raises:
        TypeError: ``model`` is not a supported (unconverted) transformers model.
        ValueError: ``kv_heads`` does not divide the model's num_key_value_heads.
    """
    base, config = _base_model(model, "to_gqa")
    if base_model_type(config) == "opt":
        raise TypeError(
            "model: to_gqa needs grouped KV heads, which transformers' OPT attention does not have; "
            "convert(model, group_sizes=(1, g), ratios=(0, 1)) is the same baseline for OPT"
        )
    num_kv = config.num_key_value_heads
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or num_kv % kv_heads != 0:
        raise ValueError(f"kv_heads: must be >= 1 and divide the model's num_key_value_heads ({num_kv}), got {kv_heads!r}")
    group = num_kv // kv_heads
    for layer in base.layers:
        attn = layer.self_attn
        head_dim = attn.k_proj.weight.shape[0] // num_kv
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            new = nn.Linear(old.in_features, kv_heads * head_dim, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(pool_kv_weight(old.weight, group, head_dim))
                if old.bias is not None:
                    new.bias.copy_(pool_kv_weight(old.bias, group, head_dim))
            setattr(attn, name, new)
        attn.num_key_value_groups = config.num_attention_heads // kv_heads
    for cfg in {id(c): c for c in (model.config, base.config)}.values():
        cfg.num_key_value_heads = kv_heads
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` holds mixSGA attention layers made by ``convert``."""
    return any(isinstance(m, HFMixSGAAttention) for m in model.modules())


def _base_model(model: nn.Module, caller: str):
    """(the decoder stack holding ``.layers``, its config), after checking the model family."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        # PEFT would not know the routers (not trained, not saved with the adapter): convert first.
        raise TypeError(
            f"model: {caller} needs the transformers model, got a PEFT {type(model).__name__}; {caller} the base "
            "model first, then wrap it: peft.get_peft_model(model, mixsga.hf.lora_config(...))"
        )
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise TypeError(
            f"model: {caller} needs unsharded parameters, got a model sharded with FSDP/DTensor; {caller} first, "
            "then shard (mixsga.train.shard_fsdp2)"
        )
    config = getattr(model, "config", None)
    model_type = base_model_type(config)  # a converted model's config says "mixsga_llama": its family is "llama"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(
            f"model: {caller} supports transformers models of type {', '.join(SUPPORTED_MODEL_TYPES)}, got "
            f"{type(model).__name__} (model_type {model_type!r})"
        )
    # The decoder stack: the model itself, model.model (Llama family) or model.model.decoder (OPT).
    base = next((m for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)), None)
    if base is None:
        raise TypeError(f"model: {type(model).__name__} has no decoder layers where a {model_type} model keeps them")
    if is_converted(base):
        raise TypeError(f"model: {type(model).__name__} is already converted to mixSGA")
    for layer in base.layers:
        attn = getattr(layer, "self_attn", None)
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", _output_projection(model_type))):
            raise TypeError(f"model: a layer of {type(model).__name__} has no self_attn with q/k/v/o projections")
    return base, base.config


def _output_projection(model_type: str) -> str:
    return "out_proj" if model_type == "opt" else "o_proj"


def _num_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # OPT: MHA


def _mixsga_attention(old: nn.Module, idx: int, config, settings: MixSGASettings) -> HFMixSGAAttention:
    weight = old.q_proj.weight
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    family = base_model_type(config)
    cls = HFMixSGAOPTAttention if family == "opt" else HFMixSGAAttention
    # Built on the meta device, then given the original projections: no copy of the model's weights.
    with torch.device("meta"):
        attn = cls(
            config.hidden_size,
            config.num_attention_heads,
            _num_kv_heads(config),
            head_dim=head_dim,
            group_sizes=settings.group_sizes,
            ratios=settings.ratios,
            bias=old.k_proj.bias is not None,
            rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            aux_loss=settings.aux_loss,
            aux_alpha=settings.aux_alpha,
            prefill_routing=settings.prefill_routing,
            detach_router_input=settings.detach_router_input,
            key_scale=settings.key_scale,
            routing_signal=settings.routing_signal,
            aux_in_backward=settings.aux_in_backward,
            attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
            layer_idx=idx,
        )
    attn.q_proj, attn.k_proj, attn.v_proj = old.q_proj, old.k_proj, old.v_proj
    output = _output_projection(family)
    setattr(attn, output, getattr(old, output))
    attn.router = ExpertChoiceRouter(config.hidden_size, settings.ratios, settings.aux_loss).to(
        device=weight.device, dtype=weight.dtype
    )
    if attn.key_log_scale is not None:  # 0 = exp(0) = the paper's plain mean, until calibrated
        attn.key_log_scale = nn.Parameter(torch.zeros(len(settings.group_sizes), device=weight.device, dtype=weight.dtype))
    attn.config = config  # some transformers utilities read the attention's config
    attn.train(old.training)
    return attn
