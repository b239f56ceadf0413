"""The aux loss delivered through backward: the layer's output passes through unchanged and, in backward,
the router (and whatever else the aux loss depends on) also receives ``scale * d aux``.

Why: the aux loss is the only loss that trains the routers, and training loops other than ours (transformers'
Trainer, TRL, PEFT, accelerate) backpropagate only the loss they compute themselves. Attaching the aux
gradient to the layer's output makes any loss backpropagated through the model train the routers, exactly
once (the returned aux value is then detached, so adding it to a loss by hand cannot count it twice).

The scale of one forward lives in an ``AuxScale``, shared by every layer of that forward and readable in
backward, so a model-level wrapper can fill in what it learns after the layers ran (the micro-batch's share
of the loss; see ``mixsga.hf``). Each ``AuxGradient`` also returns a zero *token*: a wrapper that adds the
tokens to the loss it returns learns, in backward, the factor the loop applied to that loss (1 / accumulation
steps, the number of processes, a fp16 loss scale, ...), because the token's gradient is that factor.
"""

from __future__ import annotations

import torch


class AuxScale:
    """How much aux gradient one forward's layers send (mutable until backward).

    The gradient each layer's aux term receives is ``multiplier * weight / num_layers``, where
    ``multiplier`` is the gradient of the layer's token (what the loop multiplied the model's loss by)
    when the token was added to the loss, else ``fallback``.

    Attributes:
        weight: the forward's share of the loss (1 for a loop that averages micro-batches itself; the
            micro-batch's share of the label tokens under transformers' ``num_items_in_batch``).
        fallback: the multiplier when the tokens did not reach the loss (a loop that computes its own loss):
            what the loop's loss normalisation implies, e.g. 1 / gradient-accumulation steps. Default 1.
        num_layers: the layers whose aux terms are averaged (the model's aux loss is their mean). Default 1.
        probed: the multiplier seen by ``probe`` (for layers recomputed in backward, whose tokens never reached
            the loss: reentrant gradient checkpointing); None until then.
    """

    __slots__ = ("weight", "fallback", "num_layers", "probed", "tokens")

    def __init__(self, fallback: float = 1.0, num_layers: int = 1) -> None:
        self.weight = 1.0
        self.fallback = float(fallback)
        self.num_layers = int(num_layers)
        self.probed: float | None = None
        self.tokens: list[torch.Tensor] = []

    def __deepcopy__(self, memo) -> AuxScale:
        # A model copied after a training forward gets a fresh scale (tokens are non-leaf tensors).
        return AuxScale(self.fallback, self.num_layers)

    def gradient(self, token_grad: torch.Tensor | None) -> float:
        """The gradient of one layer's aux term, given its token's gradient (None: the token was unused)."""
        if token_grad is not None:
            multiplier = float(token_grad)
        elif self.probed is not None:
            multiplier = self.probed
        else:
            multiplier = self.fallback
        return multiplier * self.weight / self.num_layers


class AuxGradient(torch.autograd.Function):
    """``(output, token) = AuxGradient.apply(output, aux, scale)``: output unchanged, token a 0-dim zero;
    backward sends ``scale.gradient(d token)`` to aux and ``d output`` to output."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, scale: AuxScale):
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        ctx.set_materialize_grads(False)  # an unused token's gradient must read None, not 0
        # The output itself (autograd makes it an alias with this node as its grad_fn): no copy.
        return output, aux.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor | None, grad_token: torch.Tensor | None):
        shape, dtype, device = ctx.aux_meta
        grad_aux = torch.full(shape, ctx.scale.gradient(grad_token), dtype=dtype, device=device)
        return grad_output, grad_aux, None


class _Probe(torch.autograd.Function):
    """A 0-dim zero whose backward records its gradient (the loop's multiplier) in an AuxScale."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, scale: AuxScale):
        ctx.scale = scale
        return anchor.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.scale.probed = float(grad)
        return None, None


def attach(output: torch.Tensor, aux: torch.Tensor, scale: AuxScale) -> torch.Tensor:
    """The layer output with the aux gradient attached (registers the token with ``scale``). Needs
    ``aux.requires_grad``."""
    out, token = AuxGradient.apply(output, aux, scale)
    scale.tokens.append(token)
    return out


def loss_tokens(scale: AuxScale, anchor: torch.Tensor) -> torch.Tensor:
    """What a model-level wrapper adds to the loss it returns (a zero): the layers' tokens, or, when the
    layers kept none (they run again in backward, under reentrant checkpointing), a probe that records the
    loop's multiplier for them. ``anchor``: any tensor on the loss's device."""
    if scale.tokens:
        return torch.stack([t.to(anchor.device) for t in scale.tokens]).sum()
    return _Probe.apply(anchor.detach().requires_grad_(True), scale)
