"""Conversion-time preparation of a converted model on a few batches of text (docs/METHOD.md, E1 and E3):
calibrate each layer's pooled-key scales and warm-start each layer's router, so a converted model starts
from a sensible state instead of a random router and flat coarse-token logits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..nn.shared_group_kv import pooling_error
from .layers import mixsga_layers

#: The extensions the study (docs/STUDY.md) found best, as ``convert`` keyword arguments; the paper's
#: method is ``convert``'s defaults. Use with ``prepare``: ``convert(model, ..., **RECOMMENDED)`` then
#: ``prepare(model, blocks)``. With a mild mix around the static group size (e.g. ratios 0.1:0.7:0.2) it
#: was the best mixSGA configuration at every uptraining budget measured; it beat static GQA of the same
#: KV budget only at 25 % KV and up to 0.3 % of the base's pretraining tokens, and was 1-5 % worse elsewhere.
RECOMMENDED = {"key_scale": "learned", "routing_signal": "pooling_error"}

#: Bounds of a calibrated key scale: a layer whose logits barely depend on the keys would otherwise fit
#: an arbitrary factor.
_SCALE_RANGE = (1.0 / 16.0, 16.0)


@dataclass
class LayerInputs:
    """What a mixSGA layer saw in one forward: its input [B, L, D] and RoPE (cos, sin) or None."""

    hidden_states: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None


@torch.no_grad()
def capture_layer_inputs(model: torch.nn.Module, blocks: torch.Tensor) -> list[LayerInputs]:
    """Runs ``model`` (eval mode, no cache) on token blocks [N, T] and returns every mixSGA layer's input,
    in layer order. The layers route as configured; only their inputs are kept."""
    layers = mixsga_layers(model)
    if not layers:
        raise TypeError(f"model: {type(model).__name__} has no mixSGA layers; call mixsga.hf.convert first")
    if not isinstance(blocks, torch.Tensor):
        raise TypeError(
            f"blocks: expected a [N, T] integer tensor of token ids (tokenize the text first), got "
            f"{type(blocks).__name__}"
        )
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.dtype.is_floating_point:
        raise ValueError(f"blocks: expected a non-empty [N, T] integer tensor, got {blocks.dtype} {list(blocks.shape)}")
    captured: dict[int, LayerInputs] = {}

    def hook(i):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            rope = kwargs.get("position_embeddings") if module.uses_rope else None
            captured[i] = LayerInputs(x.detach(), None if rope is None else tuple(r.detach() for r in rope))
        return fn

    hooks = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()
        model(input_ids=blocks.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [captured[i] for i in range(len(layers))]


def _rotate(t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """HF-convention RoPE of t [B, L, H, d] with cos/sin [B or 1, L, d] (None: no rotation)."""
    if rope is None:
        return t
    cos, sin = (r.unsqueeze(2).to(t.dtype) for r in rope)
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), -1)
    return t * cos + rotated * sin


@torch.no_grad()
def fit_key_scales(layer, inputs: LayerInputs) -> torch.Tensor:
    """The least-squares factor per expert that best reproduces the base layer's attention logits with
    that expert's pooled keys: s_e = sum(a * b) / sum(b * b) over causal (query, key) pairs and query
    heads, where a = q . k (the full key of the query's own KV head) and b = q . mean-pooled key. Expert
    1 (group size 1) gets 1. Returns [E] float64, clamped to [1/16, 16]."""
    x = inputs.hidden_states.to(layer.q_proj.weight.dtype)
    B, L = x.shape[0], x.shape[1]
    Hq, Hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = _rotate(layer.q_proj(x).view(B, L, Hq, d), inputs.rope).double()
    k = _rotate(layer.k_proj(x).view(B, L, Hkv, d), inputs.rope).double()
    rep = Hq // Hkv
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    full = torch.einsum("blhd,bshd->bhls", q, k.repeat_interleave(rep, 2))[:, :, causal]
    scales = []
    for g in layer.group_sizes:
        if g == 1:
            scales.append(1.0)
            continue
        pooled = k.view(B, L, Hkv // g, g, d).mean(3).repeat_interleave(g * rep, 2)
        b = torch.einsum("blhd,bshd->bhls", q, pooled)[:, :, causal]
        denom = float(b.square().sum())
        s = float((full * b).sum()) / denom if denom > 0 else 1.0
        scales.append(min(max(s, _SCALE_RANGE[0]), _SCALE_RANGE[1]) if math.isfinite(s) else 1.0)
    return torch.tensor(scales, dtype=torch.float64)


@torch.no_grad()
def calibrate_key_scale(model: torch.nn.Module, blocks: torch.Tensor) -> list[list[float]]:
    """Sets ``key_log_scale`` of every mixSGA layer with ``key_scale="learned"`` to log(fit_key_scales)
    measured on token blocks [N, T] (a few batches of held-in text are enough). Layers with another
    key_scale are left alone. Returns the scales per layer (empty lists for layers left alone)."""
    layers = mixsga_layers(model)
    inputs = capture_layer_inputs(model, blocks)
    out = []
    for layer, inp in zip(layers, inputs):
        if layer.key_scale != "learned":
            out.append([])
            continue
        s = fit_key_scales(layer, inp)
        layer.key_log_scale.copy_(s.log().to(layer.key_log_scale))
        out.append(s.tolist())
    return out


def pooling_error_target(layer, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The expert-choice assignment by pooling error of a layer's input x [B, L, D] -> [B, L] int64: the
    finest expert takes the tokens whose K/V pooling damages most, under the layer's capacities."""
    open_groups = [g for g, r in zip(layer.group_sizes, layer.ratios) if r > 0.0]
    err = pooling_error(x, layer.k_proj, layer.v_proj, max(open_groups), layer.head_dim)
    scores = err.unsqueeze(-1).expand(*err.shape, len(layer.group_sizes))
    return torch.ops.mixsga.route_expert_choice(scores.contiguous(), list(layer.ratios), valid)


def warm_start_routers(
    model: torch.nn.Module, blocks: torch.Tensor, steps: int = 200, lr: float = 1e-2
) -> list[float]:
    """Fits every mixSGA layer's router, alone, to predict the pooling-error assignment
    (``pooling_error_target``) on token blocks [N, T], with Adam (``lr``) on the layer's own aux loss for
    ``steps`` full-batch steps; nothing else changes. Returns each layer's argmax agreement with that
    assignment afterwards (the fraction of tokens the router's argmax sends where it says)."""
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: must be finite and > 0, got {lr}")
    layers = mixsga_layers(model)
    inputs = capture_layer_inputs(model, blocks)
    agreement = []
    for layer, inp in zip(layers, inputs):
        x = inp.hidden_states.to(layer.q_proj.weight.dtype)
        with torch.no_grad():
            target = pooling_error_target(layer, x)
        params = list(layer.router.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = layer.router.aux_loss(layer.router(x), target)
                loss.backward()
                opt.step()
        with torch.no_grad():
            agreement.append(float((layer.router.argmax_route(layer.router.scores(x)) == target).double().mean()))
    return agreement


def prepare(model: torch.nn.Module, blocks: torch.Tensor, router_steps: int = 200, router_lr: float = 1e-2) -> dict:
    """Everything a freshly converted model should get before training or use: calibrated key scales
    (layers with ``key_scale="learned"``) and routers warm-started on the pooling-error ranking. ``blocks``
    [N, T]: a few batches of text from the training distribution. Returns {"key_scales": per layer,
    "router_agreement": per layer}."""
    scales = calibrate_key_scale(model, blocks)
    agreement = warm_start_routers(model, blocks, router_steps, router_lr) if router_steps > 0 else []
    return {"key_scales": scales, "router_agreement": agreement}
