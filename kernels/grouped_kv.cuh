#pragma once
// Kernels of grouped_kv.h. Every kernel moves 16-byte packs when the row length and the pointers
// allow it (the common case: head_dim a multiple of 8 for 16-bit types), else single elements, and
// walks its work with a grid-stride loop so that any size fits one launch.
#include <algorithm>

#include "common.cuh"
#include "grouped_kv.h"
#include "static_switch.h"

namespace mixsga::kernels {
namespace grouped_kv_detail {

inline constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; the grid-stride loops do the rest.
inline constexpr int64_t kMaxBlocks = 65536;

inline unsigned int grid_for(int64_t work) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, blocks_for(work, kThreads))));
}

template <typename T>
bool packable(int64_t row, const void* a, const void* b) {
  constexpr int64_t kPack = 16 / sizeof(T);
  return row % kPack == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

// One thread per (token, pack of head_dim): it reads the pack of every head of its token once and
// writes the group means back to each head of the group, summing in the order the CPU kernel does.
template <typename T, int kPack>
__global__ void __launch_bounds__(kThreads) grouped_kv_pool_kernel(const __grid_constant__ GroupedKVPoolParams p) {
  using A = acc_type<T>;
  using P = Pack<T, kPack>;
  const int64_t packs = p.head_dim / kPack;
  const int64_t work = p.tokens * packs;
  const P* in = static_cast<const P*>(p.in);
  P* out = static_cast<P*>(p.out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < work;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / packs;
    const P* src = in + t * p.heads * packs + (i % packs);
    P* dst = out + t * p.heads * packs + (i % packs);
    const int64_t g = p.group_sizes[p.expert_idx[t]];
    if (g == 1) {
      for (int64_t h = 0; h < p.heads; ++h) dst[h * packs] = src[h * packs];
      continue;
    }
    const A inv_g = A(1) / static_cast<A>(g);
    for (int64_t c = 0; c < p.heads; c += g) {
      A acc[kPack];
      const P first = src[c * packs];
#pragma unroll
      for (int k = 0; k < kPack; ++k) acc[k] = widen(first.v[k]);
      for (int64_t h = 1; h < g; ++h) {
        const P x = src[(c + h) * packs];
#pragma unroll
        for (int k = 0; k < kPack; ++k) acc[k] += widen(x.v[k]);
      }
      P mean;
#pragma unroll
      for (int k = 0; k < kPack; ++k) mean.v[k] = narrow_to<T>(acc[k] * inv_g);
      for (int64_t h = 0; h < g; ++h) dst[(c + h) * packs] = mean;
    }
  }
}

// One thread per (output row, pack of the row).
template <typename T, int kPack>
__global__ void __launch_bounds__(kThreads) group_reduce_kernel(const __grid_constant__ GroupReduceParams p) {
  using A = acc_type<T>;
  using P = Pack<T, kPack>;
  const int64_t packs = p.row / kPack;
  const int64_t work = p.groups * packs;
  const A scale = static_cast<A>(p.scale);
  const P* in = static_cast<const P*>(p.in);
  P* out = static_cast<P*>(p.out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < work;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / packs, v = i % packs;
    const P* src = in + m * p.group_size * packs + v;
    A acc[kPack];
    const P first = src[0];
#pragma unroll
    for (int k = 0; k < kPack; ++k) acc[k] = widen(first.v[k]);
    for (int64_t j = 1; j < p.group_size; ++j) {
      const P x = src[j * packs];
#pragma unroll
      for (int k = 0; k < kPack; ++k) acc[k] += widen(x.v[k]);
    }
    P r;
#pragma unroll
    for (int k = 0; k < kPack; ++k) r.v[k] = narrow_to<T>(acc[k] * scale);
    out[i] = r;
  }
}

// One thread per output pack: consecutive threads write consecutive packs of a token's row.
template <typename T, int kPack>
__global__ void __launch_bounds__(kThreads) expand_rows_kernel(const __grid_constant__ ExpandRowsParams p) {
  using P = Pack<T, kPack>;
  const int64_t packs = p.head_dim / kPack;
  const int64_t compact = p.heads / p.group_size;
  const int64_t work = p.n * p.heads * packs;
  const P* in = static_cast<const P*>(p.in);
  P* out = static_cast<P*>(p.out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < work;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = i % packs;
    const int64_t h = (i / packs) % p.heads;
    const int64_t r = i / (packs * p.heads);
    const int64_t token = p.rows == nullptr ? r : p.rows[r];
    out[(token * p.heads + h) * packs + v] = in[(r * compact + h / p.group_size) * packs + v];
  }
}

}  // namespace grouped_kv_detail

template <typename T>
void launch_grouped_kv_pool(const GroupedKVPoolParams& params, cudaStream_t stream) {
  using namespace grouped_kv_detail;
  BOOL_SWITCH(packable<T>(params.head_dim, params.in, params.out), kPacked, [&] {
    constexpr int kPack = kPacked ? 16 / sizeof(T) : 1;
    grouped_kv_pool_kernel<T, kPack>
        <<<grid_for(params.tokens * (params.head_dim / kPack)), kThreads, 0, stream>>>(params);
  });
}

template <typename T>
void launch_group_reduce(const GroupReduceParams& params, cudaStream_t stream) {
  using namespace grouped_kv_detail;
  BOOL_SWITCH(packable<T>(params.row, params.in, params.out), kPacked, [&] {
    constexpr int kPack = kPacked ? 16 / sizeof(T) : 1;
    group_reduce_kernel<T, kPack><<<grid_for(params.groups * (params.row / kPack)), kThreads, 0, stream>>>(params);
  });
}

template <typename T>
void launch_expand_rows(const ExpandRowsParams& params, cudaStream_t stream) {
  using namespace grouped_kv_detail;
  BOOL_SWITCH(packable<T>(params.head_dim, params.in, params.out), kPacked, [&] {
    constexpr int kPack = kPacked ? 16 / sizeof(T) : 1;
    expand_rows_kernel<T, kPack>
        <<<grid_for(params.n * params.heads * (params.head_dim / kPack)), kThreads, 0, stream>>>(params);
  });
}

}  // namespace mixsga::kernels
