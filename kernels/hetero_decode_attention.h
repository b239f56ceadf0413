#pragma once
// Decode attention over the heterogeneous (per-expert compact) KV cache, flash-decoding style.
// Torch-free; the element type is the template argument (float, double, __nv_bfloat16, __half).
//
// Work split: every (sequence b, pool e, compact head c, chunk of `chunk` cached tokens, tile of up to
// kDecodeQueryTile query heads reading c) is one thread block. All query heads that read compact head
// c of pool e (g_e * Hq/Hkv of them) are consecutive, so one block serves up to 16 of them from a
// single pass over the chunk's keys and values: each cached byte is read once per 16 query heads.
// A block writes its chunk's partial softmax (max, sum, weighted V) in float32 (float64 for double
// inputs); a second kernel merges the partials of each (b, query head) by log-sum-exp.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernel_types.h"

namespace mixsga::kernels {

/// Query heads one block serves (the row tile of the tensor-core kernel).
inline constexpr int kDecodeQueryTile = 16;
/// Largest head dim the CUDA decode kernels take.
inline constexpr int kDecodeMaxHeadDim = 256;

/// One expert's compact pools: keys/values [B, compact_heads, capacity, head_dim], head dim contiguous.
struct DecodePool {
  const void* keys;
  const void* values;
  int64_t k_stride_b, k_stride_h, k_stride_t;  ///< in elements
  int64_t v_stride_b, v_stride_h, v_stride_t;
  int64_t compact_heads;  ///< Hkv / g_e
  int64_t capacity;       ///< T_e: lengths[:, e] <= capacity
  // Filled by plan_hetero_decode:
  int64_t num_chunks;     ///< ceil(capacity / chunk)
  int64_t query_tiles;    ///< ceil(query heads per compact head / kDecodeQueryTile)
  int64_t first_item;     ///< first block index (grid x) of this pool
  int64_t first_slot;     ///< first partial slot of this pool
};

struct HeteroDecodeParams {
  const void* q;           ///< [batch, query_heads, head_dim], contiguous
  void* out;               ///< [batch, query_heads, head_dim], contiguous
  const int64_t* lengths;  ///< [batch, num_pools], contiguous, device memory
  void* partial_acc;       ///< [batch, query_heads, slots, head_dim], accumulation type
  void* partial_max;       ///< [batch, query_heads, slots]: max of the chunk's scores, log2 domain
  void* partial_sum;       ///< [batch, query_heads, slots]: sum of 2^(score - max)
  DecodePool pools[kMaxExperts];
  int64_t batch, query_heads, head_dim, num_kv_heads;
  int num_pools;
  double scale;            ///< softmax scale (applied to q.k)
  // Filled by plan_hetero_decode:
  int64_t chunk;           ///< cached tokens per block
  int64_t slots;           ///< partial slots per (b, query head): sum of num_chunks
  int64_t items;           ///< grid x: sum over pools of compact_heads * num_chunks * query_tiles
  bool tensor_cores;       ///< which split kernel runs
};

/// Whether the tensor-core split kernel can take these pools: a 16-bit dtype on sm_80 or newer,
/// head dim 64, 128 or 256, and 16-byte aligned rows (base pointers and strides).
inline bool decode_tensor_cores_apply(const HeteroDecodeParams& p, ScalarKind kind, int sm_major) {
  if (kind != ScalarKind::kBFloat16 && kind != ScalarKind::kFloat16) return false;
  if (sm_major < 8) return false;
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return false;
  constexpr int64_t kElemsPer16Bytes = 8;
  for (int e = 0; e < p.num_pools; ++e) {
    const DecodePool& pool = p.pools[e];
    if (pool.capacity == 0) continue;
    const bool aligned = reinterpret_cast<uintptr_t>(pool.keys) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(pool.values) % 16 == 0 &&
                         pool.k_stride_b % kElemsPer16Bytes == 0 && pool.k_stride_h % kElemsPer16Bytes == 0 &&
                         pool.k_stride_t % kElemsPer16Bytes == 0 && pool.v_stride_b % kElemsPer16Bytes == 0 &&
                         pool.v_stride_h % kElemsPer16Bytes == 0 && pool.v_stride_t % kElemsPer16Bytes == 0;
    if (!aligned) return false;
  }
  return true;
}

/// Largest chunk the generic (CUDA-core) split kernel takes: its queries and scores live in
/// 48 KB of shared memory.
inline int64_t decode_generic_max_chunk(int64_t head_dim, size_t acc_bytes) {
  const int64_t budget = 48 * 1024 / static_cast<int64_t>(acc_bytes) / kDecodeQueryTile - head_dim;
  int64_t chunk = 256;
  while (chunk > 32 && chunk > budget) chunk /= 2;
  return chunk;
}

/// Shared memory of the generic split kernel, in bytes.
inline size_t decode_generic_smem_bytes(int64_t head_dim, int64_t chunk, size_t acc_bytes) {
  return static_cast<size_t>(kDecodeQueryTile * (head_dim + chunk)) * acc_bytes;
}

/// Picks the chunk (tokens per block) and lays out blocks and partial slots. Chunks are as long as
/// possible while the grid still has about four blocks per SM, because every chunk costs a partial
/// (max, sum, head_dim accumulators) per query head written and read back by the merge.
/// Call after filling the pools, batch, query_heads, num_kv_heads, head_dim and tensor_cores.
inline void plan_hetero_decode(HeteroDecodeParams& p, int num_sms, size_t acc_bytes) {
  const int64_t rep = p.query_heads / p.num_kv_heads;
  const int64_t max_chunk = p.tensor_cores ? 256 : decode_generic_max_chunk(p.head_dim, acc_bytes);
  const int64_t min_chunk = std::min<int64_t>(64, max_chunk);
  auto items_for = [&](int64_t chunk) {
    int64_t items = 0;
    for (int e = 0; e < p.num_pools; ++e) {
      const DecodePool& pool = p.pools[e];
      const int64_t per_head = (p.num_kv_heads / pool.compact_heads) * rep;
      items += pool.compact_heads * ((pool.capacity + chunk - 1) / chunk) *
               ((per_head + kDecodeQueryTile - 1) / kDecodeQueryTile);
    }
    return items;
  };
  const int64_t target_blocks = 4 * static_cast<int64_t>(std::max(num_sms, 1));
  int64_t chunk = max_chunk;
  while (chunk > min_chunk && items_for(chunk) * p.batch < target_blocks) chunk /= 2;
  p.chunk = chunk;
  int64_t item = 0, slot = 0;
  for (int e = 0; e < p.num_pools; ++e) {
    DecodePool& pool = p.pools[e];
    const int64_t per_head = (p.num_kv_heads / pool.compact_heads) * rep;
    pool.num_chunks = (pool.capacity + chunk - 1) / chunk;
    pool.query_tiles = (per_head + kDecodeQueryTile - 1) / kDecodeQueryTile;
    pool.first_item = item;
    pool.first_slot = slot;
    item += pool.compact_heads * pool.num_chunks * pool.query_tiles;
    slot += pool.num_chunks;
  }
  p.items = item;
  p.slots = slot;
}

/// Runs the split kernel (tensor-core or generic, per params.tensor_cores) and the merge.
/// The caller sizes the partial buffers from the plan (slots) and guarantees lengths <= capacity.
template <typename T>
void launch_hetero_decode_attention(const HeteroDecodeParams& params, cudaStream_t stream);

}  // namespace mixsga::kernels
