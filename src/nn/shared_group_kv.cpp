#include "mixsga/nn/shared_group_kv.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "mixsga/ops.h"
#include "nn/module_checks.h"
#include "nn/option_record.h"
#include "ops/validation.h"

namespace mixsga::nn {

SharedGroupKVImpl::SharedGroupKVImpl(SharedGroupKVOptions options_) : options(std::move(options_)) { reset(); }

void SharedGroupKVImpl::reset() {
  detail::check_positive(options.hidden_size(), "hidden_size");
  detail::check_positive(options.num_kv_heads(), "num_kv_heads");
  detail::check_positive(options.head_dim(), "head_dim");
  detail::check_group_sizes(options.group_sizes(), options.num_kv_heads());
  const auto linear = torch::nn::LinearOptions(options.hidden_size(), options.num_kv_heads() * options.head_dim())
                          .bias(options.bias());
  k_proj = register_module("k_proj", torch::nn::Linear(linear));
  v_proj = register_module("v_proj", torch::nn::Linear(linear));
}

void SharedGroupKVImpl::pretty_print(std::ostream& stream) const {
  stream << fmt::format("mixsga::nn::SharedGroupKV(hidden_size={}, num_kv_heads={}, head_dim={}, group_sizes=({}), bias={})",
                        options.hidden_size(), options.num_kv_heads(), options.head_dim(),
                        fmt::join(options.group_sizes(), ", "), options.bias());
}

std::tuple<torch::Tensor, torch::Tensor> SharedGroupKVImpl::forward(const torch::Tensor& x, const torch::Tensor& expert_idx) {
  detail::check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == options.hidden_size(),
                    fmt::format("x: expected last dim {} (hidden_size), got shape {}", options.hidden_size(),
                                detail::shape_str(x.sizes())));
  TORCH_CHECK_TYPE(x.scalar_type() == k_proj->weight.scalar_type(),
                   fmt::format("x: expected the parameters' dtype {}, got {}", c10::toString(k_proj->weight.scalar_type()),
                               c10::toString(x.scalar_type())));
  const auto& g = options.group_sizes();
  const int64_t d = options.head_dim();
  // K and V in one grouped projection over the stacked [W_k; W_v] (2*Hkv heads): the tokens are
  // sorted and gathered once, and every expert's GEMM is twice as wide. Pooling groups never straddle
  // the K/V boundary because every group size divides Hkv.
  const auto weight = torch::cat({k_proj->weight, v_proj->weight}, 0);
  const auto bias = k_proj->bias.defined() ? std::optional(torch::cat({k_proj->bias, v_proj->bias}, 0)) : std::nullopt;
  const auto kv = ops::grouped_kv_proj(x, weight, bias, expert_idx, g, d);  // [..., 2*Hkv, d]
  const int64_t heads = options.num_kv_heads();
  // split (not two narrows): its backward is one cat of the two gradients instead of two zero-filled
  // full-size buffers summed.
  const auto parts = kv.split(heads, -2);
  auto k = parts[0], v = parts[1];
  return {k, v};
}

const std::vector<std::pair<torch::Tensor, torch::Tensor>>& SharedGroupKVImpl::pooled_kv_weights() {
  std::vector<torch::Tensor> params{k_proj->weight, v_proj->weight};
  if (k_proj->bias.defined()) params.insert(params.end(), {k_proj->bias, v_proj->bias});
  std::vector<std::pair<const void*, uint32_t>> key;
  for (const auto& p : params) key.emplace_back(p.const_data_ptr(), p._version());
  const bool keep = !torch::GradMode::is_enabled();
  if (keep && key == pooled_.key) return pooled_.experts;
  // [W_k; W_v] pooled in one go: groups never straddle K and V, since every group size divides Hkv.
  const auto weight = torch::cat({params[0], params[1]}, 0);
  const auto bias = params.size() == 4 ? torch::cat({params[2], params[3]}, 0) : torch::Tensor();
  pooled_.experts.clear();
  for (const int64_t g : options.group_sizes()) {
    pooled_.experts.emplace_back(ops::pool_kv_weight(weight, g, options.head_dim()).contiguous(),
                                 bias.defined() ? ops::pool_kv_weight(bias, g, options.head_dim()) : torch::Tensor());
  }
  pooled_.key = keep ? std::move(key) : decltype(key){};  // with autograd, never reused
  return pooled_.experts;
}

CompactKV SharedGroupKVImpl::forward_compact(const torch::Tensor& x, const torch::Tensor& expert_idx,
                                             const std::optional<torch::Tensor>& valid) {
  detail::check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(2) == options.hidden_size(),
                    fmt::format("x: expected shape [B, L, {}] (hidden_size), got {}", options.hidden_size(),
                                detail::shape_str(x.sizes())));
  const int64_t E = static_cast<int64_t>(options.group_sizes().size()), H = options.num_kv_heads(), d = options.head_dim();
  detail::check_expert_idx(expert_idx, x.sizes().slice(0, 2), E, x.device());
  // Padding goes to an extra bucket E that is never projected; the stable permutation keeps each
  // expert's tokens in batch-major order, the order append_compact expects.
  auto idx = expert_idx.reshape({-1}).to(torch::kLong);
  const bool has_valid = valid.has_value() && valid->defined();
  torch::Tensor perm;
  std::vector<int64_t> bounds(E + 2, 0);
  if (idx.numel() == 1) {
    // One decode token: its expert is read directly (a host read, as the permutation's offsets would
    // be), which saves the permutation op on the latency-bound path. Padding: bucket E, no expert.
    const int64_t expert = has_valid && !valid->reshape({-1})[0].item<bool>() ? E : idx.item<int64_t>();
    perm = torch::zeros({1}, idx.options());
    for (int64_t e = expert + 1; e <= E + 1; ++e) bounds[e] = 1;
  } else {
    if (has_valid) idx = idx.masked_fill(valid->reshape({-1}).logical_not(), E);
    torch::Tensor offsets;
    std::tie(perm, offsets) = ops::expert_permutation(idx, E + 1);
    const auto off = offsets.cpu();
    std::copy(off.const_data_ptr<int64_t>(), off.const_data_ptr<int64_t>() + E + 2, bounds.begin());
  }
  const auto flat = x.reshape({-1, options.hidden_size()});
  const auto& pooled = pooled_kv_weights();
  CompactKV out;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t g = options.group_sizes()[e], n = bounds[e + 1] - bounds[e];
    auto rows = perm.narrow(0, bounds[e], n);
    if (n == 0) {  // no projection for an expert without tokens
      out.keys.push_back(torch::empty({0, H / g, d}, x.options()));
      out.values.push_back(out.keys.back());
    } else {
      const auto& [w, b] = pooled[e];
      const auto parts = torch::linear(flat.index_select(0, rows), w, b).view({n, 2 * H / g, d}).split(H / g, 1);
      out.keys.push_back(parts[0]);
      out.values.push_back(parts[1]);
    }
    out.rows.push_back(std::move(rows));
  }
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> SharedGroupKVImpl::expert_weights(int64_t expert, bool key) const {
  const auto& groups = options.group_sizes();
  TORCH_CHECK_INDEX(expert >= 0 && expert < static_cast<int64_t>(groups.size()),
                    fmt::format("expert: must be in [0, {}), got {}", groups.size(), expert));
  const auto& linear = key ? k_proj : v_proj;
  const int64_t g = groups[expert], d = options.head_dim();
  auto w = ops::pool_kv_weight(linear->weight, g, d);
  auto b = linear->bias.defined() ? ops::pool_kv_weight(linear->bias, g, d) : torch::Tensor();
  return {w, b};
}

}  // namespace mixsga::nn

namespace mixsga::nn {
namespace {
detail::OptionRecord option_record(const SharedGroupKVOptions& o) {
  return {{"hidden_size", fmt::format("{}", o.hidden_size())},
          {"num_kv_heads", fmt::format("{}", o.num_kv_heads())},
          {"head_dim", fmt::format("{}", o.head_dim())},
          {"group_sizes", fmt::format("[{}]", fmt::join(o.group_sizes(), ", "))},
          {"bias", fmt::format("{}", o.bias())}};
}
}  // namespace

void SharedGroupKVImpl::save(torch::serialize::OutputArchive& archive) const {
  detail::save_with_options(*this, archive, "SharedGroupKV", option_record(options));
}

void SharedGroupKVImpl::load(torch::serialize::InputArchive& archive) {
  detail::load_with_options(*this, archive, "SharedGroupKV", option_record(options));
}

}  // namespace mixsga::nn
