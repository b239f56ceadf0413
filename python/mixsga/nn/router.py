"""ExpertChoiceRouter: the per-layer router of mixSGA (METHOD.md steps 1-4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_aux_loss_kind, check_decode_offsets, check_positive, check_ratios, shape_str


class ExpertChoiceRouter(nn.Module):
    """Linear(D, E) + sigmoid router; E = len(ratios).

    Same constructor arguments, parameter names and shapes as the C++ mixsga::nn::ExpertChoiceRouter:
    ``proj`` is nn.Linear(hidden_size, E) with weight [E, D] Kaiming (He) normal initialised and bias [E]
    zero. Routing decisions are hard (no gradient flows through them); only ``aux_loss`` trains the router.

    Args:
        hidden_size: D, the size of the router input (the attention input).
        ratios: capacity ratio per expert, finest first; each in [0, 1], summing to 1. Default 3:1:6.
        aux_loss: "sigmoid_ce" (default; CE with the post-sigmoid scores as logits, the paper's literal
            form), "logit_ce" (CE on the logits) or "bce" (per-expert binary CE of the scores against the
            one-hot target).
        decode_offsets: per-expert offsets added to the scores before the causal argmax (``argmax_route``),
            fitted on calibration text so that decoding realises ``ratios`` (``mixsga.fit_decode_offsets``;
            ``mixsga.hf.calibrate_decode_routing``). None (default): no offsets, the paper's plain argmax.
    """

    def __init__(
        self,
        hidden_size: int,
        ratios: Sequence[float] = (0.3, 0.1, 0.6),
        aux_loss: str = "sigmoid_ce",
        decode_offsets: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_positive(hidden_size, "hidden_size")
        self.hidden_size = hidden_size
        self.ratios = check_ratios(ratios)
        self.aux_loss_kind = check_aux_loss_kind(aux_loss)
        self.decode_offsets = check_decode_offsets(decode_offsets, len(self.ratios))
        self._offsets_cache: dict = {}  # (dtype, device) -> [E] tensor: no host copy per decode step
        self.proj = nn.Linear(hidden_size, len(self.ratios))
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return len(self.ratios)

    def reset_parameters(self) -> None:
        # He init (fan_in, gain sqrt(2)), METHOD.md step 1; the bias starts at 0.
        nn.init.kaiming_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def extra_repr(self) -> str:
        offsets = f", decode_offsets={self.decode_offsets}" if self.decode_offsets else ""
        return f"hidden_size={self.hidden_size}, ratios={self.ratios}, aux_loss={self.aux_loss_kind!r}{offsets}"

    def set_routing(self, ratios: Sequence[float], decode_offsets: Sequence[float] | None = None) -> None:
        """Replaces the capacity ratios (expert choice) and the decode offsets (causal argmax; None: none),
        e.g. to serve another KV budget without retraining. Nothing changes when a value is invalid."""
        values = check_ratios(ratios, self.num_experts)
        offsets = check_decode_offsets(decode_offsets, self.num_experts)
        self.ratios, self.decode_offsets, self._offsets_cache = values, offsets, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits x @ phi^T + beta: [*, D] -> [*, E]."""
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected last dim {self.hidden_size} (hidden_size), got shape {shape_str(x.shape)}")
        return self.proj(x)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid scores S: [*, D] -> [*, E]."""
        return torch.sigmoid(self.forward(x))

    def route(self, scores: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Expert-choice assignment (METHOD.md step 2): scores [B, L, E], optional [B, L] valid mask
        -> [B, L] int64."""
        return torch.ops.mixsga.route_expert_choice(scores.detach(), list(self.ratios), valid_mask)

    def argmax_route(self, scores: torch.Tensor) -> torch.Tensor:
        """Causal per-token routing (METHOD.md step 3): scores [*, E] plus ``decode_offsets`` -> [*] int64.

        argmax returns the first maximum, so ties go to the finer expert, as in expert choice. NaN ranks
        lowest, as in expert choice. An expert whose ratio is 0 has no capacity and is never chosen: a
        token whose every positive-capacity score is NaN goes to the finest expert with capacity."""
        if scores.dim() < 1 or scores.shape[-1] != self.num_experts:
            raise ValueError(
                f"scores: expected last dim {self.num_experts} (experts), got shape {shape_str(scores.shape)}"
            )
        s = scores.detach()
        if self.decode_offsets:  # NaN + offset stays NaN; zero offsets change nothing
            key = (s.dtype, s.device)
            if key not in self._offsets_cache:
                self._offsets_cache[key] = torch.tensor(self.decode_offsets, dtype=torch.float64).to(s.device, s.dtype)
            s = s + self._offsets_cache[key]
        s = torch.where(s.isnan(), torch.full_like(s, float("-inf")), s)
        closed = [e for e, r in enumerate(self.ratios) if r == 0.0]
        if not closed:
            return s.argmax(-1)
        s[..., closed] = float("-inf")
        idx = s.argmax(-1)
        first_open = next(e for e, r in enumerate(self.ratios) if r > 0.0)
        is_closed = torch.zeros(self.num_experts, dtype=torch.bool, device=s.device)
        is_closed[closed] = True
        return torch.where(is_closed[idx], torch.full_like(idx, first_open), idx)

    def aux_loss(
        self, logits: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unscaled prefill/decode consistency loss (METHOD.md step 4) of logits [B, L, E] against the
        expert-choice target [B, L], averaged over valid tokens. 0-dim, float32 (float64 for float64
        logits)."""
        E = self.num_experts
        if logits.dim() < 1 or logits.shape[-1] != E:
            raise ValueError(f"logits: expected last dim {E} (experts), got shape {shape_str(logits.shape)}")
        if tuple(target.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"target: expected shape {shape_str(logits.shape[:-1])}, got {shape_str(target.shape)}")
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        z = logits.to(acc).reshape(-1, E)
        t = target.reshape(-1).long()
        if self.aux_loss_kind == "sigmoid_ce":
            per_token = F.cross_entropy(torch.sigmoid(z), t, reduction="none")
        elif self.aux_loss_kind == "logit_ce":
            per_token = F.cross_entropy(z, t, reduction="none")
        else:
            per_token = F.binary_cross_entropy_with_logits(z, F.one_hot(t, E).to(acc), reduction="none").mean(-1)
        if valid_mask is None:
            return per_token.mean()
        if tuple(valid_mask.shape) != tuple(target.shape):
            raise ValueError(
                f"valid_mask: expected shape {shape_str(target.shape)}, got {shape_str(valid_mask.shape)}"
            )
        w = valid_mask.reshape(-1).ne(0).to(acc)
        return (per_token * w).sum() / w.sum().clamp_min(1.0)
