"""MixSGAAttention: causal self-attention whose tokens are routed to weight-shared grouped KV experts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    check_floating,
    check_group_sizes,
    check_integer,
    check_key_scale,
    check_positive,
    check_prefill_routing,
    check_ratios,
    check_routing_signal,
    check_tensor,
    shape_str,
)
from .._kv_fraction import kv_fraction
from .aux_gradient import AuxScale, attach
from .functional import apply_rope_cos_sin, default_positions, padding_attention_mask, rope_angles, rotate
from .router import ExpertChoiceRouter
from .shared_group_kv import compact_kv, grouped_kv, pooling_error


class MixSGAOutput(NamedTuple):
    """Everything a forward pass decided (MixSGAAttention.forward_with_routing)."""

    output: torch.Tensor  #: [B, L, D]
    aux_loss: torch.Tensor  #: 0-dim, aux_alpha * L_aux (float32; float64 for float64 input)
    expert_idx: torch.Tensor  #: [B, L] int64, the expert each token's K/V used
    target_idx: torch.Tensor  #: [B, L] int64, the expert-choice assignment (the aux loss target)


class RoutingAgreement(NamedTuple):
    """How well argmax routing (decode) reproduces expert choice (prefill) on given text."""

    agreement: float  #: fraction of valid tokens whose argmax expert equals their expert-choice expert
    argmax_ratios: torch.Tensor  #: [E] float64, realised per-expert ratios of argmax routing
    expert_choice_ratios: torch.Tensor  #: [E] float64, per-expert ratios of expert choice


class MixSGAAttention(nn.Module):
    """A Llama-style causal self-attention layer with mixSGA KV experts (METHOD.md), built from
    torch.ops.mixsga.* so torch.compile traces it without graph breaks.

    Same constructor arguments, parameter names and shapes as the C++ mixsga::nn::MixSGAAttention, and the
    same numerics (routing, RoPE, padding, attention mask, aux loss), so weights move freely between them.

    Args:
        hidden_size: D, the model width.
        num_heads: Hq, query heads.
        num_kv_heads: Hkv, base KV heads; must divide num_heads.
        head_dim: d; None (default) means hidden_size / num_heads, which must then divide evenly. Even.
        group_sizes: KV group size per expert, finest first, strictly increasing, each dividing Hkv.
            Default (1, 2, 4): experts keep Hkv, Hkv/2, Hkv/4 KV heads per token.
        ratios: capacity ratio per expert, summing to 1. Default (0.3, 0.1, 0.6), a 50 % KV budget.
        bias: biases on the q/k/v/o projections. Default False.
        rope_theta: RoPE base. Default 10000.
        aux_loss: "sigmoid_ce" (default), "logit_ce" or "bce"; see ExpertChoiceRouter.
        aux_alpha: the layer returns aux_alpha * L_aux (>= 0). Default 0.1.
        prefill_routing: "expert_choice" (default; capacity-exact, non-causal across the prompt) or
            "argmax" (per-token argmax, fully causal).
        detach_router_input: feed the router a detached input, so the aux loss trains only the router.
            Default False.
        attention_dropout: dropout on attention probabilities while training, in [0, 1). Default 0.
        key_scale: extension (docs/METHOD.md, E1): how a pooled key is scaled. "none" (default, the
            paper: plain mean), "group" (expert e's keys times g_e) or "learned" (times exp(key_log_scale[e]),
            a parameter [E] initialised at 0, i.e. the paper; ``mixsga.hf.calibrate_key_scale`` sets it from
            data, and the LM loss trains it). Values are never scaled. Applied before the cache, so decode
            costs nothing extra.
        routing_signal: extension (docs/METHOD.md, E2): what expert choice ranks at training and prefill.
            "router" (default, the paper: the router's scores) or "pooling_error" (each token's K/V
            pooling error, ``pooling_error``: tokens that pooling damages most keep the most heads; the
            aux loss then trains the router, whose argmax routes decode, to predict that assignment).
        aux_in_backward: deliver the aux loss through backward instead of returning it for the caller to add
            (default False): the output passes through unchanged and, in backward, the router also receives
            ``aux_backward_scale * d(aux_alpha * L_aux)``, so any loss backpropagated through the layer trains
            the router; the returned aux loss is then detached (a value to log: adding it to the loss cannot
            count it twice). Converted Hugging Face models turn it on (``mixsga.hf``).
        decode_offsets: per-expert offsets added to the router scores before the causal argmax (decode, and
            prefill_routing="argmax"), fitted on calibration text so that decoding realises ``ratios``
            (``mixsga.hf.calibrate_decode_routing``, ``mixsga.hf.set_kv_budget``). None (default): none, the
            paper's plain argmax. Passed to the router; see ``set_routing``.

    Attributes:
        aux_backward_scale: with aux_in_backward, the factor of the aux gradient (float, default 1.0): what
            the training loop's loss normalisation implies, e.g. 1 / gradient-accumulation steps
            (``set_aux_backward_scale``).

    Submodules: q_proj nn.Linear(D, Hq*d); k_proj, v_proj nn.Linear(D, Hkv*d) (shared by all experts);
    o_proj nn.Linear(Hq*d, D); router ExpertChoiceRouter (proj nn.Linear(D, E)).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        group_sizes: Sequence[int] = (1, 2, 4),
        ratios: Sequence[float] = (0.3, 0.1, 0.6),
        bias: bool = False,
        rope_theta: float = 10000.0,
        aux_loss: str = "sigmoid_ce",
        aux_alpha: float = 0.1,
        prefill_routing: str = "expert_choice",
        detach_router_input: bool = False,
        attention_dropout: float = 0.0,
        key_scale: str = "none",
        routing_signal: str = "router",
        aux_in_backward: bool = False,
        decode_offsets: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_positive(hidden_size, "hidden_size")
        check_positive(num_heads, "num_heads")
        check_positive(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads: must divide num_heads ({num_heads}), got {num_kv_heads}")
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(
                    f"num_heads: must divide hidden_size ({hidden_size}) when head_dim is not given, got {num_heads}"
                )
            head_dim = hidden_size // num_heads
        else:
            check_positive(head_dim, "head_dim")
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim: must be even (RoPE rotates pairs), got {head_dim}")
        self.group_sizes = check_group_sizes(group_sizes, num_kv_heads)
        self.ratios = check_ratios(ratios, len(self.group_sizes))
        self.prefill_routing = check_prefill_routing(prefill_routing)
        if not (math.isfinite(aux_alpha) and aux_alpha >= 0.0):
            raise ValueError(f"aux_alpha: must be finite and >= 0, got {aux_alpha}")
        if not 0.0 <= attention_dropout < 1.0:
            raise ValueError(f"attention_dropout: must be in [0, 1), got {attention_dropout}")
        if not (math.isfinite(rope_theta) and rope_theta > 0.0):
            raise ValueError(f"rope_theta: must be finite and > 0, got {rope_theta}")
        self.key_scale = check_key_scale(key_scale)
        self.routing_signal = check_routing_signal(routing_signal)
        if not isinstance(aux_in_backward, bool):
            raise TypeError(f"aux_in_backward: expected a bool, got {aux_in_backward!r}")
        self.aux_in_backward = aux_in_backward
        self._aux_backward_scale = 1.0

        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = (
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
        )
        self.rope_theta = float(rope_theta)
        self.aux_alpha = float(aux_alpha)
        self.detach_router_input = bool(detach_router_input)
        self.attention_dropout = float(attention_dropout)
        # Registration order = parameter order of the C++ module (q, k, v, o, router).
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.router = ExpertChoiceRouter(hidden_size, self.ratios, aux_loss, decode_offsets)
        # Registered last, so the parameters shared with the paper's layer keep their order.
        self.key_log_scale = (
            nn.Parameter(torch.zeros(len(self.group_sizes))) if self.key_scale == "learned" else None
        )

    @property
    def aux_backward_scale(self) -> float:
        """With aux_in_backward: the factor of the aux gradient (default 1); set by ``set_aux_backward_scale``."""
        return self._aux_backward_scale

    def set_aux_backward_scale(self, scale: float) -> None:
        """Sets ``aux_backward_scale`` (finite, >= 0): what the loop's loss normalisation implies, e.g.
        1 / gradient-accumulation steps. A method, as on the C++ module."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"aux_backward_scale: must be finite and >= 0, got {scale!r}")
        self._aux_backward_scale = float(scale)

    @property
    def aux_loss_kind(self) -> str:
        return self.router.aux_loss_kind

    def kv_fraction(self) -> float:
        """KV budget of this layer relative to the base layer: sum_e ratios[e] / group_sizes[e]."""
        return kv_fraction(self.group_sizes, self.ratios)

    @property
    def decode_offsets(self) -> tuple[float, ...]:
        """The router's decode offsets (empty: none)."""
        return self.router.decode_offsets

    def set_routing(self, ratios: Sequence[float], decode_offsets: Sequence[float] | None = None) -> None:
        """Replaces the capacity ratios (prefill expert choice) and decode offsets (causal argmax; None: none)
        of the layer and its router, e.g. to serve another KV budget without retraining
        (``mixsga.ratios_for_budget``, ``mixsga.fit_decode_offsets``). Nothing changes when a value is invalid."""
        values = check_ratios(ratios, len(self.group_sizes))
        self.router.set_routing(values, decode_offsets)  # checks the offsets first
        self.ratios = values

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, group_sizes={self.group_sizes}, ratios={self.ratios}, "
            f"kv_fraction={self.kv_fraction():.4g}, aux_loss={self.aux_loss_kind!r}, aux_alpha={self.aux_alpha}, "
            f"prefill_routing={self.prefill_routing!r}, key_scale={self.key_scale!r}, "
            f"routing_signal={self.routing_signal!r}, aux_in_backward={self.aux_in_backward}"
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        layer_idx: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal self-attention with routed KV experts.

        Args:
            hidden_states: [B, L, D], the parameters' dtype and device.
            attention_mask: optional [B, L] 0/1 padding mask (1 = real token). Padded keys are never
                attended to; padded positions' outputs are finite but meaningless. Every sequence needs
                at least one real token.
            position_ids: optional [B, L] or [L] positions; default arange(L), or cumsum(mask) - 1
                (clamped at 0) when a mask is given, so left padding keeps positions starting at 0; offset
                by the tokens already in the cache.
            cache: optional ``mixsga.HeteroKVCache`` (inference; see ``cache_options``). On an empty
                cache the call is a prefill: tokens are routed by ``prefill_routing``, stored compactly
                (padding is not stored), and attend as without a cache. On a non-empty cache tokens
                are routed by argmax (causal); one token (L = 1) attends through
                ``torch.ops.mixsga.hetero_decode_attention`` over the compact pools, a longer chunk
                through ``torch.ops.mixsga.hetero_cache_attention`` over the compact pools (never expanded).
                Same behaviour as the C++ module.
            layer_idx: this layer's index in the cache.
            rope: optional (cos, sin), each [B, L, d] or [1, L, d]: rotate q and k with these angles
                instead of the layer's own plain RoPE (rope_theta), for models with another RoPE
                variant. position_ids / the defaults still give the positions stored in the cache.
        Returns:
            (output [B, L, D], aux_loss 0-dim = aux_alpha * L_aux; 0 for calls on a non-empty cache).
            Add the aux loss (averaged over layers) to the model loss: it is the only thing that trains
            the router.
        """
        result = self.forward_with_routing(hidden_states, attention_mask, position_ids, cache, layer_idx, rope)
        return result.output, result.aux_loss

    def forward_with_routing(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        layer_idx: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> MixSGAOutput:
        """forward() plus the routing decisions: MixSGAOutput(output [B, L, D], aux_loss, expert_idx [B, L],
        target_idx [B, L]). Same arguments as forward()."""
        x = hidden_states
        valid, positions = self._check_inputs(x, attention_mask, position_ids, cache, layer_idx)
        B, L = x.shape[0], x.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        zero = torch.zeros((), dtype=acc, device=x.device)
        if B == 0 or L == 0:
            none = torch.empty((B, L), dtype=torch.long, device=x.device)
            return MixSGAOutput(torch.zeros_like(x), zero, none, none)

        cache_was_empty = cache is None or cache.batch_size == 0 or cache.max_seq_length(layer_idx) == 0
        # Routing: hard decisions, no gradient; only the aux loss trains the router.
        logits = self.router(x.detach() if self.detach_router_input else x)
        scores = torch.sigmoid(logits)
        if not cache_was_empty:
            # Decode / continuation: causal argmax routing (expert choice over a few new tokens means nothing).
            # The cache's kv_cap (if any) moves tokens to coarser experts before their K/V are projected.
            idx = cache.cap_routing(layer_idx, self.router.argmax_route(scores), valid)
            return MixSGAOutput(self._attend(x, idx, valid, positions, cache, layer_idx, False, rope), zero, idx, idx)
        target = self.router.route(self._importance(x, scores), valid)
        expert_idx = self.router.argmax_route(scores) if self.prefill_routing == "argmax" else target
        if cache is not None:
            expert_idx = cache.cap_routing(layer_idx, expert_idx, valid)
        aux = zero if self.aux_alpha == 0.0 else self.router.aux_loss(logits, target, valid) * self.aux_alpha
        out = self._attend(x, expert_idx, valid, positions, cache, layer_idx, True, rope)
        if self.aux_in_backward and aux.requires_grad:
            out, aux = attach(out, aux, self._aux_scale()), aux.detach()
        return MixSGAOutput(out, aux, expert_idx, target)

    def _aux_scale(self) -> AuxScale:
        """The AuxScale of this call (aux_in_backward): the layer's own ``aux_backward_scale``; the Hugging
        Face layer shares one per model forward."""
        return AuxScale(fallback=self.aux_backward_scale)

    def _importance(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """What expert choice ranks ([B, L, E]): the router's scores, or every expert's column set to the
        token's pooling error (routing_signal), so the finest expert takes the tokens pooling damages most."""
        if self.routing_signal == "router":
            return scores
        open_groups = [g for g, r in zip(self.group_sizes, self.ratios) if r > 0.0]
        err = pooling_error(x, self.k_proj, self.v_proj, max(open_groups), self.head_dim)
        return err.unsqueeze(-1).expand(*err.shape, len(self.group_sizes))

    def key_scales(self) -> torch.Tensor | None:
        """The factor each expert's pooled keys are multiplied by ([E], the parameters' dtype), or None for
        key_scale="none" (plain mean pooling, the paper)."""
        w = self.q_proj.weight
        if self.key_scale == "none":
            return None
        if self.key_scale == "group":
            return torch.tensor(self.group_sizes, dtype=w.dtype, device=w.device)
        return self.key_log_scale.to(w.dtype).exp()

    def cache_options(self, num_layers: int = 1):
        """``mixsga._C.HeteroKVCacheOptions`` matching this layer (KV heads, head dim, group sizes, dtype,
        device) for a model of ``num_layers`` such layers."""
        from .. import _C

        w = self.q_proj.weight
        return _C.HeteroKVCacheOptions(num_layers=num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                       group_sizes=list(self.group_sizes), dtype=w.dtype, device=w.device)

    def forward_routed(
        self,
        hidden_states: torch.Tensor,
        expert_idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer with routing given instead of computed (teacher-forced routing, analysis, tests):
        expert_idx [B, L] integer in [0, E). Returns the output [B, L, D]."""
        valid, positions = self._check_inputs(hidden_states, attention_mask, position_ids)
        check_tensor(expert_idx, "expert_idx")
        if expert_idx.dtype.is_floating_point or expert_idx.dtype == torch.bool:
            raise TypeError(f"expert_idx: expected an integer dtype, got {expert_idx.dtype}")
        if tuple(expert_idx.shape) != tuple(hidden_states.shape[:2]):
            raise ValueError(
                f"expert_idx: expected shape {shape_str(hidden_states.shape[:2])} (the token dims of the input), "
                f"got {shape_str(expert_idx.shape)}"
            )
        if hidden_states.shape[0] == 0 or hidden_states.shape[1] == 0:
            return torch.zeros_like(hidden_states)
        return self._attend(hidden_states, expert_idx.long(), valid, positions)

    @torch.no_grad()
    def routing_agreement(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> RoutingAgreement:
        """How well the router's argmax (the causal decode routing) reproduces expert choice (over the
        router's scores, or over the pooling error with routing_signal="pooling_error") on given text
        [B, L, D] (optional [B, L] padding mask). Eager only (it reads values back)."""
        valid, _ = self._check_inputs(hidden_states, attention_mask, None)
        scores = self.router.scores(hidden_states)
        argmax = self.router.argmax_route(scores)
        choice = self.router.route(self._importance(hidden_states, scores), valid)  # what prefill routes by
        if valid is None:
            valid = torch.ones_like(argmax, dtype=torch.bool)
        n = max(1.0, float(valid.sum()))
        E = self.router.num_experts

        def ratios(idx: torch.Tensor) -> torch.Tensor:
            return F.one_hot(idx[valid], E).sum(0).to(torch.float64).cpu() / n

        agreement = float((argmax == choice)[valid].sum()) / n
        return RoutingAgreement(agreement, ratios(argmax), ratios(choice))

    def _check_inputs(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache=None,
        layer_idx: int = 0,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Validates the inputs (shape checks only, so this traces) -> (valid [B, L] bool or None,
        positions [B, L] or [L])."""
        check_floating(x, "hidden_states")
        if x.dim() != 3 or x.shape[2] != self.hidden_size:
            raise ValueError(
                f"hidden_states: expected shape [B, L, {self.hidden_size}] (hidden_size), got {shape_str(x.shape)}"
            )
        weight = self.q_proj.weight
        if x.dtype != weight.dtype:
            raise TypeError(f"hidden_states: expected the parameters' dtype {weight.dtype}, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"hidden_states: expected the parameters' device {weight.device}, got {x.device}")
        B, L = x.shape[0], x.shape[1]
        valid = None
        if attention_mask is not None:
            check_tensor(attention_mask, "attention_mask")
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, L):
                raise ValueError(
                    f"attention_mask: expected a [B, L] = [{B}, {L}] 0/1 padding mask, "
                    f"got shape {shape_str(attention_mask.shape)}"
                )
            if attention_mask.device != x.device:
                raise ValueError(f"attention_mask: expected device {x.device}, got {attention_mask.device}")
            if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
                raise TypeError(f"attention_mask: expected a bool or integer 0/1 mask, got {attention_mask.dtype}")
            valid = attention_mask.ne(0)
            # A data-dependent check: eager only (under torch.compile it would break the graph; the
            # routing op then raises the same error, naming valid_mask, when the graph runs).
            if B > 0 and L > 0 and not torch.compiler.is_compiling():
                bad = (attention_mask.ne(0) & attention_mask.ne(1)).nonzero()
                if bad.numel() > 0:
                    b, t = int(bad[0, 0]), int(bad[0, 1])
                    raise ValueError(
                        f"attention_mask: must hold only 0 and 1, got {attention_mask[b, t].item()} at [{b}, {t}]"
                    )
                empty = (~valid.any(1)).nonzero()
                if empty.numel() > 0:
                    raise ValueError(
                        f"attention_mask: sequence {int(empty[0, 0])} has no valid token (all padding); "
                        "every sequence needs at least one"
                    )
        past_batch = 0
        if cache is not None:
            o = cache.options
            if (o.num_kv_heads, o.head_dim, list(o.group_sizes)) != (
                self.num_kv_heads,
                self.head_dim,
                list(self.group_sizes),
            ):
                raise ValueError(
                    f"cache: built for num_kv_heads={o.num_kv_heads}, head_dim={o.head_dim}, "
                    f"group_sizes={tuple(o.group_sizes)}, but the layer has num_kv_heads={self.num_kv_heads}, "
                    f"head_dim={self.head_dim}, group_sizes={tuple(self.group_sizes)}"
                )
            if not 0 <= layer_idx < o.num_layers:
                raise IndexError(f"layer_idx: must be in [0, {o.num_layers}) (the cache's num_layers), got {layer_idx}")
            past_batch = cache.batch_size
            if past_batch not in (0, B):
                raise ValueError(f"hidden_states: batch size {B} does not match the cache's batch size {past_batch}")
        if position_ids is not None:
            check_integer(position_ids, "position_ids")
            if not (
                (position_ids.dim() == 2 and tuple(position_ids.shape) == (B, L))
                or (position_ids.dim() == 1 and position_ids.shape[0] == L)
            ):
                raise ValueError(
                    f"position_ids: expected shape [{B}, {L}] or [{L}], got {shape_str(position_ids.shape)}"
                )
            positions = position_ids
        else:
            positions = default_positions(valid, L, x.device)
            if past_batch > 0:
                positions = positions + cache.next_positions(layer_idx).to(x.device).unsqueeze(1)
        return valid, positions

    def _attend(
        self,
        x: torch.Tensor,
        expert_idx: torch.Tensor,
        valid: torch.Tensor | None,
        positions: torch.Tensor,
        cache=None,
        layer_idx: int = 0,
        cache_was_empty: bool = True,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, L = x.shape[0], x.shape[1]
        Hq, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, L, Hq, d)
        if rope is None:  # the layer's own plain RoPE; angles computed once for q and k
            rope = rope_angles(positions, d, self.rope_theta, x.dtype, x.device)
        q = apply_rope_cos_sin(q, *rope)
        if not cache_was_empty:
            attn = self._attend_cached(x, q, expert_idx, valid, positions, rope, cache, layer_idx)
            return self.o_proj(attn.reshape(B, L, Hq * d))
        # Each token's K/V under its own expert (pooled weights), repeated back to Hkv heads.
        k, v = grouped_kv(x, self.k_proj, self.v_proj, expert_idx, list(self.group_sizes), d)
        scales = self.key_scales()
        if scales is not None:  # extension E1: calibrated pooled keys (values are never scaled)
            k = k * scales[expert_idx].view(B, L, 1, 1)
        k = apply_rope_cos_sin(k, *rope)
        if cache is not None:  # a prefill stores what it attends with (the group means are the compact heads)
            cache.append(layer_idx, k.detach(), v.detach(), expert_idx, valid, False, positions)
        mask = None if valid is None else padding_attention_mask(valid)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training and cache is None else 0.0,
            is_causal=mask is None,
            enable_gqa=Hq != Hkv,
        ).transpose(1, 2)
        return self.o_proj(attn.reshape(B, L, Hq * d))

    def _attend_cached(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        expert_idx: torch.Tensor,
        valid: torch.Tensor | None,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache,
        layer_idx: int,
    ) -> torch.Tensor:
        """A decode step or a chunk after cached tokens: K/V projected, scaled and rotated at their compact
        size and stored as they are (``append_compact``), then the new queries q [B, L, Hq, d] (after RoPE)
        attend over the compact pools -> [B, L, Hq, d]. Nothing is expanded to Hkv heads."""
        B, L, d = q.shape[0], q.shape[1], self.head_dim
        compact = compact_kv(x.detach(), self.k_proj, self.v_proj, expert_idx, valid, self.group_sizes, d)
        scales = self.key_scales()
        cos, sin = (t.expand(B, L, d).reshape(B * L, d) for t in rope)
        keys = []
        for e, (k, rows) in enumerate(zip(compact.keys, compact.rows)):
            if k.shape[0] > 0:
                if scales is not None:  # extension E1 (values are never scaled)
                    k = k * scales[e].detach()
                if B * L > 1:  # each token's own angles (a single token's are cos, sin themselves)
                    rows_cos, rows_sin = cos.index_select(0, rows), sin.index_select(0, rows)
                else:
                    rows_cos, rows_sin = cos, sin
                # The shapes are right by construction, so the unchecked rotation (per-call overhead
                # decides a decode step's cost).
                k = rotate(k[None], rows_cos[None], rows_sin[None])[0]
            keys.append(k)
        cache.append_compact(layer_idx, keys, compact.values, expert_idx, valid, True, positions)
        pools_k, pools_v, lengths = cache.keys(layer_idx), cache.values(layer_idx), cache.lengths(layer_idx)
        if L == 1:
            return torch.ops.mixsga.hetero_decode_attention(q[:, 0], pools_k, pools_v, lengths, self.num_kv_heads, None)[
                :, None
            ]
        # A chunk (chunked prefill, speculative verification): causal by the positions stored with the pools.
        query_pos = positions.expand(B, L) if positions.dim() == 1 else positions
        return torch.ops.mixsga.hetero_cache_attention(
            q, query_pos, pools_k, pools_v, cache.positions(layer_idx), lengths, self.num_kv_heads, None
        )
