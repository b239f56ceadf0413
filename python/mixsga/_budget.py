"""KV budgets chosen at inference: the decode offsets that make causal argmax routing realise given ratios,
and the ratios of another budget. One home, in C++ (src/nn/router.cpp), shared by both layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fit_decode_offsets(scores: torch.Tensor, ratios: Sequence[float]) -> list[float]:
    """Decode offsets [E] for which causal argmax routing of router ``scores`` [N, E] (N calibration tokens,
    padding excluded, N >= 100 * E) gives each expert as close to ``ratios[e]`` of the tokens as N allows.
    Pass them to ``set_routing`` of a layer (or its ``decode_offsets`` option). Raises ValueError for too
    few tokens or a wrong shape."""
    from . import _C

    return list(_C.fit_decode_offsets(scores, [float(r) for r in ratios]))


def ratios_for_budget(group_sizes: Sequence[int], ratios: Sequence[float], budget: float) -> tuple[float, ...]:
    """Capacity ratios whose KV budget (sum_e ratios[e] / group_sizes[e]) is ``budget``, keeping the trained
    ``ratios``' proportions: mixed linearly with all-coarsest (below the trained budget) or all-finest
    (above it). Raises ValueError naming the budget and the reachable range [1 / max g, 1 / min g]."""
    from . import _C

    return tuple(_C.ratios_for_budget([int(g) for g in group_sizes], [float(r) for r in ratios], float(budget)))
