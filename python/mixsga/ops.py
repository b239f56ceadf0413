"""Typed Python entry points of the mixsga ops (each calls torch.ops.mixsga.<name>).

Shapes use: B batch, L sequence, E experts, Hkv base KV heads, d head dim, D hidden size, N tokens.
All ops run on CPU (and on CUDA when the library was built with it); all are traceable by torch.compile
(fake kernels in mixsga._fake_kernels). Differentiable: grouped_kv_pool, grouped_kv_proj, expert_scatter,
expert_gather, rope_rotate (autograd implemented in C++). The cache attention ops (hetero_decode_attention,
hetero_cache_attention) are inference-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _library  # noqa: F401  (registers the ops)


def route_expert_choice(
    scores: torch.Tensor, ratios: Sequence[float], valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Progressive exclusive expert-choice routing (METHOD.md step 2), per sequence.

    Experts are visited finest first; expert e < E-1 takes the min(ceil(ratios[e] * n), remaining)
    untaken valid tokens with the highest scores[..., e], the last expert takes the rest (n = valid
    tokens of the sequence). Ties go to the lower position; NaN ranks below every number; padding takes
    no capacity and gets E-1. Not differentiable.

    Args:
        scores: [B, L, E] floating router scores.
        ratios: E capacity ratios in [0, 1] summing to 1.
        valid_mask: optional [B, L] mask (nonzero = real token); every sequence needs one valid token.
    Returns:
        [B, L] int64 expert index per token.
    """
    return torch.ops.mixsga.route_expert_choice(scores, [float(r) for r in ratios], valid_mask)


def grouped_kv_pool(kv: torch.Tensor, expert_idx: torch.Tensor, group_sizes: Sequence[int]) -> torch.Tensor:
    """Each token's KV heads averaged within its expert's groups of group_sizes[e] consecutive heads and
    repeated back (METHOD.md step 5 on projected heads).

    Args:
        kv: [*, Hkv, d] projected K or V.
        expert_idx: [*] integer expert per token, in [0, E).
        group_sizes: E strictly increasing group sizes, each dividing Hkv.
    Returns:
        [*, Hkv, d], kv's dtype.
    """
    return torch.ops.mixsga.grouped_kv_pool(kv, expert_idx, list(group_sizes))


def grouped_kv_proj(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    expert_idx: torch.Tensor,
    group_sizes: Sequence[int],
    head_dim: int,
) -> torch.Tensor:
    """Each token's K (or V) from its expert's pooled weights: x @ pool_e(W)^T + pool_e(b), repeated back
    to Hkv heads. Equals grouped_kv_pool(linear(x, weight, bias), ...) at sum_e (n_e/N)/g_e of the cost.

    Args:
        x: [*, D]. weight: [Hkv * head_dim, D] (nn.Linear layout). bias: optional [Hkv * head_dim].
        expert_idx: [*] integer expert per token. group_sizes: E group sizes dividing Hkv.
        head_dim: d.
    Returns:
        [*, Hkv, d], x's dtype.
    """
    return torch.ops.mixsga.grouped_kv_proj(x, weight, bias, expert_idx, list(group_sizes), int(head_dim))


def expert_permutation(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable permutation grouping tokens by expert.

    Args:
        expert_idx: [*] integer expert per token, in [0, num_experts).
    Returns:
        (permutation [N] int64, offsets [num_experts + 1] int64): expert e owns
        permutation[offsets[e]:offsets[e + 1]], in token order.
    """
    return torch.ops.mixsga.expert_permutation(expert_idx, int(num_experts))


def expert_scatter(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Rows into per-expert blocks: out[i] = x[permutation[i]]. x: [N, *], permutation: [N] int64."""
    return torch.ops.mixsga.expert_scatter(x, permutation)


def expert_gather(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Rows back to token order: out[permutation[i]] = x[i]. x: [N, *], permutation: [N] int64."""
    return torch.ops.mixsga.expert_gather(x, permutation)


def hetero_decode_attention(q: torch.Tensor, k_pools: Sequence[torch.Tensor], v_pools: Sequence[torch.Tensor],
                            lengths: torch.Tensor, num_kv_heads: int, scale: float | None = None) -> torch.Tensor:
    """One decode query per sequence against per-expert compact K/V pools, each pool's partial softmax
    merged by log-sum-exp; the expanded K/V are never formed. Not differentiable.

    Args:
        q: [B, Hq, d] queries (after RoPE).
        k_pools, v_pools: E tensors [B, Hkv/g_e, T_e, d] (head dim contiguous).
        lengths: [B, E] integer; sequence b attends to the first lengths[b, e] tokens of pool e.
        num_kv_heads: Hkv. scale: softmax scale, default 1/sqrt(d).
    Returns:
        [B, Hq, d] in q's dtype (zeros for a sequence with no cached token).
    """
    return torch.ops.mixsga.hetero_decode_attention(q, list(k_pools), list(v_pools), lengths, int(num_kv_heads), scale)


def hetero_cache_attention(q: torch.Tensor, query_positions: torch.Tensor, k_pools: Sequence[torch.Tensor],
                           v_pools: Sequence[torch.Tensor], key_positions: Sequence[torch.Tensor],
                           lengths: torch.Tensor, num_kv_heads: int, scale: float | None = None) -> torch.Tensor:
    """L new queries per sequence against per-expert compact K/V pools, causal by stored positions: query
    (b, l) attends to slot t < lengths[b, e] of pool e when key_positions[e][b, t] <= query_positions[b, l].
    The pools are read in place, never expanded to Hkv heads (query head h reads compact head
    (h // (Hq // Hkv)) // g_e of pool e); one online softmax per query in float32 (float64 for float64).
    With L = 1 and every stored position <= the query's, equals ``hetero_decode_attention``. The usual
    call is a chunk after cached tokens: append the chunk to the cache, then attend with its positions.
    Not differentiable: a backward through it raises.

    Args:
        q: [B, L, Hq, d] queries (after RoPE).
        query_positions: [B, L] integer position of each query in its sequence.
        k_pools, v_pools: E tensors [B, Hkv/g_e, T_e, d] (head dim contiguous), e.g. cache.keys(layer).
        key_positions: E integer tensors [B, T_e], e.g. cache.positions(layer) (int32).
        lengths: [B, E] integer (CPU or q's device); sequence b holds the first lengths[b, e] slots of pool e.
        num_kv_heads: Hkv. scale: softmax scale, default 1/sqrt(d).
    Returns:
        [B, L, Hq, d] contiguous in q's dtype; zeros for a query that sees no stored token.
    """
    return torch.ops.mixsga.hetero_cache_attention(
        q, query_positions, list(k_pools), list(v_pools), list(key_positions), lengths, int(num_kv_heads), scale
    )


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Rotary position embedding (Hugging Face Llama's rotate_half convention) from precomputed angles,
    in one pass: x * cos + rotate_half(x) * sin. CPU kernel (``mixsga.nn.apply_rope`` uses the
    composite form on other devices).

    Args:
        x: [B, L, H, d] floating, d even (rows of d contiguous, or x is copied once).
        cos, sin: [B, L, d] or [1, L, d] in x's dtype (the same angles for every head); must not require grad.
        transpose: apply the transposed rotation (what the backward does). Default False.
    Returns:
        [B, L, H, d] contiguous, x's dtype. Differentiable in x.
    """
    return torch.ops.mixsga.rope_rotate(x, cos, sin, bool(transpose))
