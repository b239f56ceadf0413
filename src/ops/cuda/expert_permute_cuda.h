#pragma once
// Unchecked building blocks of the CUDA expert_permutation / expert_scatter / expert_gather kernels,
// shared with grouped_kv_proj, whose permutation is made here and needs no validation.
#include <ATen/ATen.h>

#include <tuple>

namespace mixsga::cuda {

/// Stable counting sort of tokens by expert. expert_idx: contiguous int64 on the current device,
/// values in [0, num_experts) (not re-checked). Returns (permutation [n], offsets [num_experts + 1]),
/// both int64 on the device.
std::tuple<at::Tensor, at::Tensor> sort_by_expert(const at::Tensor& expert_idx, int64_t num_experts);

/// Row copy through a permutation of rows.size(0) rows: gather_rows ? out[i] = rows[permutation[i]]
/// : out[permutation[i]] = rows[i]. rows: contiguous [N, *]; permutation: contiguous int64 [N], a
/// true permutation (not re-checked).
at::Tensor permute_rows(const at::Tensor& rows, const at::Tensor& permutation, bool gather_rows);

}  // namespace mixsga::cuda
