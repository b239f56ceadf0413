"""What ``convert`` installs around a converted model so that it behaves under any training or generation
loop: the decoder stack's pre-hook (padding mask to the layers, no KV cache in training, packed batches
refused, the aux-gradient scale of the forward) and the model's forward wrapper (the aux loss in
``outputs.loss`` and ``outputs.aux_loss``).

The aux loss reaches the routers through backward (``mixsga.nn.aux_gradient``): every layer attaches its
aux gradient to its output, so whatever loss a loop backpropagates through the model trains the routers
exactly once. Its scale must match the loop's loss normalisation, so that the router gradient is the one
of the paper's loss, LM + alpha / N_layers * sum_l L_aux, on the loop's global batch:

- Loops that backpropagate ``outputs.loss`` (transformers' Trainer, accelerate, PEFT, ``mixsga.train``,
  most hand-written loops): exact with no setting. ``outputs.loss`` holds the aux value weighted by the
  micro-batch's share of the label tokens (``num_items_in_batch``/labels, as transformers' loss counts them;
  1 without ``num_items_in_batch``), and a zero whose gradient tells the layers what the loop multiplied
  the loss by (1 / accumulation steps, the number of processes, a fp16 loss scale).
- Loops that compute their own loss from the logits or hidden states (TRL's ``SFTTrainer``, which never
  reads ``outputs.loss``): each forward's aux gradient is multiplied by ``mixsga.hf.set_aux_loss_scale``'s
  value (default 1, right for one micro-batch per optimizer step; 1 / steps under gradient accumulation).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings

import torch
from torch import nn

from ..nn.aux_gradient import AuxScale, loss_tokens
from .attention import AUX_SCALE_KWARG, PADDING_MASK_KWARG, HFMixSGAAttention
from .cache import MixSGACache, saved_kv_cap

#: Attribute of the decoder stack holding the fallback aux scale (``set_aux_loss_scale``).
_FALLBACK_ATTR = "mixsga_aux_loss_scale"
#: Attribute of the decoder stack holding the AuxScale of its latest training forward.
_LAST_SCALE_ATTR = "_mixsga_last_aux_scale"
#: Keyword arguments of packed (padding-free) batches in transformers' flash-attention convention.
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")
#: Why packed batches are refused, and what to do instead (the end of both packed-batch errors).
_PACKED_REASON = ("not supported by mixSGA models (expert-choice capacity and attention would span the packed "
                  "sequences); pad the batch instead (e.g. TRL's padding_free=False)")


def install(model: nn.Module, base: nn.Module) -> None:
    """Installs the pre-hook on ``base`` (the decoder stack holding ``.layers``) and the forward and
    generation wrappers on ``model`` (per instance: the transformers classes stay as they are)."""
    num_layers = len(base.layers)
    # Where the decoder stack's forward takes these positionally (Llama and OPT order them differently).
    names = list(inspect.signature(base.forward).parameters)
    mask_at, past_at = names.index("attention_mask"), names.index("past_key_values")
    positions_at = names.index("position_ids") if "position_ids" in names else None
    setattr(base, _FALLBACK_ATTR, 1.0)

    def argument(args, kwargs, name, at):
        return kwargs.get(name, args[at] if at is not None and len(args) > at else None)

    def pre_hook(module, args, kwargs):
        mask = argument(args, kwargs, "attention_mask", mask_at)
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            seen = f"shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"attention_mask: a mixSGA model needs the [B, T] 0/1 padding mask (routing must know the "
                f"padding), got {seen}"
            )
        kwargs[PADDING_MASK_KWARG] = mask
        past = argument(args, kwargs, "past_key_values", past_at)
        training = module.training and torch.is_grad_enabled()
        _refuse_packed(kwargs, argument(args, kwargs, "position_ids", positions_at), mask, past)
        if training:
            if _cached_tokens(past) > 0:
                raise ValueError(
                    "past_key_values: a training forward (model.train() with gradients enabled) through a "
                    f"non-empty KV cache ({_cached_tokens(past)} cached tokens): cached keys and values carry no "
                    "gradient, so k_proj/v_proj would not train; train on whole sequences without a cache, or "
                    "call model.eval() / torch.no_grad() to generate"
                )
            # A training forward never builds a cache, whatever config.use_cache says (it would be thrown away).
            if len(args) <= past_at:
                kwargs["use_cache"] = False
            scale = AuxScale(fallback=getattr(module, _FALLBACK_ATTR), num_layers=num_layers)
            kwargs[AUX_SCALE_KWARG] = scale
            setattr(module, _LAST_SCALE_ATTR, scale)
            _warn_frozen_routers(module)
        else:
            setattr(module, _LAST_SCALE_ATTR, None)
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(module.config, "use_cache", False)
            if use_cache and past is None and len(args) <= past_at:
                # Transformers would create a DynamicCache (full K/V per token), which mixSGA layers cannot use.
                kwargs["past_key_values"] = MixSGACache(getattr(module, "config", None), num_layers=num_layers)
        return args, kwargs

    base._mixsga_hook = base.register_forward_pre_hook(pre_hook, with_kwargs=True)
    if model is not base:
        _wrap_forward(model, base)
    _wrap_generation(model, num_layers)


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Sets the factor of the aux gradient for loops that do not backpropagate ``outputs.loss`` (TRL's
    ``SFTTrainer``, custom losses from the logits): what the loop's loss normalisation implies, typically
    ``1 / gradient_accumulation_steps`` (default 1). Loops that backpropagate ``outputs.loss`` (the Trainer,
    accelerate, PEFT, ``mixsga.train``) need no setting: the model reads their normalisation from backward.

    Raises:
        TypeError: ``model`` was not converted.
        ValueError: ``scale`` is not a finite number >= 0.
    """
    stacks = [m for m in model.modules() if hasattr(m, _FALLBACK_ATTR)]
    if not stacks:
        raise TypeError(f"model: set_aux_loss_scale needs a model converted to mixSGA, got {type(model).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale >= 0 and scale < float("inf")):
        raise ValueError(f"scale: must be a finite number >= 0, got {scale!r}")
    for stack in stacks:
        setattr(stack, _FALLBACK_ATTR, float(scale))


def _cached_tokens(past) -> int:
    """Tokens already in a cache (0 for none; the layers reject caches that are not MixSGACaches)."""
    length = getattr(past, "get_seq_length", None)
    return int(length()) if callable(length) else 0


def _refuse_packed(kwargs: dict, positions, mask, past) -> None:
    """Packed (padding-free) batches: several sequences in one row, told apart by restarting position_ids
    or cu_seq_lens. Routing capacity and attention would span the sequences, which would leak into each
    other silently, so they are refused."""
    packed = [k for k in _PACKED_KWARGS if kwargs.get(k) is not None]
    if packed:
        raise ValueError(f"{packed[0]}: packed (padding-free) batches are {_PACKED_REASON}")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] < 2:
        return
    if _cached_tokens(past) > 0:
        return  # a continuation: the cache checks that positions continue its sequences
    step = positions[:, 1:] - positions[:, :-1]
    if mask is None:  # a restart goes back; a step of 0 is left padding given positions but no mask
        bad = (step < 0).nonzero()
    else:  # the real tokens of a row are one sequence: consecutive positions
        bad = ((mask[:, 1:] != 0) & (mask[:, :-1] != 0) & (step != 1)).nonzero()
    if bad.numel() > 0:
        b, t = int(bad[0, 0]), int(bad[0, 1]) + 1
        raise ValueError(
            f"position_ids: row {b} jumps from {int(positions[b, t - 1])} to {int(positions[b, t])} at token {t}: "
            f"packed sequences (position_ids restarting inside a row) are {_PACKED_REASON}"
        )


_warned_frozen: set[int] = set()


def _warn_frozen_routers(base: nn.Module) -> None:
    """A warning, once per model, when aux_alpha > 0 but no router can train (PEFT freezes every module it
    was not told to save)."""
    if id(base) in _warned_frozen:
        return
    layers = [m for m in base.modules() if isinstance(m, HFMixSGAAttention) and m.aux_alpha > 0]
    if layers and not any(p.requires_grad for m in layers for p in m.router.parameters()):
        _warned_frozen.add(id(base))
        warnings.warn(
            "mixSGA: the routers are frozen while aux_alpha > 0, so training will not train them (PEFT freezes "
            "modules it does not save: pass modules_to_save=mixsga.hf.peft_modules_to_save(), or set "
            "requires_grad on the router parameters)",
            stacklevel=4,
        )


def _wrap_forward(model: nn.Module, base: nn.Module) -> None:
    """The model's forward, per instance, with the aux loss in its output (``_forward_with_aux``). The wrapped
    forward and the decoder stack are kept as plain instance attributes (not submodules), so a deep copy of
    the model wraps its own copies."""
    object.__setattr__(model, "_mixsga_inner_forward", model.forward)
    object.__setattr__(model, "_mixsga_stack", base)
    model.forward = types.MethodType(_signed_like(type(model).forward), model)


def _signed_like(family_forward):
    """``_forward_with_aux`` with the family's forward signature (``inspect.signature`` follows
    ``__wrapped__``): tools that inspect it (the Trainer's loss kwargs, ``use_cache``) see the real one. It
    captures the class's function only, never the instance."""

    @functools.wraps(family_forward)
    def forward(self, *args, **kwargs):
        return _forward_with_aux(self, *args, **kwargs)

    return forward


def _forward_with_aux(self, *args, **kwargs):
    """``outputs.aux_loss``: the mean of the layers' aux_alpha * L_aux (detached); in a training forward with
    labels, ``outputs.loss`` = LM loss + its share of the aux loss + the layers' tokens (module docstring)."""
    inner = self._mixsga_inner_forward
    out = inner(*args, **kwargs)
    base = self._mixsga_stack
    scale = getattr(base, _LAST_SCALE_ATTR, None)
    if not isinstance(out, dict):
        return out
    layers = [m for m in base.modules() if isinstance(m, HFMixSGAAttention)]
    values = [m.last_aux_loss for m in layers if m.last_aux_loss is not None]
    if not values:
        return out
    aux = torch.stack([v.detach() for v in values]).mean()  # float32 (float64 for a float64 model)
    out = _with_aux_field(type(out))(**out, aux_loss=aux)
    loss = out.get("loss")
    # Layers without aux_in_backward return the aux loss for the caller to add (with its graph): not here.
    if loss is not None and self.training and scale is not None and all(m.aux_in_backward for m in layers):
        bound = inspect.signature(inner).bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        scale.weight = _label_share(bound.get("labels"), bound.get("shift_labels", extra.get("shift_labels")),
                                    bound.get("num_items_in_batch", extra.get("num_items_in_batch")))
        out["loss"] = loss + (aux * scale.weight).to(loss.dtype) + loss_tokens(scale, loss).to(loss.dtype)
        scale.tokens = []  # read once; the layers' backward nodes keep the scale itself
    return out


@functools.cache
def _with_aux_field(output_class: type) -> type:
    """The model's output dataclass (e.g. CausalLMOutputWithPast) plus an ``aux_loss`` field. A declared field,
    not an added key: DDP and others rebuild outputs from their fields (``type(out)(**fields)``)."""
    if not dataclasses.is_dataclass(output_class) or "aux_loss" in {f.name for f in dataclasses.fields(output_class)}:
        return output_class
    return dataclasses.make_dataclass(
        f"MixSGA{output_class.__name__}", [("aux_loss", "torch.FloatTensor | None", dataclasses.field(default=None))],
        bases=(output_class,),
        namespace={"__doc__": f"{output_class.__name__} plus the mixSGA aux loss.", "__module__": __name__},
    )


def _label_share(labels, shift_labels, num_items) -> float:
    """The micro-batch's share of the loop's LM loss: its label tokens over ``num_items_in_batch`` (the
    count transformers' causal-LM loss divides by), 1 without it."""
    if num_items is None:
        return 1.0
    if shift_labels is not None:
        count = (shift_labels != -100).sum()
    elif labels is not None:
        count = (labels[..., 1:] != -100).sum()
    else:
        return 1.0
    return float(count) / max(float(num_items), 1.0)


def _wrap_generation(model: nn.Module, num_layers: int) -> None:
    """Makes ``generate`` create a MixSGACache (transformers would create a DynamicCache)."""
    original = getattr(type(model), "_prepare_cache_for_generation", None)
    if original is None:
        return

    def prepare_cache(self, generation_config, model_kwargs, *args, **kwargs):
        result = original(self, generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, MixSGACache) and not getattr(cache, "_is_user_defined", False):
            # With a saved kv_cap, the pools are reserved for the most tokens generate will store
            # (transformers passes max_length - 1: the last new token is never cached).
            length = kwargs.get("max_cache_length", args[2] if len(args) > 2 else None)
            cap = saved_kv_cap(self.config)
            model_kwargs["past_key_values"] = MixSGACache(
                self.config, num_layers=num_layers, max_length=int(length) if cap is not None and length else None)
        return result

    model._prepare_cache_for_generation = types.MethodType(prepare_cache, model)
