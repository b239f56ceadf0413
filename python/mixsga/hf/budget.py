"""KV memory you can set: decode routing calibrated to the configured ratios, and a budget chosen at inference.

At decode a token goes to its router's argmax expert, so the KV memory a converted model uses is whatever its
routers happen to prefer. Per layer and expert, score offsets added before that argmax (the routers'
``decode_offsets``) are fitted on calibration text so that decoding realises the layer's ratios
(``calibrate_decode_routing``). The same router ranks tokens at any budget, so one trained model serves
several: ``set_kv_budget`` moves the ratios (prefill expert choice) and re-fits the offsets (decode). Both
are stored in ``config.mixsga`` (``decode_ratios``, ``decode_offsets``), so ``save_pretrained`` keeps them.
Calibration meets a budget on average; ``set_kv_cap`` bounds every sequence (the caches route coarser where
the cap requires it).
"""

from __future__ import annotations

import torch

from .._budget import fit_decode_offsets, ratios_for_budget
from .._checks import check_kv_cap
from .config import CONFIG_KEY
from .layers import causal_routing, mixsga_layers


def _layers_or_raise(model, caller: str):
    layers = mixsga_layers(model)
    if not layers:
        raise TypeError(f"model: {caller} needs a model converted to mixSGA, got a {type(model).__name__} without "
                        "mixSGA layers (call mixsga.hf.convert first)")
    return layers


class _Stop(Exception):
    """Ends a calibration forward once the layer of interest has seen its input."""


@torch.no_grad()
def _layer_scores(model, blocks: torch.Tensor, only: int | None = None) -> list[torch.Tensor]:
    """Every mixSGA layer's router scores [N * T, E] on ``blocks`` [N, T] (or only layer ``only``'s, the
    forward stopping there), the model routing as it decodes (causal argmax, with the offsets set so far)."""
    layers = _layers_or_raise(model, "calibration")
    wanted = range(len(layers)) if only is None else [only]
    scores: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            # In the model's dtype, as decoding computes them (the offsets are applied in it too).
            scores[i] = module.router.scores(x.detach()).reshape(-1, module.router.num_experts)
            if only is not None:
                raise _Stop
        return fn

    handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in wanted]
    was_training = model.training
    try:
        model.eval()
        with causal_routing(model):
            model(input_ids=blocks.to(next(model.parameters()).device), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [scores[i] for i in wanted]


@torch.no_grad()
def realised_kv_budget(model, blocks: torch.Tensor) -> float:
    """The KV budget decoding realises on token blocks [N, T] (a fraction of the full cache): per layer
    sum_e share_e / g_e of the tokens causal argmax routing sends to each expert, averaged over layers.
    Every token of a block counts as decoded (prefill routed as decoding, ``causal_routing``)."""
    layers = _layers_or_raise(model, "realised_kv_budget")
    budgets = []
    for layer, scores in zip(layers, _layer_scores(model, blocks)):
        idx = layer.router.argmax_route(scores)
        share = torch.bincount(idx, minlength=len(layer.group_sizes)).double() / idx.numel()
        budgets.append(float(sum(s / g for s, g in zip(share.tolist(), layer.group_sizes))))
    return sum(budgets) / len(budgets)


def _apply(model, layers, ratios: tuple[float, ...], offsets: list[list[float]]) -> None:
    for layer, o in zip(layers, offsets):
        layer.set_routing(ratios, o)
    _update_settings(model, decode_ratios=list(ratios), decode_offsets=[list(o) for o in offsets])


def _update_settings(model, **changes) -> None:
    """Writes ``changes`` into the mixSGA settings of every config in the model (a wrapper's and the base
    model's may be different objects); a None value removes the key."""
    for config in {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}.values():
        settings = getattr(config, CONFIG_KEY, None)
        if isinstance(settings, dict):
            for key, value in changes.items():
                if value is None:
                    settings.pop(key, None)
                else:
                    settings[key] = value


def _check_blocks(layers, blocks) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype.is_floating_point:
        raise TypeError(f"blocks: expected a [N, T] integer tensor of token ids, got "
                        f"{getattr(blocks, 'dtype', type(blocks).__name__)} {list(getattr(blocks, 'shape', []))}")
    need = 100 * max(len(layer.group_sizes) for layer in layers)
    if blocks.numel() < need:
        raise ValueError(f"blocks: {blocks.numel()} calibration tokens are too few to fit the decode routing; give at "
                         f"least {need} (100 per expert)")


@torch.no_grad()
def calibrate_decode_routing(model, blocks: torch.Tensor) -> float:
    """Fits every layer's decode offsets on calibration token blocks [N, T] (>= 100 tokens per expert) so
    that causal argmax routing realises the layer's ratios, and returns the realised KV budget on ``blocks``
    afterwards. Layers are fitted in order (a forward up to each), so the fit is exact on ``blocks``; on
    other text it holds as far as the routers' scores are distributed alike (use text like the served one).
    The result is stored in the layers and in ``config.mixsga``.

    Raises:
        TypeError: the model was not converted, or ``blocks`` is not a [N, T] integer tensor.
        ValueError: fewer than 100 tokens per expert.
    """
    layers = _layers_or_raise(model, "calibrate_decode_routing")
    _check_blocks(layers, blocks)
    return _fit(model, layers, blocks, layers[0].ratios)


def _fit(model, layers, blocks, ratios) -> float:
    """Fits the layers in order, each on its inputs under the offsets already fitted upstream (a layer's
    routing changes every later layer's input, never an earlier one's): exact on ``blocks`` in one pass.
    Costs a forward up to each layer."""
    offsets = [[] for _ in layers]
    _apply(model, layers, ratios, offsets)  # plain argmax while fitting, layer by layer
    for i, layer in enumerate(layers):
        offsets[i] = fit_decode_offsets(_layer_scores(model, blocks, only=i)[0], ratios)
        layer.set_routing(ratios, offsets[i])  # the later layers' fits see it
    _apply(model, layers, ratios, offsets)  # and the config, once
    return realised_kv_budget(model, blocks)


def trained_ratios(model) -> tuple[float, ...]:
    """The capacity ratios the model was converted (and trained) with, whatever budget it serves now."""
    layers = _layers_or_raise(model, "trained_ratios")
    settings = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if isinstance(settings, dict) and "ratios" in settings:
        return tuple(float(r) for r in settings["ratios"])
    return layers[0].ratios


@torch.no_grad()
def set_kv_budget(model, blocks: torch.Tensor, budget: float | None = None) -> float:
    """Serves another KV budget without retraining: the ratios become ``mixsga.ratios_for_budget`` of the
    trained ratios (prefill expert choice stores exactly that share per expert) and every layer's decode
    offsets are re-fitted on calibration token blocks [N, T] for them (decode). ``budget``: a fraction of
    the full KV cache in [1 / max group size, 1 / min group size]; None: the trained ratios' budget.
    Returns the budget decoding realises on ``blocks``. Stored in the layers and ``config.mixsga``.

    Raises:
        TypeError: the model was not converted, or ``blocks`` is not a [N, T] integer tensor.
        ValueError: ``budget`` outside the reachable range (the message gives it), or fewer than 100
            calibration tokens per expert.
    """
    layers = _layers_or_raise(model, "set_kv_budget")
    trained = trained_ratios(model)
    groups = layers[0].group_sizes
    target = trained if budget is None else ratios_for_budget(groups, trained, budget)
    _check_blocks(layers, blocks)
    return _fit(model, layers, blocks, target)


def set_kv_cap(model, kv_cap: float | None) -> None:
    """Sets the hard per-sequence KV cap every cache of this model enforces (``MixSGACache`` reads it from the
    config; ``generate`` then also reserves the pools for its ``max_length``), or removes it (None). ``kv_cap``:
    a share of the full K/V in [1 / max group size, 1]; tokens the cap does not allow go to coarser experts.
    Stored in ``config.mixsga`` (``kv_cap``), so ``save_pretrained`` keeps it. Combine it with
    ``calibrate_decode_routing`` / ``set_kv_budget``: calibrated routing meets the budget on average, the cap
    bounds every sequence.

    Raises:
        TypeError: the model was not converted.
        ValueError: ``kv_cap`` outside [1 / max group size, 1] (the message gives the range).
    """
    layers = _layers_or_raise(model, "set_kv_cap")
    _update_settings(model, kv_cap=check_kv_cap(kv_cap, layers[0].group_sizes))
