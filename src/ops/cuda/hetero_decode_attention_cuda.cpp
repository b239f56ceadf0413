// CUDA registration of hetero_decode_attention: the checks shared with the CPU kernel, then the
// flash-decoding split over (sequence, pool, compact head, chunk of cached tokens) and the
// log-sum-exp merge of kernels/hetero_decode_attention.cuh. The pools are read in place, through
// their strides (views narrowed from a larger capacity, as HeteroKVCache hands them out).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <fmt/format.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "hetero_decode_attention.h"
#include "ops/cuda/cuda_launch.h"
#include "ops/decode_attention_checks.h"
#include "static_switch.h"

namespace mixsga::cuda {
namespace {

at::Tensor hetero_decode_attention_cuda(const at::Tensor& q, at::TensorList k_pools, at::TensorList v_pools,
                                        const at::Tensor& lengths, int64_t num_kv_heads, std::optional<double> scale) {
  const auto shapes = detail::check_decode_attention_args(q, k_pools, v_pools, lengths, num_kv_heads);
  const int64_t B = shapes.batch, Hq = shapes.query_heads, d = shapes.head_dim, E = shapes.experts;
  check_cuda_experts(E, "k_pools");
  TORCH_CHECK_VALUE(d <= kernels::kDecodeMaxHeadDim,
                    fmt::format("q: the CUDA kernel supports head dims up to {}, got {}", kernels::kDecodeMaxHeadDim, d));
  TORCH_CHECK_VALUE(B <= 65535, fmt::format("q: the CUDA kernel supports batches of up to 65535 sequences, got {}", B));
  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;

  const auto qc = q.contiguous();  // no copy when q is contiguous, as the decode path hands it over
  // Device lengths stay there (int32 is widened by a kernel); CPU lengths (HeteroKVCache's) are
  // copied over without blocking: a blocking copy would synchronise the stream on every decode step,
  // and cudaMemcpyAsync stages pageable memory before it returns, so the source may go right after.
  const auto len = lengths.to(q.device(), at::kLong, /*non_blocking=*/true).contiguous();
  kernels::HeteroDecodeParams params{};
  params.q = qc.const_data_ptr();
  params.out = out.mutable_data_ptr();
  params.lengths = len.const_data_ptr<int64_t>();
  params.batch = B;
  params.query_heads = Hq;
  params.head_dim = d;
  params.num_kv_heads = num_kv_heads;
  params.num_pools = static_cast<int>(E);
  params.scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(d)));
  for (int64_t e = 0; e < E; ++e) {
    const auto& K = k_pools[e];
    const auto& V = v_pools[e];
    auto& pool = params.pools[e];
    pool.keys = K.const_data_ptr();
    pool.values = V.const_data_ptr();
    pool.k_stride_b = K.stride(0);
    pool.k_stride_h = K.stride(1);
    pool.k_stride_t = K.stride(2);
    pool.v_stride_b = V.stride(0);
    pool.v_stride_h = V.stride(1);
    pool.v_stride_t = V.stride(2);
    pool.compact_heads = K.size(1);
    pool.capacity = K.size(2);
  }
  const auto kind = scalar_kind(q.scalar_type());
  // Two attributes straight from the runtime (cached by the driver), rather than ATen's CUDA context
  // header, which costs this file a large part of its compile time.
  int sm_major = 0, sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, q.device().index()));
  params.tensor_cores = kernels::decode_tensor_cores_apply(params, kind, sm_major);
  const bool double_acc = q.scalar_type() == at::kDouble;
  const auto acc_dtype = double_acc ? at::kDouble : at::kFloat;
  kernels::plan_hetero_decode(params, sm_count, double_acc ? sizeof(double) : sizeof(float));
  TORCH_CHECK_VALUE(params.items <= std::numeric_limits<int32_t>::max(),
                    fmt::format("k_pools: too many blocks for one launch ({}); use a shorter cache or fewer heads",
                                params.items));

  const auto acc_options = q.options().dtype(acc_dtype);
  auto partial_acc = at::empty({B, Hq, params.slots, d}, acc_options);
  auto partial_max = at::empty({B, Hq, params.slots}, acc_options);
  auto partial_sum = at::empty({B, Hq, params.slots}, acc_options);
  params.partial_acc = partial_acc.mutable_data_ptr();
  params.partial_max = partial_max.mutable_data_ptr();
  params.partial_sum = partial_sum.mutable_data_ptr();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SCALAR_SWITCH(kind, elem_t, [&] { kernels::launch_hetero_decode_attention<elem_t>(params, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CUDA, m) { m.impl("hetero_decode_attention", &hetero_decode_attention_cuda); }

}  // namespace mixsga::cuda
