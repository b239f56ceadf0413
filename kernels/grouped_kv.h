#pragma once
// Grouped K/V kernels: per-token pooling (grouped_kv_pool) and the gather/pool/expand pieces of
// grouped_kv_proj and its backward (the GEMMs go through cuBLAS in the caller). Torch-free: plain
// pointers, all tensors contiguous, element type chosen by the template argument
// (float, double, __nv_bfloat16, __half), accumulation in float (double for double).
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernel_types.h"

namespace mixsga::kernels {

/// grouped_kv_pool: out[t, h, :] = mean of in[t, h', :] over the heads h' of h's group, groups of
/// group_sizes[expert_idx[t]] consecutive heads.
struct GroupedKVPoolParams {
  const void* in;              ///< [tokens, heads, head_dim]
  void* out;                   ///< [tokens, heads, head_dim]
  const int64_t* expert_idx;   ///< [tokens], values in [0, num_experts)
  int64_t group_sizes[kMaxExperts];
  int64_t tokens, heads, head_dim;
  int num_experts;
};

/// Compact group reduction: out[m, r] = scale * sum_{i < group_size} in[m * group_size + i, r].
/// Pools a projection weight ([Hkv, d*D] -> [Hkv/g, d*D], scale 1/g) or bias, and sums the gradient
/// of each group's heads in the backward ([n*Hkv, d] -> [n*Hkv/g, d], scale 1).
struct GroupReduceParams {
  const void* in;   ///< [groups * group_size, row]
  void* out;        ///< [groups, row]
  int64_t groups, group_size, row;
  double scale;
};

/// Repeat-back scatter: out[rows[i], c * group_size + j, :] = in[i, c, :] for j < group_size, i.e. one
/// expert's compact K/V [n, heads/group_size, head_dim] written, expanded, into the token rows of
/// out [tokens, heads, head_dim]. rows == nullptr means row i goes to token i.
struct ExpandRowsParams {
  const void* in;          ///< [n, heads / group_size, head_dim]
  void* out;               ///< [tokens, heads, head_dim]
  const int64_t* rows;     ///< [n] destination token of each input row, or nullptr
  int64_t n, heads, group_size, head_dim;
};

template <typename T>
void launch_grouped_kv_pool(const GroupedKVPoolParams& params, cudaStream_t stream);
template <typename T>
void launch_group_reduce(const GroupReduceParams& params, cudaStream_t stream);
template <typename T>
void launch_expand_rows(const ExpandRowsParams& params, cudaStream_t stream);

}  // namespace mixsga::kernels
