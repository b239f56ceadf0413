// CUDA registration of hetero_cache_attention: the ATen composite of ops/hetero_cache_attention_composite.h
// (batched matmuls per pool at its compact head count, merged by log-sum-exp), so the op exists on CUDA
// and never expands the pools. A fused kernel (one pass over each pool per query block, as the CPU
// kernel does) would save the [B, Hq, L, T_e] score tensors; this path serves chunked continuation,
// which is rare next to decode steps.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/hetero_cache_attention_composite.h"

namespace mixsga::cuda {
namespace {

at::Tensor hetero_cache_attention_cuda(const at::Tensor& q, const at::Tensor& query_positions, at::TensorList k_pools,
                                       at::TensorList v_pools, at::TensorList key_positions, const at::Tensor& lengths,
                                       int64_t num_kv_heads, std::optional<double> scale) {
  c10::cuda::CUDAGuard guard(q.device());
  return detail::hetero_cache_attention_composite(q, query_positions, k_pools, v_pools, key_positions, lengths,
                                                  num_kv_heads, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CUDA, m) { m.impl("hetero_cache_attention", &hetero_cache_attention_cuda); }

}  // namespace mixsga::cuda
