#pragma once
// Token permutation by expert (a stable counting sort) and the row copies that apply it
// (expert_scatter / expert_gather). Torch-free; rows are moved as bytes, so one instantiation
// serves every dtype.
#include <cuda_runtime_api.h>

#include <cstdint>

namespace mixsga::kernels {

/// Largest num_experts the counting sort takes (its per-expert counters live in shared memory).
inline constexpr int kMaxPermutationExperts = 256;

/// Stable counting sort: permutation lists the tokens of expert 0, then of expert 1, ..., each in
/// token order; offsets[e] is where expert e's block starts (offsets[num_experts] = n).
struct ExpertPermutationParams {
  const int64_t* expert_idx;  ///< [n], values in [0, num_experts)
  int64_t* permutation;       ///< [n]
  int64_t* offsets;           ///< [num_experts + 1]
  int64_t* block_bases;       ///< scratch [expert_permutation_blocks(n), num_experts]
  int64_t n;
  int num_experts;
};

/// Number of token tiles (thread blocks) of the counting sort; sizes its scratch.
int64_t expert_permutation_blocks(int64_t n);

void launch_expert_permutation(const ExpertPermutationParams& params, cudaStream_t stream);

/// Row copy through a permutation: out[i] = in[permutation[i]] (gather_rows), or
/// out[permutation[i]] = in[i] (!gather_rows). Rows are row_bytes long; in and out are contiguous.
struct RowCopyParams {
  const void* in;
  void* out;
  const int64_t* permutation;  ///< [rows]
  int64_t rows, row_bytes;
  bool gather_rows;
};

void launch_row_copy(const RowCopyParams& params, cudaStream_t stream);

/// Checks that `permutation` holds every value of [0, n) exactly once. status must start as {n, n};
/// afterwards status[0] is the first position holding an out-of-range value and status[1] the
/// smallest value seen twice (n where there is none). seen is zeroed scratch [n].
struct PermutationCheckParams {
  const int64_t* permutation;  ///< [n]
  int32_t* seen;               ///< [n], zero on entry
  int64_t* status;             ///< [2]
  int64_t n;
};

void launch_permutation_check(const PermutationCheckParams& params, cudaStream_t stream);

}  // namespace mixsga::kernels
