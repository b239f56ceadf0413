"""What a training loop reads from a converted model: its mixSGA layers, their aux loss, its KV budget."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .attention import HFMixSGAAttention


def mixsga_layers(model: nn.Module) -> list[HFMixSGAAttention]:
    """The mixSGA attention modules of ``model`` (a converted model, or a wrapper such as DDP around one),
    in layer order; empty for a model that was not converted."""
    return [m for m in model.modules() if isinstance(m, HFMixSGAAttention)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The model's prefill/decode consistency loss of its most recent forward: the mean over its mixSGA
    layers of each layer's ``aux_alpha * L_aux`` (so the paper's ``alpha / N_layers * sum_l L_aux``).

    A value to log for models converted with ``aux_in_backward`` (the default): their layers already send
    the aux gradient through backward, so the tensor is detached and adding it to a loss changes only the
    loss's value, never the gradient (it cannot count twice). Layers without it return the forward's
    autograd graph: add it to the LM loss, it is then what trains the routers. 0-dim tensor (float32,
    float64 for a float64 model); 0.0 when the model has not run yet or its last forward was a decode step
    (a call on a non-empty cache).

    Raises:
        TypeError: ``model`` has no mixSGA layers (it was not converted; a silent 0 would leave the
            routers of the model meant to be trained untouched). Loops that train converted and plain
            models alike check ``mixsga.hf.is_converted(model)`` first, as ``mixsga.train`` does.
    """
    all_layers = mixsga_layers(model)
    if not all_layers:
        raise TypeError(
            f"model: aux_loss needs a model converted to mixSGA, got a {type(model).__name__} without mixSGA "
            "layers; call mixsga.hf.convert(model, ...) first (or skip the aux loss for unconverted models)"
        )
    layers = [m for m in all_layers if m.last_aux_loss is not None]
    if torch.is_grad_enabled() and any(_lost_graph(m) for m in layers if not m.aux_in_backward):
        raise RuntimeError(
            "aux_loss: the last forward kept no autograd graph for the routers' aux loss (it ran under "
            "torch.no_grad, or under reentrant gradient checkpointing, which recomputes layers only in "
            "backward); use gradient_checkpointing_kwargs={'use_reentrant': False} (the default)"
        )
    losses = [m.last_aux_loss for m in layers]
    if not losses:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(losses).mean()


def _lost_graph(layer: HFMixSGAAttention) -> bool:
    return (layer.training and layer.last_call_was_prefill and layer.aux_alpha > 0
            and layer.router.proj.weight.requires_grad and not layer.last_aux_loss.requires_grad)


def kv_fraction(model: nn.Module) -> float:
    """KV-cache budget of the model relative to its unconverted self: the mean over its mixSGA layers of
    ``sum_e ratios[e] / group_sizes[e]``; 1.0 for a model without mixSGA layers."""
    layers = mixsga_layers(model)
    return 1.0 if not layers else sum(m.kv_fraction() for m in layers) / len(layers)


@contextlib.contextmanager
def causal_routing(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every mixSGA layer of ``model`` routes a prompt the way decoding routes tokens: each
    token by its router's argmax, causally (``prefill_routing="argmax"``). Outside it, a forward over whole
    sequences (``model(ids, labels=ids)``, prefill) routes by expert choice, which ranks every token of a
    sequence against the others (non-causal, capacity-exact). Use it to evaluate what generation will do:
    ``with mixsga.hf.causal_routing(model): ppl = perplexity(model, blocks)``.

    Raises:
        TypeError: ``model`` has no mixSGA layers.
    """
    layers = mixsga_layers(model)
    if not layers:
        raise TypeError(f"model: causal_routing needs a model converted to mixSGA, got a {type(model).__name__} "
                        "without mixSGA layers")
    saved = [layer.prefill_routing for layer in layers]
    try:
        for layer in layers:
            layer.prefill_routing = "argmax"
        yield model
    finally:
        for layer, routing in zip(layers, saved):
            layer.prefill_routing = routing
