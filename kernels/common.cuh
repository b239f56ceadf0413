#pragma once
// Device helpers shared by the kernels: accumulation types, conversions that round like ATen
// (round-to-nearest-even), packed vector loads and warp reductions. No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mixsga::kernels {

/// Accumulation type of an element type: float for float and the 16-bit types, double for double
/// (the same rule as ATen's opmath_type, so CPU and CUDA round at the same points).
template <typename T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccumulateType<T>::type;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

/// Rounds an accumulator back to the element type (round-to-nearest-even, as c10's conversions).
template <typename T>
__device__ __forceinline__ T narrow_to(acc_type<T> v);
template <>
__device__ __forceinline__ float narrow_to<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double narrow_to<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow_to<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half narrow_to<__half>(float v) {
  return __float2half_rn(v);
}

__device__ __forceinline__ float exp2_acc(float v) { return exp2f(v); }
__device__ __forceinline__ double exp2_acc(double v) { return exp2(v); }

/// N consecutive elements moved as one aligned load/store (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

/// Number of blocks of `threads` threads that cover `work` items.
inline unsigned int blocks_for(int64_t work, int threads) {
  return static_cast<unsigned int>((work + threads - 1) / threads);
}

}  // namespace mixsga::kernels
