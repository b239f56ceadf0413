#pragma once
/// Rotary position embedding, Llama convention of Hugging Face transformers: `rotate_half` over the
/// two halves of the head dim, inv_freq = theta^(-2i/d). Angles are computed in float32 (float64 when
/// x is float64) and the result is cast back to x's dtype, as transformers does.

#include <ATen/Tensor.h>

#include <tuple>

namespace mixsga::nn {

/// Rotates x by its positions.
/// @param x         [B, L, H, d] (d even).
/// @param positions [B, L] or [L] integer positions.
/// @param theta     RoPE base, default 10000.
/// @return [B, L, H, d] in x's dtype.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, double theta = 10000.0);

/// The angles apply_rope rotates with, to compute once and rotate several tensors (q and k).
/// @param positions [B, L] or [L] integer positions (any device; the angles are made there).
/// @return (cos, sin), each [B|1, L, head_dim] in `dtype`, computed in float32 (float64 for float64).
std::tuple<at::Tensor, at::Tensor> rope_angles(const at::Tensor& positions, int64_t head_dim, double theta,
                                               c10::ScalarType dtype);

/// Rotates x by angles the caller computed (a model whose RoPE variant, scaled or YaRN, makes its own
/// cos / sin; Hugging Face passes them as position_embeddings). Same convention as apply_rope.
/// @param x        [B, L, H, d] (d even).
/// @param cos, sin [B, L, d] or [1, L, d] (the same for every head), on x's device; cast to x's dtype.
/// @return [B, L, H, d] in x's dtype.
at::Tensor apply_rope_cos_sin(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

/// apply_rope_cos_sin without the checks: the fused mixsga::ops::rope_rotate on CPU, the composite
/// rotate_half_reference elsewhere (or when the angles require grad).
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

/// x * cos + rotate_half(x) * sin in plain ATen ops: what the fused mixsga::ops::rope_rotate computes
/// (apply_rope uses it off CPU; tests use it as the reference).
/// @param x        [B, L, H, d] (d even).
/// @param cos, sin broadcastable to x, e.g. [B|1, L, 1, d], in x's dtype.
at::Tensor rotate_half_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace mixsga::nn
