#pragma once
// Kernel of routing.h. One block per sequence. For each expert in turn, a radix select over
// order-preserving integer keys of the scores finds the k-th best key K* among the free tokens; the
// expert then takes every free token above K* and, in position order, the first tokens equal to K*
// until it has k. That is exactly "sort by (score desc, position asc), take the first k", without
// sorting, and it reads each sequence's scores a few times from L2 instead of holding them in
// shared memory, so any sequence length fits.
#include "common.cuh"
#include "routing.h"

namespace mixsga::kernels {
namespace routing_detail {

inline constexpr int kThreads = 512;
inline constexpr int kWarps = kThreads / 32;

template <typename T>
struct KeyOf {
  using type = uint32_t;  // float, bf16 and half scores compare as float, exactly
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

// Unsigned keys that order like the numbers. -0 and +0 share the key of +0 (they tie on the CPU
// too), and NaN gets 0, below every number (-inf included), so NaN never takes capacity from a number.
__device__ __forceinline__ uint32_t order_key(float f) {
  if (isnan(f)) return 0u;
  const uint32_t u = f == 0.0f ? 0u : __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t order_key(double f) {
  if (isnan(f)) return 0ull;
  const uint64_t u = f == 0.0 ? 0ull : static_cast<uint64_t>(__double_as_longlong(f));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// detail::expert_capacity with the rounding spelled out: the _rn intrinsics keep nvcc from fusing the
// multiply and the subtraction into one FMA, which could round differently from the host.
__device__ __forceinline__ int64_t expert_capacity(double ratio, int64_t n) {
  const double want = __dmul_rn(ratio, static_cast<double>(n));
  const auto k = static_cast<int64_t>(ceil(__dsub_rn(want, 1e-6)));
  return k < 0 ? 0 : (k > n ? n : k);
}

__device__ __forceinline__ int64_t block_sum(int64_t v, int64_t* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  int64_t total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) route_expert_choice_kernel(const __grid_constant__ RouteExpertChoiceParams p) {
  using Key = typename KeyOf<T>::type;
  constexpr int kBits = static_cast<int>(sizeof(Key)) * 8;
  __shared__ unsigned int hist[256];
  __shared__ int64_t scratch[kWarps];
  __shared__ int warp_ties[kWarps];
  __shared__ int s_digit;
  __shared__ int64_t s_rank;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t L = p.length;
  const int E = p.num_experts, last = E - 1;
  const T* scores = static_cast<const T*>(p.scores) + blockIdx.x * L * E;
  const uint8_t* valid = p.valid == nullptr ? nullptr : p.valid + blockIdx.x * L;
  int64_t* out = p.out + blockIdx.x * L;

  int64_t local_valid = 0;
  for (int64_t t = tid; t < L; t += kThreads) {
    out[t] = last;  // padding, and every token no finer expert takes
    local_valid += (valid == nullptr || valid[t] != 0) ? 1 : 0;
  }
  const int64_t n = block_sum(local_valid, scratch);  // its barriers also publish the writes above
  // A token is free while no finer expert took it; each thread only ever rewrites its own positions
  // within a pass, and passes are separated by barriers.
  auto is_free = [&](int64_t t) { return (valid == nullptr || valid[t] != 0) && out[t] == last; };

  int64_t remaining = n;
  for (int e = 0; e < last && remaining > 0; ++e) {
    const int64_t k = min(expert_capacity(p.ratios[e], n), remaining);
    if (k == 0) continue;
    const T* column = scores + e;
    if (k == remaining) {  // this expert takes every free token: nothing to select
      for (int64_t t = tid; t < L; t += kThreads) {
        if (is_free(t)) out[t] = e;
      }
      break;
    }

    // Radix select, 8 bits a pass from the top: after the last pass `prefix` is K*, and `rank` says how
    // many of the free tokens whose key equals K* the expert still takes.
    Key prefix = 0, mask = 0;
    int64_t rank = k;
    for (int shift = kBits - 8; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
      __syncthreads();
      for (int64_t t = tid; t < L; t += kThreads) {
        if (!is_free(t)) continue;
        const Key key = order_key(widen(column[t * E]));
        if ((key & mask) == prefix) atomicAdd(&hist[static_cast<int>((key >> shift) & 0xff)], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int64_t above = 0;
        int digit = 255;
        for (; digit > 0; --digit) {
          if (above + hist[digit] >= rank) break;
          above += hist[digit];
        }
        s_digit = digit;
        s_rank = rank - above;
      }
      __syncthreads();
      prefix |= static_cast<Key>(s_digit) << shift;
      mask |= static_cast<Key>(0xff) << shift;
      rank = s_rank;
      __syncthreads();  // everyone has read s_digit / s_rank before the next pass rewrites them
    }

    // Take the tokens above K*, and the first `rank` ties in position order (a block-wide running
    // count over tiles of kThreads consecutive positions).
    int64_t ties_before = 0;
    for (int64_t tile = 0; tile < L; tile += kThreads) {
      const int64_t t = tile + tid;
      bool above = false, tie = false;
      if (t < L && is_free(t)) {
        const Key key = order_key(widen(column[t * E]));
        above = key > prefix;
        tie = key == prefix;
      }
      const unsigned int ballot = __ballot_sync(0xffffffffu, tie);
      if (lane == 0) warp_ties[warp] = __popc(ballot);
      __syncthreads();
      int64_t before_me = ties_before, in_tile = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        if (w < warp) before_me += warp_ties[w];
        in_tile += warp_ties[w];
      }
      before_me += __popc(ballot & ((1u << lane) - 1u));
      if (above || (tie && before_me < rank)) out[t] = e;
      ties_before += in_tile;
      __syncthreads();  // warp_ties is rewritten by the next tile
    }
    remaining -= k;
  }
}

}  // namespace routing_detail

template <typename T>
void launch_route_expert_choice(const RouteExpertChoiceParams& params, cudaStream_t stream) {
  routing_detail::route_expert_choice_kernel<T>
      <<<static_cast<unsigned int>(params.batch), routing_detail::kThreads, 0, stream>>>(params);
}

}  // namespace mixsga::kernels
