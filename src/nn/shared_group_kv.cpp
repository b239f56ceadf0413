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
