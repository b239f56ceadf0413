#pragma once
// rope_rotate on the GPU: the rotate_half RoPE in one pass over x (and its transpose, the backward).
// Torch-free; the element type is the template argument (float, double, __nv_bfloat16, __half),
// arithmetic in float (double for double), as the CPU kernel.
#include <cuda_runtime_api.h>

#include <cstdint>

namespace mixsga::kernels {

/// y[b, l, h, :] = x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1], or with
/// transpose the transposed map g * cos + rotate_half^T(g * sin), rotate_half^T(u) = [u2, -u1].
struct RopeRotateParams {
  const void* x;      ///< [batch, seq, heads, head_dim], head dim contiguous, other dims strided
  const void* cos;    ///< [batch or 1, seq, head_dim], contiguous
  const void* sin;    ///< same layout as cos
  void* out;          ///< [batch, seq, heads, head_dim], contiguous
  int64_t batch, seq, heads, head_dim;  ///< head_dim even
  int64_t x_stride_b, x_stride_l, x_stride_h;  ///< in elements
  int64_t angle_stride_b;  ///< seq * head_dim, or 0 when one set of angles serves every sequence
  bool transpose;
};

template <typename T>
void launch_rope_rotate(const RopeRotateParams& params, cudaStream_t stream);

}  // namespace mixsga::kernels
