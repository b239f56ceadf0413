#pragma once
/// Rotary position embedding, Llama convention of Hugging Face transformers: `rotate_half` over the
/// two halves of the head dim, inv_freq = theta^(-2i/d). Angles are computed in float32 (float64 when
/// x is float64) and the result is cast back to x's dtype, as transformers does.

#include <ATen/Tensor.h>

namespace mixsga::nn {

/// Rotates x by its positions.
/// @param x         [B, L, H, d] (d even).
/// @param positions [B, L] or [L] integer positions.
/// @param theta     RoPE base, default 10000.
/// @return [B, L, H, d] in x's dtype.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, double theta = 10000.0);

}  // namespace mixsga::nn
