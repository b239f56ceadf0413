"""Fake (meta) kernels of every torch.ops.mixsga op.

A fake kernel computes only what the CPU/CUDA kernels would return: the shape, dtype, device and
(contiguous) strides of every output, from the input shapes and int arguments alone. That is what
torch.compile traces with and what torch.library.opcheck compares against the real kernels.

Each fake kernel takes its op's arguments in schema order (mixsga.ops documents them). The shape/dtype
checks of the real kernels are repeated here, so a bad call fails with the same message while tracing.
Checks that need tensor *values* cannot run on fake tensors and are left to the real kernels (they raise
the same ValueError when the compiled graph runs):
  * route_expert_choice: every sequence of valid_mask needs at least one valid token;
  * grouped_kv_pool, grouped_kv_proj, _grouped_kv_proj_backward, expert_permutation: expert_idx values
    must lie in [0, E);
  * expert_scatter, expert_gather: permutation must be a permutation of 0..N-1;
  * hetero_decode_attention, hetero_cache_attention: lengths[b, e] must lie in [0, T_e].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._checks import (
    check_device,
    check_expert_idx_shape,
    check_floating,
    check_group_sizes,
    check_integer,
    check_ratios,
    shape_str,
)


def _route_expert_choice(
    scores: torch.Tensor, ratios: Sequence[float], valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    check_floating(scores, "scores")
    if scores.dim() != 3:
        raise ValueError(f"scores: expected shape [B, L, E], got {shape_str(scores.shape)}")
    B, L, E = scores.shape
    if E < 1:
        raise ValueError(f"scores: needs at least one expert column, got shape {shape_str(scores.shape)}")
    check_ratios(ratios, E)
    if valid_mask is not None:
        check_device(valid_mask, scores.device, "valid_mask")
        if tuple(valid_mask.shape) != (B, L):
            raise ValueError(
                f"valid_mask: expected shape [{B}, {L}] (the [B, L] of scores), got {shape_str(valid_mask.shape)}"
            )
    return scores.new_empty((B, L), dtype=torch.long)


def _check_kv_heads(heads: int, group_sizes: Sequence[int]) -> None:
    check_group_sizes(group_sizes, heads)


def _grouped_kv_pool(kv: torch.Tensor, expert_idx: torch.Tensor, group_sizes: Sequence[int]) -> torch.Tensor:
    check_floating(kv, "kv")
    if kv.dim() < 2:
        raise ValueError(f"kv: expected shape [*, Hkv, d], got {shape_str(kv.shape)}")
    _check_kv_heads(kv.shape[-2], group_sizes)
    check_expert_idx_shape(expert_idx, kv.shape[:-2], kv.device)
    return kv.new_empty(kv.shape)


def _check_proj(
    x: torch.Tensor, weight: torch.Tensor, expert_idx: torch.Tensor, group_sizes: Sequence[int], head_dim: int
) -> int:
    """Returns Hkv."""
    check_floating(x, "x")
    check_floating(weight, "weight")
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [*, D], got {shape_str(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight: expected shape [Hkv * head_dim, {x.shape[-1]}] (D = x.size(-1)), got {shape_str(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected the dtype of x ({x.dtype}), got {weight.dtype}")
    check_device(weight, x.device, "weight")
    if head_dim < 1 or weight.shape[0] == 0 or weight.shape[0] % head_dim != 0:
        raise ValueError(f"head_dim: must be >= 1 and divide weight.size(0) ({weight.shape[0]}), got {head_dim}")
    heads = weight.shape[0] // head_dim
    _check_kv_heads(heads, group_sizes)
    check_expert_idx_shape(expert_idx, x.shape[:-1], x.device)
    return heads


def _grouped_kv_proj(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, expert_idx: torch.Tensor,
                     group_sizes: Sequence[int], head_dim: int) -> torch.Tensor:
    heads = _check_proj(x, weight, expert_idx, group_sizes, head_dim)
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape [{weight.shape[0]}] (weight.size(0)), got {shape_str(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected the dtype of x ({x.dtype}), got {bias.dtype}")
        check_device(bias, x.device, "bias")
    return x.new_empty((*x.shape[:-1], heads, head_dim))


def _grouped_kv_proj_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_idx: torch.Tensor,
    group_sizes: Sequence[int],
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads = _check_proj(x, weight, expert_idx, group_sizes, head_dim)
    expected = (*x.shape[:-1], heads, head_dim)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"grad_out: expected shape {shape_str(expected)}, got {shape_str(grad_out.shape)}")
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


def _expert_permutation(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    if num_experts < 1:
        raise ValueError(f"num_experts: must be >= 1, got {num_experts}")
    check_integer(expert_idx, "expert_idx")
    return (
        expert_idx.new_empty((expert_idx.numel(),), dtype=torch.long),
        expert_idx.new_empty((num_experts + 1,), dtype=torch.long),
    )


def _check_permutation(x: torch.Tensor, permutation: torch.Tensor) -> None:
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [N, *], got {shape_str(x.shape)}")
    if permutation.dtype != torch.long:
        raise TypeError(f"permutation: expected int64, got {permutation.dtype}")
    check_device(permutation, x.device, "permutation")
    if permutation.dim() != 1 or permutation.shape[0] != x.shape[0]:
        raise ValueError(
            f"permutation: expected shape [{x.shape[0]}] (x.size(0)), got {shape_str(permutation.shape)}"
        )


def _expert_scatter(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    _check_permutation(x, permutation)
    return x.new_empty(x.shape)


def _expert_gather(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    _check_permutation(x, permutation)
    return x.new_empty(x.shape)


def _check_pools(q: torch.Tensor, k_pools: Sequence[torch.Tensor], v_pools: Sequence[torch.Tensor], B: int,
                 d: int, num_kv_heads: int) -> None:
    """Every pool e is [B, Hkv/g_e, T_e, d] (Hkv/g_e dividing num_kv_heads) in q's dtype and device, and
    v_pools[e] has k_pools[e]'s shape (the checks both attention ops share)."""
    for e in range(len(k_pools)):
        for pools, name in ((k_pools, "k_pools"), (v_pools, "v_pools")):
            p = pools[e]
            if p.dim() != 4 or p.shape[0] != B or p.shape[3] != d or p.shape[1] <= 0 or num_kv_heads % p.shape[1]:
                raise ValueError(
                    f"{name}[{e}]: expected shape [{B}, Hkv/g, T, {d}] with Hkv/g dividing num_kv_heads "
                    f"({num_kv_heads}), got {shape_str(p.shape)}"
                )
            if p.dtype != q.dtype:
                raise TypeError(f"{name}[{e}]: expected the dtype of q ({q.dtype}), got {p.dtype}")
            check_device(p, q.device, f"{name}[{e}]")
        if tuple(v_pools[e].shape) != tuple(k_pools[e].shape):
            raise ValueError(
                f"v_pools[{e}]: expected the shape of k_pools[{e}] {shape_str(k_pools[e].shape)}, "
                f"got {shape_str(v_pools[e].shape)}"
            )


def _check_query(q: torch.Tensor, dims: tuple[str, ...], num_kv_heads: int) -> tuple[int, ...]:
    """q is floating with the named ``dims`` (query heads Hq second to last, a multiple of num_kv_heads);
    returns its shape (the first checks of both attention ops)."""
    check_floating(q, "q")
    if q.dim() != len(dims):
        raise ValueError(f"q: expected shape [{', '.join(dims)}], got {shape_str(q.shape)}")
    Hq = q.shape[-2]
    if num_kv_heads <= 0 or Hq % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads: must be > 0 and divide the query heads ({Hq}), got {num_kv_heads}")
    return tuple(q.shape)


def _check_pool_counts(**per_pool: Sequence[torch.Tensor]) -> int:
    """Every list of ``per_pool`` (k_pools, v_pools, ...) holds the same number E >= 1 of entries; returns E."""
    counts = [len(entries) for entries in per_pool.values()]
    E = counts[0]
    if E < 1 or any(n != E for n in counts[1:]):
        got = ", ".join(str(n) for n in counts[:-1]) + f" and {counts[-1]}"
        raise ValueError(f"{' / '.join(per_pool)}: expected the same number (>= 1) of pools, got {got}")
    return E


def _check_lengths(lengths: torch.Tensor, B: int, E: int) -> None:
    """lengths is an integer [B, E] tensor (its values are checked by the kernels)."""
    if tuple(lengths.shape) != (B, E):
        raise ValueError(f"lengths: expected shape [{B}, {E}] (batch, pools), got {shape_str(lengths.shape)}")
    check_integer(lengths, "lengths")


def _hetero_decode_attention(q: torch.Tensor, k_pools: Sequence[torch.Tensor], v_pools: Sequence[torch.Tensor],
                             lengths: torch.Tensor, num_kv_heads: int, scale: float | None = None) -> torch.Tensor:
    B, _, d = _check_query(q, ("B", "Hq", "d"), num_kv_heads)
    E = _check_pool_counts(k_pools=k_pools, v_pools=v_pools)
    _check_lengths(lengths, B, E)
    _check_pools(q, k_pools, v_pools, B, d, num_kv_heads)
    return q.new_empty(q.shape)


def _hetero_cache_attention(q: torch.Tensor, query_positions: torch.Tensor, k_pools: Sequence[torch.Tensor],
                            v_pools: Sequence[torch.Tensor], key_positions: Sequence[torch.Tensor],
                            lengths: torch.Tensor, num_kv_heads: int, scale: float | None = None) -> torch.Tensor:
    B, L, Hq, d = _check_query(q, ("B", "L", "Hq", "d"), num_kv_heads)
    check_integer(query_positions, "query_positions")
    if tuple(query_positions.shape) != (B, L):
        raise ValueError(
            f"query_positions: expected shape [{B}, {L}] (the [B, L] of q), got {shape_str(query_positions.shape)}"
        )
    if query_positions.device != q.device:
        raise ValueError(f"query_positions: expected the device of q ({q.device}), got {query_positions.device}")
    E = _check_pool_counts(k_pools=k_pools, v_pools=v_pools, key_positions=key_positions)
    _check_lengths(lengths, B, E)
    if lengths.device.type != "cpu" and lengths.device != q.device:
        raise ValueError(f"lengths: expected the CPU or the device of q ({q.device}), got {lengths.device}")
    _check_pools(q, k_pools, v_pools, B, d, num_kv_heads)
    for e in range(E):
        pos = key_positions[e]
        check_integer(pos, f"key_positions[{e}]")
        if tuple(pos.shape) != (B, k_pools[e].shape[2]):
            raise ValueError(
                f"key_positions[{e}]: expected shape [{B}, {k_pools[e].shape[2]}] (batch, the token dim of "
                f"k_pools[{e}]), got {shape_str(pos.shape)}"
            )
        if pos.device != q.device:
            raise ValueError(f"key_positions[{e}]: expected the device of q ({q.device}), got {pos.device}")
    return q.new_empty((B, L, Hq, d))  # contiguous, like the kernels


def _rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    check_floating(x, "x")
    if x.dim() != 4 or x.shape[3] % 2 != 0:
        raise ValueError(f"x: expected shape [B, L, H, d] with even d, got {shape_str(x.shape)}")
    B, L, _, d = x.shape
    for t, name in ((cos, "cos"), (sin, "sin")):
        if t.dim() != 3 or t.shape[0] not in (B, 1) or t.shape[1] != L or t.shape[2] != d:
            raise ValueError(f"{name}: expected shape [{B}, {L}, {d}] or [1, {L}, {d}], got {shape_str(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected the dtype of x ({x.dtype}), got {t.dtype}")
        check_device(t, x.device, name)
    if cos.shape[0] != sin.shape[0]:
        raise ValueError(f"sin: expected the batch size of cos ({cos.shape[0]}), got {sin.shape[0]}")
    return x.new_empty(x.shape)  # contiguous, like the kernel


#: op name -> fake kernel. tests/python/test_ops.py checks that every op of the schema table has one.
FAKE_KERNELS: dict[str, Callable[..., object]] = {
    "route_expert_choice": _route_expert_choice,
    "grouped_kv_pool": _grouped_kv_pool,
    "grouped_kv_proj": _grouped_kv_proj,
    "_grouped_kv_proj_backward": _grouped_kv_proj_backward,
    "expert_permutation": _expert_permutation,
    "expert_scatter": _expert_scatter,
    "expert_gather": _expert_gather,
    "hetero_decode_attention": _hetero_decode_attention,
    "hetero_cache_attention": _hetero_cache_attention,
    "rope_rotate": _rope_rotate,
}


def register() -> list[str]:
    """Registers the fake kernel of every op the loaded library defines; returns their names.

    An op of this table that the library does not define (a build from an older source tree) is skipped
    rather than breaking `import mixsga`; an op the library defines without a fake kernel here is caught
    by the test suite.
    """
    registered = []
    for name, kernel in FAKE_KERNELS.items():
        if not hasattr(torch.ops.mixsga, name):
            continue
        torch.library.register_fake(f"mixsga::{name}", kernel)
        registered.append(name)
    return registered
