#pragma once
// What every CUDA registration file needs between ATen and the torch-free kernels: the kernel's
// element type for an ATen dtype, and the checks the kernels' fixed-size params impose.
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <string_view>

#include "kernel_types.h"

namespace mixsga::cuda {

/// The kernels' element type for a floating ATen dtype (float32, float64, bfloat16, float16).
inline kernels::ScalarKind scalar_kind(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return kernels::ScalarKind::kFloat32;
    case at::kDouble:
      return kernels::ScalarKind::kFloat64;
    case at::kBFloat16:
      return kernels::ScalarKind::kBFloat16;
    case at::kHalf:
      return kernels::ScalarKind::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, fmt::format("mixsga CUDA kernels: expected float32, float64, bfloat16 or float16, got {}",
                                          c10::toString(st)));
  }
}

/// The CUDA kernels carry per-expert values in fixed arrays of kernels::kMaxExperts entries.
inline void check_cuda_experts(int64_t num_experts, std::string_view name) {
  TORCH_CHECK_VALUE(num_experts <= kernels::kMaxExperts,
                    fmt::format("{}: the CUDA kernels support at most {} experts, got {}", name, kernels::kMaxExperts,
                                num_experts));
}

/// Expert indices as the kernels read them: contiguous int64 on the input's device.
inline at::Tensor long_indices(const at::Tensor& idx) { return idx.to(at::kLong).contiguous(); }

}  // namespace mixsga::cuda
