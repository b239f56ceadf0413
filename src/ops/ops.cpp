// C++ entry points: thin wrappers that call through the dispatcher, so C++ callers get the same
// autograd and device routing as torch.ops.mixsga.* from Python.
#include "mixsga/ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <fmt/format.h>

#include "ops/validation.h"

namespace mixsga::ops {
namespace {
template <typename Signature>
auto find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The dispatcher needs a defined tensor to pick a backend; say which argument was missing instead
// of its generic "no tensor arguments" error.
void require_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), fmt::format("{}: expected a tensor, got an undefined one", name));
}
}  // namespace

at::Tensor route_expert_choice(const at::Tensor& scores, c10::ArrayRef<double> ratios,
                               const std::optional<at::Tensor>& valid_mask) {
  static auto op = find_op<at::Tensor(const at::Tensor&, c10::ArrayRef<double>, const std::optional<at::Tensor>&)>(
      "mixsga::route_expert_choice");
  require_defined(scores, "scores");
  return op.call(scores, ratios, valid_mask);
}

at::Tensor grouped_kv_pool(const at::Tensor& kv, const at::Tensor& expert_idx, c10::IntArrayRef group_sizes) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef)>("mixsga::grouped_kv_pool");
  require_defined(kv, "kv");
  require_defined(expert_idx, "expert_idx");
  return op.call(kv, expert_idx, group_sizes);
}

at::Tensor grouped_kv_proj(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& expert_idx, c10::IntArrayRef group_sizes, int64_t head_dim) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                      const at::Tensor&, c10::IntArrayRef, int64_t)>("mixsga::grouped_kv_proj");
  require_defined(x, "x");
  require_defined(weight, "weight");
  require_defined(expert_idx, "expert_idx");
  return op.call(x, weight, bias, expert_idx, group_sizes, head_dim);
}

std::tuple<at::Tensor, at::Tensor> expert_permutation(const at::Tensor& expert_idx, int64_t num_experts) {
  static auto op = find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>("mixsga::expert_permutation");
  require_defined(expert_idx, "expert_idx");
  return op.call(expert_idx, num_experts);
}

at::Tensor expert_scatter(const at::Tensor& x, const at::Tensor& permutation) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("mixsga::expert_scatter");
  require_defined(x, "x");
  require_defined(permutation, "permutation");
  return op.call(x, permutation);
}

at::Tensor expert_gather(const at::Tensor& x, const at::Tensor& permutation) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("mixsga::expert_gather");
  require_defined(x, "x");
  require_defined(permutation, "permutation");
  return op.call(x, permutation);
}

at::Tensor hetero_decode_attention(const at::Tensor& q, at::TensorList k_pools, at::TensorList v_pools,
                                   const at::Tensor& lengths, int64_t num_kv_heads, std::optional<double> scale) {
  static auto op = find_op<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&, int64_t,
                                      std::optional<double>)>("mixsga::hetero_decode_attention");
  require_defined(q, "q");
  require_defined(lengths, "lengths");
  return op.call(q, k_pools, v_pools, lengths, num_kv_heads, scale);
}

at::Tensor hetero_cache_attention(const at::Tensor& q, const at::Tensor& query_positions, at::TensorList k_pools,
                                  at::TensorList v_pools, at::TensorList key_positions, const at::Tensor& lengths,
                                  int64_t num_kv_heads, std::optional<double> scale) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                                      const at::Tensor&, int64_t, std::optional<double>)>("mixsga::hetero_cache_attention");
  require_defined(q, "q");
  require_defined(query_positions, "query_positions");
  require_defined(lengths, "lengths");
  return op.call(q, query_positions, k_pools, v_pools, key_positions, lengths, num_kv_heads, scale);
}

at::Tensor pool_kv_weight(const at::Tensor& weight, int64_t group_size, int64_t head_dim) {
  detail::check_floating(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() >= 1, fmt::format("pool_kv_weight: weight must have at least one dim, got shape {}",
                                                 detail::shape_str(weight.sizes())));
  TORCH_CHECK_VALUE(head_dim >= 1 && weight.size(0) % head_dim == 0,
                    fmt::format("pool_kv_weight: head_dim ({}) must divide weight.size(0) ({})", head_dim,
                                weight.size(0)));
  const int64_t heads = weight.size(0) / head_dim;
  TORCH_CHECK_VALUE(group_size >= 1 && heads % group_size == 0,
                    fmt::format("pool_kv_weight: group_size ({}) must divide the number of KV heads ({})",
                                group_size, heads));
  if (group_size == 1) return weight;
  std::vector<int64_t> grouped{heads / group_size, group_size, head_dim};
  const auto rest = weight.sizes().slice(1);
  grouped.insert(grouped.end(), rest.begin(), rest.end());
  detail::check_sizes_fit(grouped, "weight");
  std::vector<int64_t> pooled{heads / group_size * head_dim};
  pooled.insert(pooled.end(), rest.begin(), rest.end());
  const auto groups = weight.reshape(grouped);
  // bf16 / fp16: mean accumulates in float and rounds once. Large groups (and empty weights, where any
  // group size divides 0 heads; found by tests/fuzz: g ~ 2^60 meant 2^60 adds): one reduction.
  if ((weight.scalar_type() != at::kFloat && weight.scalar_type() != at::kDouble) || group_size > 8 ||
      weight.numel() == 0) {
    return groups.mean(1).reshape(pooled);
  }
  // Sum of g contiguous slices, then / g: the same arithmetic as mean (a sum, then a division), but
  // it streams the weight once; mean's reduction over a strided middle dim was ~2.7x slower.
  auto sum = groups.select(1, 0) + groups.select(1, 1);
  for (int64_t j = 2; j < group_size; ++j) sum.add_(groups.select(1, j));
  return sum.div_(static_cast<double>(group_size)).reshape(pooled);
}

double kv_fraction(c10::IntArrayRef group_sizes, c10::ArrayRef<double> ratios) {
  return mixsga::kv_fraction(group_sizes, ratios);
}

at::Tensor rope_rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("mixsga::rope_rotate");
  require_defined(x, "x");
  require_defined(cos, "cos");
  require_defined(sin, "sin");
  return op.call(x, cos, sin, transpose);
}

}  // namespace mixsga::ops

namespace mixsga {

double kv_fraction(c10::IntArrayRef group_sizes, c10::ArrayRef<double> ratios) {
  detail::check_group_sizes(group_sizes);
  detail::check_ratios(ratios, static_cast<int64_t>(group_sizes.size()));
  double fraction = 0.0;
  for (size_t e = 0; e < ratios.size(); ++e) fraction += ratios[e] / static_cast<double>(group_sizes[e]);
  return fraction;
}

}  // namespace mixsga
