#include "ops/validation.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <c10/util/accumulate.h>

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
  check_sizes_fit(t, name);
}

void check_sizes_fit(const at::Tensor& t, std::string_view name) { check_sizes_fit(t.sizes(), name); }

void check_sizes_fit(c10::IntArrayRef sizes, std::string_view name) {
  // Found by tests/fuzz: e.g. x [2^63-1, 2, 0] is a valid empty tensor, but the token count
  // (product of the leading dims) overflowed, which is undefined behaviour; and a reshape or an
  // output of such a tensor fails inside torch with an error that names no argument.
  int64_t product = 1;
  for (const int64_t size : sizes) {
    TORCH_CHECK_VALUE(size == 0 || !__builtin_mul_overflow(product, size, &product),
                      fmt::format("{}: sizes {} are too large (the product of the non-zero sizes overflows int64)",
                                  name, shape_str(sizes)));
  }
}

void check_num_experts(int64_t num_experts, std::string_view name) {
  constexpr int64_t kMaxExperts = int64_t{1} << 20;
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxExperts,
                    fmt::format("{}: must be in [1, {}], got {}", name, kMaxExperts, num_experts));
}

void check_grouped_kv_proj_grad_out(const at::Tensor& grad_out, const at::Tensor& x, int64_t heads, int64_t head_dim) {
  const auto expected = grouped_kv_proj_out_shape(x, heads, head_dim);
  TORCH_CHECK_VALUE(grad_out.defined() && grad_out.sizes().equals(expected),
                    fmt::format("grad_out: expected shape {}, got {}", shape_str(expected),
                                grad_out.defined() ? shape_str(grad_out.sizes()) : "undefined"));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(),
                   fmt::format("grad_out: expected the dtype of x ({}), got {}", c10::toString(x.scalar_type()),
                               c10::toString(grad_out.scalar_type())));
  TORCH_CHECK_VALUE(grad_out.device() == x.device(),
                    fmt::format("grad_out: expected device {}, got {}", x.device().str(), grad_out.device().str()));
}

void check_expert_idx(const at::Tensor& expert_idx, c10::IntArrayRef expected_shape, int64_t num_experts,
                      c10::Device device, std::string_view name) {
  TORCH_CHECK_VALUE(expert_idx.defined(), fmt::format("{}: expected a tensor, got an undefined one", name));
  TORCH_CHECK_TYPE(at::isIntegralType(expert_idx.scalar_type(), /*includeBool=*/false),
                   fmt::format("{}: expected an integer dtype, got {}", name, c10::toString(expert_idx.scalar_type())));
  TORCH_CHECK_VALUE(expert_idx.device() == device,
                    fmt::format("{}: expected device {}, got {}", name, device.str(), expert_idx.device().str()));
  check_sizes_fit(expert_idx, name);
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

at::Tensor check_routing_args(const at::Tensor& scores, c10::ArrayRef<double> ratios,
                              const std::optional<at::Tensor>& valid_mask) {
  check_floating(scores, "scores");
  TORCH_CHECK_VALUE(scores.dim() == 3, fmt::format("scores: expected shape [B, L, E], got {}", shape_str(scores.sizes())));
  const int64_t B = scores.size(0), L = scores.size(1), E = scores.size(2);
  TORCH_CHECK_VALUE(E >= 1, fmt::format("scores: needs at least one expert column, got shape {}", shape_str(scores.sizes())));
  check_ratios(ratios, E);
  if (!valid_mask.has_value() || !valid_mask->defined()) return at::Tensor();
  const auto& m = *valid_mask;
  TORCH_CHECK_VALUE(m.device() == scores.device(), fmt::format("valid_mask: expected device {}, got {}",
                                                               scores.device().str(), m.device().str()));
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == L,
                    fmt::format("valid_mask: expected shape [{}, {}] (the [B, L] of scores), got {}", B, L,
                                shape_str(m.sizes())));
  auto valid = m.ne(0).contiguous();
  if (B > 0 && L > 0) {
    const auto empty = valid.sum(1).eq(0).nonzero();
    TORCH_CHECK_VALUE(empty.numel() == 0,
                      fmt::format("valid_mask: sequence {} has no valid token (all padding); every sequence "
                                  "needs at least one",
                                  empty.numel() ? empty[0][0].item<int64_t>() : -1));
  }
  return valid;
}

ProjShapes check_grouped_kv_proj_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_idx,
                                      c10::IntArrayRef group_sizes, int64_t head_dim) {
  check_floating(x, "x");
  check_floating(weight, "weight");
  TORCH_CHECK_VALUE(x.dim() >= 1, fmt::format("x: expected shape [*, D], got {}", shape_str(x.sizes())));
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(-1),
                    fmt::format("weight: expected shape [Hkv * head_dim, {}] (D = x.size(-1)), got {}", x.size(-1),
                                shape_str(weight.sizes())));
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(),
                   fmt::format("weight: expected the dtype of x ({}), got {}", c10::toString(x.scalar_type()),
                               c10::toString(weight.scalar_type())));
  TORCH_CHECK_VALUE(weight.device() == x.device(),
                    fmt::format("weight: expected device {}, got {}", x.device().str(), weight.device().str()));
  TORCH_CHECK_VALUE(head_dim >= 1 && weight.size(0) % head_dim == 0 && weight.size(0) > 0,
                    fmt::format("head_dim: must be >= 1 and divide weight.size(0) ({}), got {}", weight.size(0), head_dim));
  const int64_t heads = weight.size(0) / head_dim;
  check_sizes_fit(grouped_kv_proj_out_shape(x, heads, head_dim), "x");  // the output [*, Hkv, d]
  check_group_sizes(group_sizes, heads);
  check_expert_idx(expert_idx, x.sizes().slice(0, x.dim() - 1), static_cast<int64_t>(group_sizes.size()), x.device());
  const int64_t hidden = x.size(-1);
  const int64_t tokens = hidden == 0 ? c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)) : x.numel() / hidden;
  return {tokens, hidden, heads, head_dim};
}

bool check_grouped_kv_proj_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, const at::Tensor& weight) {
  if (!bias.has_value() || !bias->defined()) return false;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                    fmt::format("bias: expected shape [{}] (weight.size(0)), got {}", weight.size(0),
                                shape_str(bias->sizes())));
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(),
                   fmt::format("bias: expected the dtype of x ({}), got {}", c10::toString(x.scalar_type()),
                               c10::toString(bias->scalar_type())));
  TORCH_CHECK_VALUE(bias->device() == x.device(),
                    fmt::format("bias: expected device {}, got {}", x.device().str(), bias->device().str()));
  return true;
}

void check_grouped_kv_pool_args(const at::Tensor& kv, const at::Tensor& expert_idx, c10::IntArrayRef group_sizes) {
  check_floating(kv, "kv");
  TORCH_CHECK_VALUE(kv.dim() >= 2, fmt::format("kv: expected shape [*, Hkv, d], got {}", shape_str(kv.sizes())));
  check_group_sizes(group_sizes, kv.size(-2));
  check_expert_idx(expert_idx, kv.sizes().slice(0, kv.dim() - 2), static_cast<int64_t>(group_sizes.size()),
                   kv.device());
}

std::vector<int64_t> grouped_kv_proj_out_shape(const at::Tensor& x, int64_t heads, int64_t head_dim) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(heads);
  shape.push_back(head_dim);
  return shape;
}

void check_permutation_args(const at::Tensor& x, const at::Tensor& permutation) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() >= 1,
                    fmt::format("x: expected shape [N, *], got {}", x.defined() ? shape_str(x.sizes()) : "undefined"));
  TORCH_CHECK_TYPE(permutation.scalar_type() == at::kLong,
                   fmt::format("permutation: expected int64, got {}", c10::toString(permutation.scalar_type())));
  TORCH_CHECK_VALUE(permutation.device() == x.device(),
                    fmt::format("permutation: expected device {}, got {}", x.device().str(), permutation.device().str()));
  TORCH_CHECK_VALUE(permutation.dim() == 1 && permutation.size(0) == x.size(0),
                    fmt::format("permutation: expected shape [{}] (x.size(0)), got {}", x.size(0),
                                shape_str(permutation.sizes())));
}

void check_rope_rotate_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(3) % 2 == 0,
                    fmt::format("x: expected shape [B, L, H, d] with even d, got {}", shape_str(x.sizes())));
  const int64_t B = x.size(0), L = x.size(1), d = x.size(3);
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    TORCH_CHECK_VALUE(t->defined(), fmt::format("{}: expected a tensor, got an undefined one", name));
    TORCH_CHECK_VALUE(t->dim() == 3 && (t->size(0) == B || t->size(0) == 1) && t->size(1) == L && t->size(2) == d,
                      fmt::format("{}: expected shape [{}, {}, {}] or [1, {}, {}], got {}", name, B, L, d, L, d,
                                  shape_str(t->sizes())));
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), fmt::format("{}: expected the dtype of x ({}), got {}", name,
                                                                      c10::toString(x.scalar_type()),
                                                                      c10::toString(t->scalar_type())));
    TORCH_CHECK_VALUE(t->device() == x.device(),
                      fmt::format("{}: expected the device of x ({}), got {}", name, x.device().str(), t->device().str()));
  }
  TORCH_CHECK_VALUE(cos.size(0) == sin.size(0), fmt::format("sin: expected the batch size of cos ({}), got {}",
                                                            cos.size(0), sin.size(0)));
}


CacheAttentionShapes check_cache_attention_args(const at::Tensor& q, const at::Tensor& query_positions,
                                                at::TensorList k_pools, at::TensorList v_pools,
                                                at::TensorList key_positions, const at::Tensor& lengths,
                                                int64_t num_kv_heads) {
  check_floating(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 4, fmt::format("q: expected shape [B, L, Hq, d], got {}", shape_str(q.sizes())));
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2), d = q.size(3);
  TORCH_CHECK_VALUE(num_kv_heads > 0 && Hq % num_kv_heads == 0,
                    fmt::format("num_kv_heads: must be > 0 and divide the query heads ({}), got {}", Hq, num_kv_heads));
  TORCH_CHECK_VALUE(query_positions.defined(), "query_positions: expected a tensor, got an undefined one");
  TORCH_CHECK_TYPE(at::isIntegralType(query_positions.scalar_type(), /*includeBool=*/false),
                   fmt::format("query_positions: expected an integer dtype, got {}",
                               c10::toString(query_positions.scalar_type())));
  TORCH_CHECK_VALUE(query_positions.dim() == 2 && query_positions.size(0) == B && query_positions.size(1) == L,
                    fmt::format("query_positions: expected shape [{}, {}] (the [B, L] of q), got {}", B, L,
                                shape_str(query_positions.sizes())));
  TORCH_CHECK_VALUE(query_positions.device() == q.device(),
                    fmt::format("query_positions: expected the device of q ({}), got {}", q.device().str(),
                                query_positions.device().str()));
  const int64_t E = static_cast<int64_t>(k_pools.size());
  TORCH_CHECK_VALUE(E >= 1 && v_pools.size() == k_pools.size() && key_positions.size() == k_pools.size(),
                    fmt::format("k_pools / v_pools / key_positions: expected the same number (>= 1) of pools, got {}, "
                                "{} and {}",
                                E, v_pools.size(), key_positions.size()));
  TORCH_CHECK_VALUE(lengths.defined(), "lengths: expected a tensor, got an undefined one");
  TORCH_CHECK_VALUE(lengths.dim() == 2 && lengths.size(0) == B && lengths.size(1) == E,
                    fmt::format("lengths: expected shape [{}, {}] (batch, pools), got {}", B, E, shape_str(lengths.sizes())));
  TORCH_CHECK_TYPE(at::isIntegralType(lengths.scalar_type(), /*includeBool=*/false),
                   fmt::format("lengths: expected an integer dtype, got {}", c10::toString(lengths.scalar_type())));
  // HeteroKVCache keeps its lengths on the host whatever the pools' device.
  TORCH_CHECK_VALUE(lengths.device().is_cpu() || lengths.device() == q.device(),
                    fmt::format("lengths: expected the CPU or the device of q ({}), got {}", q.device().str(),
                                lengths.device().str()));
  for (int64_t e = 0; e < E; ++e) {
    for (const auto& [pools, name] : {std::pair{k_pools, "k_pools"}, std::pair{v_pools, "v_pools"}}) {
      const auto& p = pools[e];
      TORCH_CHECK_VALUE(p.defined(), fmt::format("{}[{}]: expected a tensor, got an undefined one", name, e));
      TORCH_CHECK_VALUE(p.dim() == 4 && p.size(0) == B && p.size(3) == d && p.size(1) > 0 && num_kv_heads % p.size(1) == 0,
                        fmt::format("{}[{}]: expected shape [{}, Hkv/g, T, {}] with Hkv/g dividing num_kv_heads ({}), "
                                    "got {}",
                                    name, e, B, d, num_kv_heads, shape_str(p.sizes())));
      TORCH_CHECK_TYPE(p.scalar_type() == q.scalar_type(),
                       fmt::format("{}[{}]: expected the dtype of q ({}), got {}", name, e, c10::toString(q.scalar_type()),
                                   c10::toString(p.scalar_type())));
      TORCH_CHECK_VALUE(p.device() == q.device(), fmt::format("{}[{}]: expected the device of q ({}), got {}", name, e,
                                                              q.device().str(), p.device().str()));
      TORCH_CHECK_VALUE(p.size(3) == 0 || p.size(2) == 0 || p.stride(3) == 1,
                        fmt::format("{}[{}]: the head dim must be contiguous (stride 1), got stride {}", name, e,
                                    p.stride(3)));
    }
    TORCH_CHECK_VALUE(v_pools[e].sizes().equals(k_pools[e].sizes()),
                      fmt::format("v_pools[{}]: expected the shape of k_pools[{}] {}, got {}", e, e,
                                  shape_str(k_pools[e].sizes()), shape_str(v_pools[e].sizes())));
    const int64_t capacity = k_pools[e].size(2);
    const auto& pos = key_positions[e];
    TORCH_CHECK_VALUE(pos.defined(), fmt::format("key_positions[{}]: expected a tensor, got an undefined one", e));
    TORCH_CHECK_TYPE(at::isIntegralType(pos.scalar_type(), /*includeBool=*/false),
                     fmt::format("key_positions[{}]: expected an integer dtype, got {}", e,
                                 c10::toString(pos.scalar_type())));
    TORCH_CHECK_VALUE(pos.dim() == 2 && pos.size(0) == B && pos.size(1) == capacity,
                      fmt::format("key_positions[{}]: expected shape [{}, {}] (batch, the token dim of k_pools[{}]), got {}",
                                  e, B, capacity, e, shape_str(pos.sizes())));
    TORCH_CHECK_VALUE(pos.device() == q.device(), fmt::format("key_positions[{}]: expected the device of q ({}), got {}",
                                                              e, q.device().str(), pos.device().str()));
    if (B > 0) {
      const auto [lo, hi] = at::aminmax(lengths.select(1, e));
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() <= capacity,
                        fmt::format("lengths: column {} must be in [0, {}] (the token dim of k_pools[{}]), got values "
                                    "in [{}, {}]",
                                    e, capacity, e, lo.item<int64_t>(), hi.item<int64_t>()));
    }
  }
  return {B, L, Hq, d, E};
}

}  // namespace mixsga::detail
