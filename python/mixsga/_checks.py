"""Argument checks of the Python side, worded like the C++ ones (src/ops/validation.cpp,
src/nn/module_checks.h) so a bad argument reads the same from either language: every message names the
argument and the value seen. Shape checks only: they run at trace time under torch.compile too."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
AUX_LOSS_KINDS = ("sigmoid_ce", "logit_ce", "bce")
PREFILL_ROUTING_MODES = ("expert_choice", "argmax")


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _join(values: Sequence[object]) -> str:
    return ", ".join(str(v) for v in values)


def check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be > 0, got {value!r}")


def check_ratios(ratios: Sequence[float], num_experts: int | None = None, name: str = "ratios") -> tuple[float, ...]:
    """Returns the ratios as a tuple of floats: non-empty, each finite and in [0, 1], summing to 1 (1e-6)."""
    try:
        values = tuple(float(r) for r in ratios)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of floats, got {ratios!r}") from None
    if not values:
        raise ValueError(f"{name}: must hold one ratio per expert, got an empty list")
    if num_experts is not None and len(values) != num_experts:
        raise ValueError(f"{name}: expected {num_experts} ratios (one per expert), got {len(values)} ({_join(values)})")
    for e, r in enumerate(values):
        if not (math.isfinite(r) and 0.0 <= r <= 1.0):
            raise ValueError(f"{name}: every ratio must be in [0, 1], got {name}[{e}] = {r}")
    total = sum(values)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{name}: ratios must sum to 1, got ({_join(values)}) which sums to {total}")
    return values


def check_kv_cap(kv_cap: float | None, group_sizes: Sequence[int]) -> float | None:
    """Returns the hard KV cap as a float, or None (no cap): a share of the full K/V in [1/g_max, 1], what the
    group sizes can store (the same rule as HeteroKVCacheOptions.kv_cap, checked here before any cache exists)."""
    if kv_cap is None:
        return None
    if isinstance(kv_cap, bool) or not isinstance(kv_cap, (int, float)):
        raise TypeError(f"kv_cap: expected a float or None, got {kv_cap!r}")
    coarsest = max(group_sizes)
    value = float(kv_cap)
    if not (math.isfinite(value) and value * coarsest >= 1.0 - 1e-9 and value <= 1.0):
        raise ValueError(f"kv_cap: must be in [1/{coarsest}, 1] = [{1 / coarsest:.4g}, 1], the shares of the full K/V "
                         f"that group sizes {tuple(group_sizes)} can store, got {kv_cap!r}")
    return value


def check_decode_offsets(offsets: Sequence[float] | None, num_experts: int) -> tuple[float, ...]:
    """Returns the decode offsets as a tuple of floats: empty (None: no offsets) or one finite value per
    expert."""
    if offsets is None:
        return ()
    try:
        values = tuple(float(v) for v in offsets)
    except TypeError:
        raise TypeError(f"decode_offsets: expected a sequence of floats or None, got {offsets!r}") from None
    if values and len(values) != num_experts:
        raise ValueError(f"decode_offsets: expected none or one per expert ({num_experts}), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"decode_offsets: must be finite, got [{_join(values)}]")
    return values


def check_group_sizes(
    group_sizes: Sequence[int], num_kv_heads: int | None = None, name: str = "group_sizes"
) -> tuple[int, ...]:
    """Returns the group sizes as a tuple of ints: non-empty, each >= 1, strictly increasing, each
    dividing num_kv_heads (when given)."""
    try:
        values = tuple(group_sizes)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of ints, got {group_sizes!r}") from None
    if not values:
        raise ValueError(f"{name}: must hold one group size per expert, got an empty list")
    for e, g in enumerate(values):
        if isinstance(g, bool) or not isinstance(g, int):
            raise TypeError(f"{name}: expected ints, got {name}[{e}] = {g!r}")
        if g < 1:
            raise ValueError(f"{name}: every group size must be >= 1, got {name}[{e}] = {g}")
        if e > 0 and g <= values[e - 1]:
            raise ValueError(
                f"{name}: group sizes must be strictly increasing (finest expert first), got [{_join(values)}]"
            )
        if num_kv_heads is not None and num_kv_heads > 0 and num_kv_heads % g != 0:
            raise ValueError(
                f"{name}: every group size must divide the number of KV heads ({num_kv_heads}), "
                f"got {name}[{e}] = {g}"
            )
    return values


def check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_floating(t: object, name: str) -> torch.Tensor:
    t = check_tensor(t, name)
    if t.dtype not in FLOATING:
        raise TypeError(f"{name}: expected float32, float64, bfloat16 or float16, got {t.dtype}")
    return t


def check_integer(t: object, name: str) -> torch.Tensor:
    t = check_tensor(t, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
    return t


def check_device(t: torch.Tensor, device: torch.device, name: str) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def check_expert_idx_shape(
    expert_idx: object, expected_shape: Sequence[int], device: torch.device, name: str = "expert_idx"
) -> torch.Tensor:
    """Dtype, device and shape of an expert index tensor (its values are checked by the kernels)."""
    t = check_integer(expert_idx, name)
    check_device(t, device, name)
    if tuple(t.shape) != tuple(expected_shape):
        raise ValueError(
            f"{name}: expected shape {shape_str(expected_shape)} (the token dims of the input), "
            f"got {shape_str(t.shape)}"
        )
    return t


def check_aux_loss_kind(kind: str) -> str:
    if kind not in AUX_LOSS_KINDS:
        raise ValueError(f"aux_loss: must be one of 'sigmoid_ce', 'logit_ce', 'bce', got {kind!r}")
    return kind


def check_prefill_routing(mode: str) -> str:
    if mode not in PREFILL_ROUTING_MODES:
        raise ValueError(f"prefill_routing: must be 'expert_choice' or 'argmax', got {mode!r}")
    return mode


KEY_SCALES = ("none", "group", "learned")
ROUTING_SIGNALS = ("router", "pooling_error")


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``; else a ValueError naming the option, the choices and the value."""
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_key_scale(mode: str) -> str:
    return check_choice(mode, "key_scale", KEY_SCALES)


def check_routing_signal(mode: str) -> str:
    return check_choice(mode, "routing_signal", ROUTING_SIGNALS)
