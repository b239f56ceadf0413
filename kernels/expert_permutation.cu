// Kernels of expert_permutation.h. They move indices and bytes only, so this one translation unit
// serves every dtype.
//
// The counting sort runs in three launches over tiles of kTile tokens: per-tile expert counts, one
// block that turns the counts into each tile's first output position per expert, and a scatter in
// which every tile ranks its tokens among equal experts in token order (warp match + prefix over the
// warps), which keeps the sort stable.
#include <algorithm>

#include "common.cuh"
#include "expert_permutation.h"

namespace mixsga::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRounds = 8;
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kRounds;

__global__ void __launch_bounds__(kThreads) count_experts_kernel(const ExpertPermutationParams p) {
  __shared__ int counts[kMaxPermutationExperts];
  const int E = p.num_experts;
  for (int e = threadIdx.x; e < E; e += kThreads) counts[e] = 0;
  __syncthreads();
  const int64_t start = blockIdx.x * kTile, end = std::min(start + kTile, p.n);
  for (int64_t t = start + threadIdx.x; t < end; t += kThreads) atomicAdd(&counts[p.expert_idx[t]], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) p.block_bases[blockIdx.x * E + e] = counts[e];
}

// Single block: block_bases[b, e] becomes the output position of the first token of expert e in
// tile b (expert offset + the counts of e in the tiles before b).
__global__ void __launch_bounds__(kThreads) scan_counts_kernel(const ExpertPermutationParams p, int64_t tiles) {
  __shared__ int64_t totals[kMaxPermutationExperts];
  const int E = p.num_experts;
  for (int e = threadIdx.x; e < E; e += kThreads) {
    int64_t running = 0;
    for (int64_t b = 0; b < tiles; ++b) {
      const int64_t c = p.block_bases[b * E + e];
      p.block_bases[b * E + e] = running;
      running += c;
    }
    totals[e] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t acc = 0;
    p.offsets[0] = 0;
    for (int e = 0; e < E; ++e) {
      acc += totals[e];
      p.offsets[e + 1] = acc;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) {
    const int64_t base = p.offsets[e];
    for (int64_t b = 0; b < tiles; ++b) p.block_bases[b * E + e] += base;
  }
}

__global__ void __launch_bounds__(kThreads) scatter_tokens_kernel(const ExpertPermutationParams p) {
  __shared__ int64_t base[kMaxPermutationExperts];
  __shared__ int warp_counts[kWarps][kMaxPermutationExperts];
  const int E = p.num_experts;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int e = threadIdx.x; e < E; e += kThreads) {
    base[e] = p.block_bases[blockIdx.x * E + e];
    for (int w = 0; w < kWarps; ++w) warp_counts[w][e] = 0;
  }
  __syncthreads();
  const int64_t start = blockIdx.x * kTile;
  for (int r = 0; r < kRounds && start + r * kThreads < p.n; ++r) {
    const int64_t t = start + r * kThreads + threadIdx.x;
    const bool valid = t < p.n;
    const int64_t e = valid ? p.expert_idx[t] : -1;
    // Lanes holding the same expert; a lane's rank among them is the count of lower lanes.
    const unsigned int same = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(same & ((1u << lane) - 1u));
    if (valid && rank == 0) warp_counts[warp][e] = __popc(same);
    __syncthreads();
    if (valid) {
      int64_t pos = base[e] + rank;
      for (int w = 0; w < warp; ++w) pos += warp_counts[w][e];
      p.permutation[pos] = t;
    }
    __syncthreads();
    for (int x = threadIdx.x; x < E; x += kThreads) {
      int64_t taken = 0;
      for (int w = 0; w < kWarps; ++w) {
        taken += warp_counts[w][x];
        warp_counts[w][x] = 0;
      }
      base[x] += taken;
    }
    __syncthreads();
  }
}

template <typename V>
__global__ void __launch_bounds__(kThreads) row_copy_kernel(const RowCopyParams p) {
  const int64_t per_row = p.row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t work = p.rows * per_row;
  const V* in = static_cast<const V*>(p.in);
  V* out = static_cast<V*>(p.out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < work;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = i % per_row;
    const int64_t moved = p.permutation[r];
    const int64_t src = p.gather_rows ? moved : r, dst = p.gather_rows ? r : moved;
    out[dst * per_row + c] = in[src * per_row + c];
  }
}

__global__ void __launch_bounds__(kThreads) permutation_check_kernel(const PermutationCheckParams p) {
  auto* status = reinterpret_cast<long long*>(p.status);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = p.permutation[i];
    if (v < 0 || v >= p.n) {
      atomicMin(&status[0], static_cast<long long>(i));
    } else if (atomicAdd(&p.seen[v], 1) == 1) {  // the second sighting of v
      atomicMin(&status[1], static_cast<long long>(v));
    }
  }
}

unsigned int capped_grid(int64_t work) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(65536, blocks_for(work, kThreads))));
}

template <typename V>
void launch_row_copy_as(const RowCopyParams& p, cudaStream_t stream) {
  row_copy_kernel<V><<<capped_grid(p.rows * (p.row_bytes / static_cast<int64_t>(sizeof(V)))), kThreads, 0, stream>>>(p);
}

}  // namespace

int64_t expert_permutation_blocks(int64_t n) { return (n + kTile - 1) / kTile; }

void launch_expert_permutation(const ExpertPermutationParams& params, cudaStream_t stream) {
  if (params.n == 0) {
    cudaMemsetAsync(params.offsets, 0, sizeof(int64_t) * (params.num_experts + 1), stream);
    return;
  }
  const int64_t tiles = expert_permutation_blocks(params.n);
  count_experts_kernel<<<static_cast<unsigned int>(tiles), kThreads, 0, stream>>>(params);
  scan_counts_kernel<<<1, kThreads, 0, stream>>>(params, tiles);
  scatter_tokens_kernel<<<static_cast<unsigned int>(tiles), kThreads, 0, stream>>>(params);
}

void launch_row_copy(const RowCopyParams& params, cudaStream_t stream) {
  if (params.rows == 0 || params.row_bytes == 0) return;
  // Widest access that divides the row and both base addresses.
  const auto alignment = static_cast<uint64_t>(params.row_bytes) | reinterpret_cast<uintptr_t>(params.in) |
                         reinterpret_cast<uintptr_t>(params.out);
  if (alignment % 16 == 0) {
    launch_row_copy_as<uint4>(params, stream);
  } else if (alignment % 8 == 0) {
    launch_row_copy_as<uint2>(params, stream);
  } else if (alignment % 4 == 0) {
    launch_row_copy_as<uint32_t>(params, stream);
  } else if (alignment % 2 == 0) {
    launch_row_copy_as<uint16_t>(params, stream);
  } else {
    launch_row_copy_as<uint8_t>(params, stream);
  }
}

void launch_permutation_check(const PermutationCheckParams& params, cudaStream_t stream) {
  if (params.n == 0) return;
  permutation_check_kernel<<<capped_grid(params.n), kThreads, 0, stream>>>(params);
}

}  // namespace mixsga::kernels
