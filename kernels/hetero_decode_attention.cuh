#pragma once
// Kernels of hetero_decode_attention.h.
//
// Each split block handles one chunk of one compact head for up to 16 query heads, with an exact
// softmax over the chunk: it first scores every cached token of the chunk against the queries
// (S = Q K^T, kept in shared memory), then takes the chunk's max and sum, then accumulates
// P V. So no running rescale is needed inside a block; the merge kernel combines the chunks.
//
//  * Tensor-core kernel (bf16/fp16, head dim 64/128/256, 16-byte aligned rows): the chunk's keys and
//    values stream through shared memory in tiles (16-byte loads; the next tile's loads are issued
//    before the current tile is multiplied, so they are in flight during the math), and both
//    products run on WMMA 16x16x16 tiles with float accumulators. The query tile is the 16-row M
//    dimension, padded with zero rows when fewer query heads read the compact head.
//  * Generic kernel (every dtype, any head dim <= 256, any alignment): CUDA cores, one warp per
//    cached token for the scores and one thread per head-dim element for P V.
#include <mma.h>

#include <type_traits>

#include "common.cuh"
#include "hetero_decode_attention.h"
#include "static_switch.h"

namespace mixsga::kernels {
namespace decode_detail {

inline constexpr int kThreads = 128;
inline constexpr int kWarps = kThreads / 32;
inline constexpr double kLog2e = 1.4426950408889634;

// Where a block's work lies; false when its chunk starts past the sequence's length in that pool.
struct DecodeWork {
  int pool;
  int64_t head;         // compact head of the pool
  int64_t first_query;  // first query head served
  int nq;               // query heads served (<= kDecodeQueryTile)
  int64_t t0;           // first cached token of the chunk
  int n;                // cached tokens of the chunk (<= chunk)
  int64_t slot;         // partial slot of the chunk
};

// Cached tokens of sequence b in pool e. The host reads lengths only when they live on the CPU (no
// device sync on the decode path), so device lengths arrive unchecked: clamping to [0, capacity]
// keeps a bad value from reading out of bounds.
__device__ __forceinline__ int64_t pool_length(const HeteroDecodeParams& p, int64_t b, int e) {
  const int64_t length = p.lengths[b * p.num_pools + e];
  return length < 0 ? 0 : min(length, p.pools[e].capacity);
}

__device__ __forceinline__ bool locate_work(const HeteroDecodeParams& p, int64_t item, int64_t b, DecodeWork& w) {
  int e = 0;
  while (e + 1 < p.num_pools && item >= p.pools[e + 1].first_item) ++e;
  const DecodePool& pool = p.pools[e];
  int64_t local = item - pool.first_item;
  const int64_t tile = local % pool.query_tiles;
  local /= pool.query_tiles;
  const int64_t chunk_index = local % pool.num_chunks;
  const int64_t length = pool_length(p, b, e);
  const int64_t t0 = chunk_index * p.chunk;
  if (t0 >= length) return false;
  const int64_t per_head = (p.num_kv_heads / pool.compact_heads) * (p.query_heads / p.num_kv_heads);
  w.pool = e;
  w.head = local / pool.num_chunks;
  w.first_query = w.head * per_head + tile * kDecodeQueryTile;
  w.nq = static_cast<int>(min(static_cast<int64_t>(kDecodeQueryTile), per_head - tile * kDecodeQueryTile));
  w.t0 = t0;
  w.n = static_cast<int>(min(p.chunk, length - t0));
  w.slot = pool.first_slot + chunk_index;
  return true;
}

__device__ __forceinline__ int64_t partial_index(const HeteroDecodeParams& p, int64_t b, int64_t query, int64_t slot) {
  return (b * p.query_heads + query) * p.slots + slot;
}

// ---- tensor-core split kernel ------------------------------------------------------------------

template <int kHeadDim>
struct TensorCoreTraits {
  static constexpr int kMaxChunk = 256;
  static constexpr int kTile = kHeadDim >= 256 ? 32 : 64;  // cached tokens staged at once (16 KB)
  // Row pitches padded by 16 bytes so that the 16 rows a WMMA load touches fall in different banks;
  // they stay multiples of 16 bytes, as WMMA requires.
  static constexpr int kLdKV = kHeadDim + 8;
  static constexpr int kLdQ = kHeadDim + 8;
  static constexpr int kLdP = kMaxChunk + 8;
  static constexpr int kLdS = kMaxChunk + 4;
  static constexpr int kLdO = kHeadDim + 4;
  static constexpr int kPacksPerRow = kHeadDim / 8;  // 16-byte packs of 8 elements
  static constexpr int kLoadsPerThread = kTile * kPacksPerRow / kThreads;
  static constexpr int kColTilesPerWarp = kHeadDim / 16 / kWarps;
  static constexpr int kStageBytes = kTile * kLdKV * 2;
  static constexpr int kScoreBytes = kDecodeQueryTile * (kLdS > kLdO ? kLdS : kLdO) * 4;  // S, later O
  static constexpr int kQPBytes = kDecodeQueryTile * (kLdQ > kLdP ? kLdQ : kLdP) * 2;     // Q, later P
  static constexpr int kSmemBytes = kStageBytes + kScoreBytes + kQPBytes;
  static_assert(kTile * kPacksPerRow % kThreads == 0, "a tile must split evenly over the threads");
  static_assert(kHeadDim % (16 * kWarps) == 0, "every warp owns whole 16-column tiles of the output");
  static_assert(kMaxChunk % kTile == 0, "chunks are whole tiles");
  static_assert(kStageBytes % 128 == 0 && kScoreBytes % 128 == 0, "shared buffers stay 128-byte aligned");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
};

// Issues the 16-byte loads of one tile of `rows` valid cached rows (zeros past them, so that the
// products never see stale or uninitialised data).
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_tile(uint4 (&regs)[TensorCoreTraits<kHeadDim>::kLoadsPerThread], const T* base,
                                          int64_t stride_t, int rows) {
  using Tr = TensorCoreTraits<kHeadDim>;
#pragma unroll
  for (int r = 0; r < Tr::kLoadsPerThread; ++r) {
    const int idx = r * kThreads + static_cast<int>(threadIdx.x);
    const int row = idx / Tr::kPacksPerRow, pack = idx % Tr::kPacksPerRow;
    regs[r] = row < rows ? *reinterpret_cast<const uint4*>(base + row * stride_t + pack * 8) : make_uint4(0, 0, 0, 0);
  }
}

template <typename T, int kHeadDim>
__device__ __forceinline__ void store_tile(const uint4 (&regs)[TensorCoreTraits<kHeadDim>::kLoadsPerThread], T* stage) {
  using Tr = TensorCoreTraits<kHeadDim>;
#pragma unroll
  for (int r = 0; r < Tr::kLoadsPerThread; ++r) {
    const int idx = r * kThreads + static_cast<int>(threadIdx.x);
    const int row = idx / Tr::kPacksPerRow, pack = idx % Tr::kPacksPerRow;
    *reinterpret_cast<uint4*>(stage + row * Tr::kLdKV + pack * 8) = regs[r];
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    decode_split_tensor_core_kernel(const __grid_constant__ HeteroDecodeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using Tr = TensorCoreTraits<kHeadDim>;
  __shared__ __align__(128) unsigned char smem[Tr::kSmemBytes];
  T* stage = reinterpret_cast<T*>(smem);
  float* scores = reinterpret_cast<float*>(smem + Tr::kStageBytes);
  T* qp = reinterpret_cast<T*>(smem + Tr::kStageBytes + Tr::kScoreBytes);

  const int64_t b = blockIdx.y;
  DecodeWork w;
  if (!locate_work(p, blockIdx.x, b, w)) return;
  const DecodePool& pool = p.pools[w.pool];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int ntiles = (w.n + Tr::kTile - 1) / Tr::kTile;
  const T zero = narrow_to<T>(0.0f);

  const T* q = static_cast<const T*>(p.q) + (b * p.query_heads + w.first_query) * kHeadDim;
  for (int i = tid; i < kDecodeQueryTile * kHeadDim; i += kThreads) {
    const int j = i / kHeadDim, x = i % kHeadDim;
    qp[j * Tr::kLdQ + x] = j < w.nq ? q[j * kHeadDim + x] : zero;
  }
  const T* keys = static_cast<const T*>(pool.keys) + b * pool.k_stride_b + w.head * pool.k_stride_h + w.t0 * pool.k_stride_t;
  const T* values =
      static_cast<const T*>(pool.values) + b * pool.v_stride_b + w.head * pool.v_stride_h + w.t0 * pool.v_stride_t;

  // S = Q K^T, tile by tile.
  uint4 regs[Tr::kLoadsPerThread];
  load_tile<T, kHeadDim>(regs, keys, pool.k_stride_t, w.n);
  for (int tile = 0; tile < ntiles; ++tile) {
    __syncthreads();  // the previous tile's readers are done (and, the first time, Q is written)
    store_tile<T, kHeadDim>(regs, stage);
    __syncthreads();
    if (tile + 1 < ntiles) {
      load_tile<T, kHeadDim>(regs, keys + (tile + 1) * Tr::kTile * pool.k_stride_t, pool.k_stride_t,
                             w.n - (tile + 1) * Tr::kTile);
    }
    for (int nt = warp; nt < Tr::kTile / 16; nt += kWarps) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
      wmma::fill_fragment(s, 0.0f);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kt;  // K^T: token n, dim k at [n * ld + k]
        wmma::load_matrix_sync(a, qp + kk * 16, Tr::kLdQ);
        wmma::load_matrix_sync(kt, stage + nt * 16 * Tr::kLdKV + kk * 16, Tr::kLdKV);
        wmma::mma_sync(s, a, kt, s);
      }
      wmma::store_matrix_sync(scores + tile * Tr::kTile + nt * 16, s, Tr::kLdS, wmma::mem_row_major);
    }
  }
  // The first value tile loads while the softmax runs.
  load_tile<T, kHeadDim>(regs, values, pool.v_stride_t, w.n);
  __syncthreads();  // S complete; Q no longer read, so P may overwrite it

  // Exact softmax over the chunk, one warp per query row; P = 2^(s*scale*log2e - max) in T.
  const float scale_log2 = static_cast<float>(p.scale * kLog2e);
  const int padded = ntiles * Tr::kTile;
  for (int j = warp; j < kDecodeQueryTile; j += kWarps) {
    T* prow = qp + j * Tr::kLdP;
    if (j >= w.nq) {
      for (int t = lane; t < padded; t += 32) prow[t] = zero;
      continue;
    }
    const float* srow = scores + j * Tr::kLdS;
    float m = -INFINITY;
    for (int t = lane; t < w.n; t += 32) m = fmaxf(m, srow[t] * scale_log2);
    m = warp_max(m);
    // A chunk whose every score is -inf holds no probability mass: weights 0 (not 2^(-inf - -inf) =
    // NaN), and the merge skips it, as the CPU kernel does.
    const bool empty = m == -INFINITY;
    float l = 0.0f;
    for (int t = lane; t < padded; t += 32) {
      float e = 0.0f;
      if (t < w.n && !empty) {
        e = exp2f(srow[t] * scale_log2 - m);
        l += e;
      }
      prow[t] = narrow_to<T>(e);
    }
    l = warp_sum(l);
    if (lane == 0) {
      const int64_t at = partial_index(p, b, w.first_query + j, w.slot);
      static_cast<float*>(p.partial_max)[at] = m;
      static_cast<float*>(p.partial_sum)[at] = l;
    }
  }

  // O = P V, tile by tile; warp w owns output columns [w * kColTilesPerWarp * 16, ...).
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[Tr::kColTilesPerWarp];
#pragma unroll
  for (int ct = 0; ct < Tr::kColTilesPerWarp; ++ct) wmma::fill_fragment(o[ct], 0.0f);
  for (int tile = 0; tile < ntiles; ++tile) {
    __syncthreads();  // P is written (first time) / the previous tile's readers are done
    store_tile<T, kHeadDim>(regs, stage);
    __syncthreads();
    if (tile + 1 < ntiles) {
      load_tile<T, kHeadDim>(regs, values + (tile + 1) * Tr::kTile * pool.v_stride_t, pool.v_stride_t,
                             w.n - (tile + 1) * Tr::kTile);
    }
#pragma unroll
    for (int kk = 0; kk < Tr::kTile / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, qp + tile * Tr::kTile + kk * 16, Tr::kLdP);
#pragma unroll
      for (int ct = 0; ct < Tr::kColTilesPerWarp; ++ct) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v;
        wmma::load_matrix_sync(v, stage + kk * 16 * Tr::kLdKV + (warp * Tr::kColTilesPerWarp + ct) * 16, Tr::kLdKV);
        wmma::mma_sync(o[ct], a, v, o[ct]);
      }
    }
  }
  // O goes through shared memory (over S, which the softmax has consumed) to the partials.
#pragma unroll
  for (int ct = 0; ct < Tr::kColTilesPerWarp; ++ct) {
    wmma::store_matrix_sync(scores + (warp * Tr::kColTilesPerWarp + ct) * 16, o[ct], Tr::kLdO, wmma::mem_row_major);
  }
  __syncthreads();
  float* acc = static_cast<float*>(p.partial_acc);
  for (int i = tid; i < w.nq * kHeadDim; i += kThreads) {
    const int j = i / kHeadDim, x = i % kHeadDim;
    acc[partial_index(p, b, w.first_query + j, w.slot) * kHeadDim + x] = scores[j * Tr::kLdO + x];
  }
#else
  __trap();  // the host picks this kernel only on sm_80 or newer
#endif
}

// ---- generic split kernel ------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) decode_split_generic_kernel(const __grid_constant__ HeteroDecodeParams p) {
  using A = acc_type<T>;
  extern __shared__ __align__(16) unsigned char generic_smem[];
  const int d = static_cast<int>(p.head_dim), chunk = static_cast<int>(p.chunk);
  A* qs = reinterpret_cast<A*>(generic_smem);  // [16, d]
  A* s = qs + kDecodeQueryTile * d;              // [16, chunk]: scores, then probabilities

  const int64_t b = blockIdx.y;
  DecodeWork w;
  if (!locate_work(p, blockIdx.x, b, w)) return;
  const DecodePool& pool = p.pools[w.pool];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  const T* q = static_cast<const T*>(p.q) + (b * p.query_heads + w.first_query) * d;
  for (int i = tid; i < kDecodeQueryTile * d; i += kThreads) {
    const int j = i / d;
    qs[i] = j < w.nq ? widen(q[i]) : A(0);
  }
  __syncthreads();

  const T* keys = static_cast<const T*>(pool.keys) + b * pool.k_stride_b + w.head * pool.k_stride_h + w.t0 * pool.k_stride_t;
  for (int t = warp; t < w.n; t += kWarps) {
    const T* k = keys + t * pool.k_stride_t;
    A part[kDecodeQueryTile];
#pragma unroll
    for (int j = 0; j < kDecodeQueryTile; ++j) part[j] = A(0);
    for (int x = lane; x < d; x += 32) {
      const A kx = widen(k[x]);
#pragma unroll
      for (int j = 0; j < kDecodeQueryTile; ++j) part[j] += qs[j * d + x] * kx;
    }
#pragma unroll
    for (int j = 0; j < kDecodeQueryTile; ++j) {
      if (j < w.nq) {  // uniform across the warp
        const A total = warp_sum(part[j]);
        if (lane == 0) s[j * chunk + t] = total;
      }
    }
  }
  __syncthreads();

  const A scale_log2 = static_cast<A>(p.scale * kLog2e);
  for (int j = warp; j < w.nq; j += kWarps) {
    A* row = s + j * chunk;
    A m = -INFINITY;
    for (int t = lane; t < w.n; t += 32) m = max(m, row[t] * scale_log2);
    m = warp_max(m);
    const bool empty = m == A(-INFINITY);  // every score -inf: weights 0, see the tensor-core kernel
    A l = 0;
    for (int t = lane; t < w.n; t += 32) {
      const A e = empty ? A(0) : exp2_acc(row[t] * scale_log2 - m);
      row[t] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      const int64_t at = partial_index(p, b, w.first_query + j, w.slot);
      static_cast<A*>(p.partial_max)[at] = m;
      static_cast<A*>(p.partial_sum)[at] = l;
    }
  }
  __syncthreads();

  const T* values =
      static_cast<const T*>(pool.values) + b * pool.v_stride_b + w.head * pool.v_stride_h + w.t0 * pool.v_stride_t;
  A* acc_out = static_cast<A*>(p.partial_acc);
  for (int x = tid; x < d; x += kThreads) {
    A acc[kDecodeQueryTile];
#pragma unroll
    for (int j = 0; j < kDecodeQueryTile; ++j) acc[j] = A(0);
    for (int t = 0; t < w.n; ++t) {
      const A vx = widen(values[t * pool.v_stride_t + x]);
#pragma unroll
      for (int j = 0; j < kDecodeQueryTile; ++j) {
        if (j < w.nq) acc[j] += s[j * chunk + t] * vx;
      }
    }
#pragma unroll
    for (int j = 0; j < kDecodeQueryTile; ++j) {
      if (j < w.nq) acc_out[partial_index(p, b, w.first_query + j, w.slot) * d + x] = acc[j];
    }
  }
}

// ---- merge -------------------------------------------------------------------------------------

// One block per (b, query head): log-sum-exp over the chunks that hold a partial (the first
// ceil(length / chunk) slots of every pool). No cached token at all gives zeros. A chunk of weight
// 0 (every score -inf, or so far below the max that 2^(max_c - max) underflows) is skipped rather
// than multiplied in: 0 * its sum or accumulators could be 0 * inf = NaN. The CPU merge skips the
// same chunks, so both give the same (finite) answer.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_merge_kernel(const __grid_constant__ HeteroDecodeParams p) {
  using A = acc_type<T>;
  const int64_t bh = blockIdx.x, b = bh / p.query_heads;
  const A* pmax = static_cast<const A*>(p.partial_max) + bh * p.slots;
  const A* psum = static_cast<const A*>(p.partial_sum) + bh * p.slots;
  const A* pacc = static_cast<const A*>(p.partial_acc) + bh * p.slots * p.head_dim;
  auto used_chunks = [&](int e) { return (pool_length(p, b, e) + p.chunk - 1) / p.chunk; };

  A m = -INFINITY;
  for (int e = 0; e < p.num_pools; ++e) {
    const int64_t first = p.pools[e].first_slot, used = used_chunks(e);
    for (int64_t c = 0; c < used; ++c) m = max(m, pmax[first + c]);
  }
  const bool any = m != A(-INFINITY);
  A denom = 0;
  if (any) {
    for (int e = 0; e < p.num_pools; ++e) {
      const int64_t first = p.pools[e].first_slot, used = used_chunks(e);
      for (int64_t c = 0; c < used; ++c) {
        const A w = exp2_acc(pmax[first + c] - m);
        if (w != A(0)) denom += w * psum[first + c];
      }
    }
  }
  const A inv = denom > A(0) ? A(1) / denom : A(0);
  T* out = static_cast<T*>(p.out) + bh * p.head_dim;
  for (int64_t x = threadIdx.x; x < p.head_dim; x += kThreads) {
    A acc = 0;
    if (any) {
      for (int e = 0; e < p.num_pools; ++e) {
        const int64_t first = p.pools[e].first_slot, used = used_chunks(e);
        for (int64_t c = 0; c < used; ++c) {
          const A w = exp2_acc(pmax[first + c] - m);
          if (w != A(0)) acc += w * pacc[(first + c) * p.head_dim + x];
        }
      }
    }
    out[x] = narrow_to<T>(acc * inv);
  }
}

}  // namespace decode_detail

template <typename T>
void launch_hetero_decode_attention(const HeteroDecodeParams& params, cudaStream_t stream) {
  using namespace decode_detail;
  if (params.items > 0 && params.batch > 0) {
    const dim3 grid(static_cast<unsigned int>(params.items), static_cast<unsigned int>(params.batch));
    auto generic = [&] {
      const size_t smem = decode_generic_smem_bytes(params.head_dim, params.chunk, sizeof(acc_type<T>));
      decode_split_generic_kernel<T><<<grid, kThreads, smem, stream>>>(params);
    };
    if constexpr (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) {
      if (params.tensor_cores) {
        HEAD_DIM_SWITCH(params.head_dim, kHeadDim,
                        [&] { decode_split_tensor_core_kernel<T, kHeadDim><<<grid, kThreads, 0, stream>>>(params); });
      } else {
        generic();
      }
    } else {
      generic();
    }
  }
  const auto rows = static_cast<unsigned int>(params.batch * params.query_heads);
  if (rows > 0) decode_merge_kernel<T><<<rows, kThreads, 0, stream>>>(params);
}

}  // namespace mixsga::kernels
