#pragma once
// Argument checks shared by the op kernels and the modules. Each throws a c10 error whose message
// names the argument and the value seen.

#include <ATen/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <string_view>

namespace mixsga::detail {

/// ratios: non-empty, each finite and in [0, 1], summing to 1 within 1e-6; size == num_experts
/// unless num_experts < 0.
void check_ratios(c10::ArrayRef<double> ratios, int64_t num_experts = -1, std::string_view name = "ratios");

/// group_sizes: non-empty, each >= 1, strictly increasing, each dividing num_kv_heads (if > 0).
void check_group_sizes(c10::IntArrayRef group_sizes, int64_t num_kv_heads = -1,
                       std::string_view name = "group_sizes");

/// expert_idx: integer dtype, on `device`, shape == expected leading shape, values in [0, num_experts).
void check_expert_idx(const at::Tensor& expert_idx, c10::IntArrayRef expected_shape, int64_t num_experts,
                      c10::Device device, std::string_view name = "expert_idx");

/// A floating tensor (float32, float64, bfloat16 or float16).
void check_floating(const at::Tensor& t, std::string_view name);

/// Formats a shape as "[2, 3, 4]".
std::string shape_str(c10::IntArrayRef shape);

}  // namespace mixsga::detail
