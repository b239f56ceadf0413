#include "ops/validation.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>

namespace mixsga::detail {

std::string shape_str(c10::IntArrayRef shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

void check_ratios(c10::ArrayRef<double> ratios, int64_t num_experts, std::string_view name) {
  TORCH_CHECK_VALUE(!ratios.empty(), fmt::format("{}: must hold one ratio per expert, got an empty list", name));
  if (num_experts >= 0) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(ratios.size()) == num_experts,
                      fmt::format("{}: expected {} ratios (one per expert), got {} ({})", name, num_experts,
                                  ratios.size(), fmt::join(ratios, ", ")));
  }
  double sum = 0.0;
  for (size_t e = 0; e < ratios.size(); ++e) {
    const double r = ratios[e];
    TORCH_CHECK_VALUE(std::isfinite(r) && r >= 0.0 && r <= 1.0,
                      fmt::format("{}: every ratio must be in [0, 1], got {}[{}] = {}", name, name, e, r));
    sum += r;
  }
  TORCH_CHECK_VALUE(std::abs(sum - 1.0) <= 1e-6,
                    fmt::format("{}: ratios must sum to 1, got ({}) which sums to {}", name,
                                fmt::join(ratios, ", "), sum));
}

void check_group_sizes(c10::IntArrayRef group_sizes, int64_t num_kv_heads, std::string_view name) {
  TORCH_CHECK_VALUE(!group_sizes.empty(), fmt::format("{}: must hold one group size per expert, got an empty list", name));
  for (size_t e = 0; e < group_sizes.size(); ++e) {
    const int64_t g = group_sizes[e];
    TORCH_CHECK_VALUE(g >= 1, fmt::format("{}: every group size must be >= 1, got {}[{}] = {}", name, name, e, g));
    if (e > 0) {
      TORCH_CHECK_VALUE(g > group_sizes[e - 1],
                        fmt::format("{}: group sizes must be strictly increasing (finest expert first), got [{}]",
                                    name, fmt::join(group_sizes, ", ")));
    }
    if (num_kv_heads > 0) {
      TORCH_CHECK_VALUE(num_kv_heads % g == 0,
                        fmt::format("{}: every group size must divide the number of KV heads ({}), got {}[{}] = {}",
                                    name, num_kv_heads, name, e, g));
    }
  }
}

void check_floating(const at::Tensor& t, std::string_view name) {
  TORCH_CHECK_VALUE(t.defined(), fmt::format("{}: expected a tensor, got an undefined one", name));
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                   fmt::format("{}: expected float32, float64, bfloat16 or float16, got {}", name,
                               c10::toString(st)));
}

void check_expert_idx(const at::Tensor& expert_idx, c10::IntArrayRef expected_shape, int64_t num_experts,
                      c10::Device device, std::string_view name) {
  TORCH_CHECK_VALUE(expert_idx.defined(), fmt::format("{}: expected a tensor, got an undefined one", name));
  TORCH_CHECK_TYPE(at::isIntegralType(expert_idx.scalar_type(), /*includeBool=*/false),
                   fmt::format("{}: expected an integer dtype, got {}", name, c10::toString(expert_idx.scalar_type())));
  TORCH_CHECK_VALUE(expert_idx.device() == device,
                    fmt::format("{}: expected device {}, got {}", name, device.str(), expert_idx.device().str()));
  TORCH_CHECK_VALUE(expert_idx.sizes().equals(expected_shape),
                    fmt::format("{}: expected shape {} (the token dims of the input), got {}", name,
                                shape_str(expected_shape), shape_str(expert_idx.sizes())));
  if (expert_idx.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(expert_idx);
  const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
  TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < num_experts,
                    fmt::format("{}: values must be in [0, {}) (one per expert), got values in [{}, {}]", name,
                                num_experts, lo_v, hi_v));
}

}  // namespace mixsga::detail
