"""SharedGroupKV: the weight-shared K/V projections of all experts (METHOD.md step 5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_group_sizes, check_positive


def pool_kv_weight(weight: torch.Tensor, group_size: int, head_dim: int) -> torch.Tensor:
    """Pools the rows of a K/V projection weight [Hkv*d, ...] (or bias [Hkv*d]) over groups of group_size
    consecutive heads: -> [(Hkv/group_size)*d, ...]. Differentiable (plain PyTorch)."""
    if head_dim < 1 or weight.shape[0] % head_dim != 0:
        raise ValueError(f"head_dim: must be >= 1 and divide weight.size(0) ({weight.shape[0]}), got {head_dim}")
    heads = weight.shape[0] // head_dim
    if group_size < 1 or heads % group_size != 0:
        raise ValueError(f"group_size: must be >= 1 and divide the number of KV heads ({heads}), got {group_size}")
    if group_size == 1:
        return weight
    rest = tuple(weight.shape[1:])
    return weight.reshape(heads // group_size, group_size, head_dim, *rest).mean(1).reshape(-1, *rest)


class SharedGroupKV(nn.Module):
    """The layer's original K/V projections, shared by every expert: expert e uses them pooled over groups
    of group_sizes[e] heads. Same arguments, parameter names and shapes as the C++ mixsga::nn::SharedGroupKV.

    Args:
        hidden_size: D. num_kv_heads: Hkv. head_dim: d.
        group_sizes: group size per expert, strictly increasing, each dividing Hkv. Default (1, 2, 4).
        bias: whether k_proj / v_proj have biases. Default False.

    Submodules: k_proj, v_proj = nn.Linear(D, Hkv * d).
    """

    def __init__(
        self,
        hidden_size: int,
        num_kv_heads: int,
        head_dim: int,
        group_sizes: Sequence[int] = (1, 2, 4),
        bias: bool = False,
    ) -> None:
        super().__init__()
        check_positive(hidden_size, "hidden_size")
        check_positive(num_kv_heads, "num_kv_heads")
        check_positive(head_dim, "head_dim")
        self.hidden_size, self.num_kv_heads, self.head_dim = hidden_size, num_kv_heads, head_dim
        self.group_sizes = check_group_sizes(group_sizes, num_kv_heads)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"group_sizes={self.group_sizes}"
        )

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V), each [B, L, Hkv, d]: every token's expert-pooled K/V repeated back to Hkv heads, from
        x [B, L, D] and expert_idx [B, L] integer. Both are views of one [B, L, 2*Hkv, d] tensor (see
        grouped_kv)."""
        return grouped_kv(x, self.k_proj, self.v_proj, expert_idx, self.group_sizes, self.head_dim)

    def expert_weights(self, expert: int, key: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled (weight [(Hkv/g_e)*d, D], bias [(Hkv/g_e)*d] or None) of expert `expert` for K (key=True)
        or V: what the compact cache projects with."""
        if not 0 <= expert < len(self.group_sizes):
            raise IndexError(f"expert: must be in [0, {len(self.group_sizes)}), got {expert}")
        linear = self.k_proj if key else self.v_proj
        g = self.group_sizes[expert]
        bias = None if linear.bias is None else pool_kv_weight(linear.bias, g, self.head_dim)
        return pool_kv_weight(linear.weight, g, self.head_dim), bias


def grouped_kv(
    x: torch.Tensor,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    expert_idx: torch.Tensor,
    group_sizes: Sequence[int],
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's K and V under its own expert, in one ``grouped_kv_proj`` over the stacked weight
    [W_k; W_v] (2*Hkv heads): the tokens are sorted and gathered once and each expert's GEMM is twice as
    wide, instead of two calls. Pooling groups never straddle the K/V boundary, since every group size
    divides Hkv.

    Args:
        x: [B, L, D]. k_proj, v_proj: nn.Linear(D, Hkv*d), both with or both without bias.
        expert_idx: [B, L] integer in [0, E). group_sizes: E group sizes. head_dim: d.
    Returns:
        (K, V), each [B, L, Hkv, d], views (split on the head axis) of one [B, L, 2*Hkv, d] tensor.
    """
    weight, bias = stacked_kv_weight(k_proj, v_proj)
    kv = torch.ops.mixsga.grouped_kv_proj(x, weight, bias, expert_idx, list(group_sizes), head_dim)
    heads = k_proj.weight.shape[0] // head_dim
    # split (not two narrows): its backward is one cat of the two gradients, not two zero-filled buffers.
    k, v = kv.split(heads, dim=-2)
    return k, v


def stacked_kv_weight(k_proj: nn.Linear, v_proj: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([W_k; W_v] [2*Hkv*d, D], [b_k; b_v] or None).

    With autograd on (training) or under torch.compile this is a fresh torch.cat, differentiable. Without
    autograd (inference, decode) the concatenation is kept on v_proj and reused while both weights are
    unchanged (same storage, same version counter): a decode step would otherwise copy both weights for
    one token. In-place updates through ``.data`` bypass the version counter; call
    ``clear_kv_weight_cache(v_proj)`` after such an edit.
    """
    params = [k_proj.weight, v_proj.weight] + ([] if k_proj.bias is None else [k_proj.bias, v_proj.bias])
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return torch.cat(params[:2]), (torch.cat(params[2:]) if len(params) == 4 else None)
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cached = v_proj.__dict__.get("_mixsga_kv_stack")
    if cached is None or cached[0] != key:
        stacked = (torch.cat(params[:2]), torch.cat(params[2:]) if len(params) == 4 else None)
        cached = (key, stacked)
        v_proj.__dict__["_mixsga_kv_stack"] = cached
    return cached[1]


def clear_kv_weight_cache(v_proj: nn.Linear) -> None:
    """Drops the stacked and pooled K/V weights kept for inference on ``v_proj`` (needed only after an
    in-place edit through ``.data``, which the version counter does not see)."""
    v_proj.__dict__.pop("_mixsga_kv_stack", None)
    v_proj.__dict__.pop("_mixsga_kv_pooled", None)


class CompactKV(NamedTuple):
    """The K/V of the valid tokens at their compact size (``compact_kv``), one entry per expert."""

    keys: list[torch.Tensor]  #: E tensors [N_e, Hkv/g_e, d]
    values: list[torch.Tensor]  #: E tensors [N_e, Hkv/g_e, d]
    rows: list[torch.Tensor]  #: E int64 tensors [N_e]: flat token index b * L + t, batch-major


def compact_kv(
    x: torch.Tensor,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    expert_idx: torch.Tensor,
    valid: torch.Tensor | None,
    group_sizes: Sequence[int],
    head_dim: int,
) -> CompactKV:
    """Each valid token's K and V at its expert's compact size, never expanded to Hkv heads: what the
    compact cache stores (``HeteroKVCache.append_compact``), for decode steps and chunks. Expert e projects
    its tokens with its pooled [W_k; W_v] (kept between calls without autograd, like stacked_kv_weight), so
    it reads 1/g_e of the weights. The same as the C++ ``SharedGroupKV::forward_compact``.

    Args:
        x: [B, L, D]. expert_idx: [B, L] integer in [0, E). valid: optional [B, L] bool (padding is skipped).
    Returns:
        CompactKV(keys, values, rows): expert e's tokens in batch-major order, the order append_compact expects.
    """
    E, D = len(group_sizes), x.shape[-1]
    heads = k_proj.weight.shape[0] // head_dim
    idx = expert_idx.reshape(-1).long()
    flat = x.reshape(-1, D)
    if idx.numel() == 1:
        # One decode token: its expert is read directly (a host read, as the permutation's offsets would
        # be), which saves the permutation op on the latency-bound path. Padding: bucket E, no expert.
        expert = int(idx[0]) if valid is None or bool(valid.reshape(-1)[0]) else E
        perm = torch.zeros(1, dtype=torch.long, device=x.device)
        bounds = [0] * (expert + 1) + [1] * (E - expert)
    else:
        if valid is not None:  # padding goes to an extra bucket E that is never projected
            idx = idx.masked_fill(~valid.reshape(-1), E)
        perm, offsets = torch.ops.mixsga.expert_permutation(idx, E + 1)
        bounds = offsets.tolist()
    pooled = _pooled_kv_weights(k_proj, v_proj, group_sizes, head_dim)
    out = CompactKV([], [], [])
    for e, g in enumerate(group_sizes):
        rows = perm[bounds[e] : bounds[e + 1]]
        if rows.numel() == 0:  # no projection for an expert without tokens
            k = v = flat.new_empty(0, heads // g, head_dim)
        else:
            weight, bias = pooled[e]
            kv = F.linear(flat.index_select(0, rows), weight, bias).view(-1, 2 * heads // g, head_dim)
            k, v = kv.split(heads // g, 1)
        out.keys.append(k)
        out.values.append(v)
        out.rows.append(rows)
    return out


def _pooled_kv_weights(
    k_proj: nn.Linear, v_proj: nn.Linear, group_sizes: Sequence[int], head_dim: int
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """[(pooled [W_k; W_v], pooled [b_k; b_v] or None) per expert], cached on v_proj under the same key
    as stacked_kv_weight (storage, version counter) plus the group sizes; fresh (differentiable) with
    autograd on."""
    weight, bias = stacked_kv_weight(k_proj, v_proj)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return [(pool_kv_weight(weight, g, head_dim), None if bias is None else pool_kv_weight(bias, g, head_dim))
                for g in group_sizes]
    key = (v_proj.__dict__["_mixsga_kv_stack"][0], tuple(group_sizes), head_dim)
    cached = v_proj.__dict__.get("_mixsga_kv_pooled")
    if cached is None or cached[0] != key:
        pooled = [(pool_kv_weight(weight, g, head_dim).contiguous(),
                   None if bias is None else pool_kv_weight(bias, g, head_dim).contiguous()) for g in group_sizes]
        cached = (key, pooled)
        v_proj.__dict__["_mixsga_kv_pooled"] = cached
    return cached[1]


def pooling_error(
    x: torch.Tensor, k_proj: nn.Linear, v_proj: nn.Linear, group_size: int, head_dim: int
) -> torch.Tensor:
    """Each token's importance for routing (``routing_signal="pooling_error"``): how much mean-pooling
    groups of ``group_size`` KV heads destroys its K and V, ``||KV_t - pool_g(KV_t)||^2`` summed over its
    2*Hkv heads (K and V from the full projections, before RoPE, which is an isometry per head and so
    leaves the error unchanged). No gradient. x [B, L, D] -> [B, L] float32 (float64 for float64 x)."""
    with torch.no_grad():
        weight, bias = stacked_kv_weight(k_proj, v_proj)
        kv = F.linear(x.detach(), weight, bias)
        B, L = x.shape[0], x.shape[1]
        kv = kv.view(B, L, -1, group_size, head_dim)  # groups never straddle K and V (g divides Hkv)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        kv = kv.to(acc)
        return (kv - kv.mean(3, keepdim=True)).square().sum((2, 3, 4))
