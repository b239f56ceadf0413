"""Functional pieces of the mixsga layers, shared by the modules and usable on their own."""

from __future__ import annotations

import torch

from .._checks import check_floating, shape_str


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding, Llama convention of Hugging Face transformers (`rotate_half` over the
    two halves of the head dim, inv_freq = theta^(-2i/d)). Identical to the C++ mixsga::nn::apply_rope:
    angles in float32 (float64 for float64 x), cos/sin cast to x's dtype before the rotation.

    Args:
        x: [B, L, H, d] with d even.
        positions: [B, L], [1, L] or [L] integer positions.
        theta: RoPE base (> 0), default 10000.
    Returns:
        [B, L, H, d] in x's dtype.
    """
    B, L, d = _check_rope_input(x)
    if not (
        (positions.dim() == 1 and positions.shape[0] == L)
        or (positions.dim() == 2 and positions.shape[1] == L and positions.shape[0] in (B, 1))
    ):
        raise ValueError(f"positions: expected shape [{B}, {L}] or [{L}], got {shape_str(positions.shape)}")
    if not theta > 0.0:
        raise ValueError(f"theta: must be > 0, got {theta}")
    return rotate(x, *rope_angles(positions, d, theta, x.dtype, x.device))


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [B|1, L, head_dim] in ``dtype``, of the plain Llama RoPE at ``positions`` ([L] or
    [B|1, L]): what apply_rope rotates with, for apply_rope_cos_sin (compute once, rotate q and k).
    Angles in float32 (float64 for float64 ``dtype``), then cast."""
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = _inv_freq(head_dim, float(theta), angle_dtype, torch.device(device))
    pos = (positions.unsqueeze(0) if positions.dim() == 1 else positions).to(device=device, dtype=angle_dtype)
    freqs = pos.unsqueeze(-1) * inv_freq  # [B|1, L, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B|1, L, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _inv_freq(head_dim: int, theta: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """theta^(-2i/d), i < d/2. Eager calls reuse one tensor per (d, theta, dtype, device): a decode step
    would otherwise spend four ops on it per layer. Traced calls compute it in the graph."""
    if torch.compiler.is_compiling():
        return torch.pow(theta, torch.arange(0, head_dim, 2, device=device).to(dtype) / float(head_dim)).reciprocal()
    key = (head_dim, theta, dtype, device)
    cached = _INV_FREQ.get(key)
    if cached is None:
        with torch.inference_mode(False), torch.no_grad():
            cached = torch.pow(theta, torch.arange(0, head_dim, 2, device=device).to(dtype) / float(head_dim)).reciprocal()
        _INV_FREQ[key] = cached
    return cached


def apply_rope_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding from precomputed angles, same rotate_half convention as apply_rope: for
    models whose RoPE variant (scaled, YaRN, ...) computes its own cos/sin (Hugging Face passes them to
    every attention layer as ``position_embeddings``).

    Args:
        x: [B, L, H, d].
        cos, sin: [B, L, d] or [1, L, d] (the same for every head), cast to x's dtype.
    Returns:
        [B, L, H, d] in x's dtype.
    """
    B, L, d = _check_rope_input(x)
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[1] != L or t.shape[2] != d or t.shape[0] not in (B, 1):
            raise ValueError(f"{name}: expected shape [{B}, {L}, {d}] or [1, {L}, {d}], got {shape_str(t.shape)}")
    return rotate(x, cos, sin)


def _check_rope_input(x: torch.Tensor) -> tuple[int, int, int]:
    """Checks x [B, L, H, d] (floating, d even) -> (B, L, d)."""
    check_floating(x, "x")
    if x.dim() != 4 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x: expected shape [B, L, H, d] with even d, got {shape_str(x.shape)}")
    return x.shape[0], x.shape[1], x.shape[3]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotate_half rotation of x [B, L, H, d] by cos/sin [B|1, L, d] (cast to x's dtype).

    On CPU this is the fused ``torch.ops.mixsga.rope_rotate`` (one pass over x, differentiable in x);
    elsewhere, or when the angles require grad, the composite form below (the reference it is tested
    against)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if x.device.type == "cpu" and not (cos.requires_grad or sin.requires_grad) and cos.device.type == "cpu":
        return torch.ops.mixsga.rope_rotate(x, cos, sin)
    return rotate_reference(x, cos, sin)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in plain PyTorch: x [B, L, H, d], cos/sin [B|1, L, d] in x's dtype."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B|1, L, 1, d]
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def default_positions(valid: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """Positions used when none are given: arange(L) ([L]), or, with a [B, L] bool padding mask,
    cumsum(mask) - 1 clamped at 0 ([B, L]) so left-padded sequences start at position 0."""
    if valid is None:
        return torch.arange(length, device=device)
    return (valid.long().cumsum(1) - 1).clamp_min(0)


def padding_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool mask for scaled_dot_product_attention from a [B, L] bool padding mask:
    causal AND key-is-real. The diagonal stays open so a padded query never has an all-masked row
    (which would give NaN); its output is meaningless but finite."""
    B, L = valid.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    diagonal = torch.eye(L, dtype=torch.bool, device=valid.device)
    return (causal & (valid.view(B, 1, 1, L) | diagonal)).contiguous()
