#pragma once
// Kernel of rope_rotate.h: one thread per (row, i < head_dim / 2) pair, so that consecutive threads
// read consecutive elements of a row (coalesced) and each thread owns the two outputs that read the
// same two inputs (x1 = x[i], x2 = x[i + half]); no element is read twice.
#include <algorithm>

#include "common.cuh"
#include "rope_rotate.h"

namespace mixsga::kernels {
namespace rope_detail {

inline constexpr int kThreads = 256;
// Grid-stride loop beyond this many blocks: enough to fill any GPU, and far below the grid limit.
inline constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// Products rounded on their own (never fused into an FMA with the following add), as the CPU kernel
// computes them: float32/float64 results then equal the CPU op's bit for bit.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename T>
__global__ void __launch_bounds__(kThreads) rope_rotate_kernel(const __grid_constant__ RopeRotateParams p) {
  using A = acc_type<T>;
  const int64_t half = p.head_dim / 2;
  const int64_t total = p.batch * p.seq * p.heads * half;
  const T* x = static_cast<const T*>(p.x);
  const T* cs = static_cast<const T*>(p.cos);
  const T* sn = static_cast<const T*>(p.sin);
  T* out = static_cast<T*>(p.out);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half, row = idx / half;  // row = (b * seq + l) * heads + h
    const int64_t h = row % p.heads, bl = row / p.heads;
    const int64_t l = bl % p.seq, b = bl / p.seq;
    const T* xr = x + b * p.x_stride_b + l * p.x_stride_l + h * p.x_stride_h;
    const int64_t angle = b * p.angle_stride_b + l * p.head_dim;
    const A x1 = widen(xr[i]), x2 = widen(xr[i + half]);
    const A c1 = widen(cs[angle + i]), c2 = widen(cs[angle + i + half]);
    const A s1 = widen(sn[angle + i]), s2 = widen(sn[angle + i + half]);
    T* o = out + row * p.head_dim;
    if (!p.transpose) {
      o[i] = narrow_to<T>(mul_rn(x1, c1) - mul_rn(x2, s1));
      o[i + half] = narrow_to<T>(mul_rn(x2, c2) + mul_rn(x1, s2));
    } else {
      o[i] = narrow_to<T>(mul_rn(x1, c1) + mul_rn(x2, s2));
      o[i + half] = narrow_to<T>(mul_rn(x2, c2) - mul_rn(x1, s1));
    }
  }
}

}  // namespace rope_detail

template <typename T>
void launch_rope_rotate(const RopeRotateParams& params, cudaStream_t stream) {
  using namespace rope_detail;
  const int64_t total = params.batch * params.seq * params.heads * (params.head_dim / 2);
  if (total == 0) return;
  const int64_t blocks = std::min<int64_t>(kMaxBlocks, (total + kThreads - 1) / kThreads);
  rope_rotate_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(params);
}

}  // namespace mixsga::kernels
