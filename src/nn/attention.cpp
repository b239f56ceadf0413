#include "mixsga/nn/attention.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>

#include "mixsga/nn/rope.h"
#include "mixsga/ops.h"
#include "nn/module_checks.h"
#include "ops/validation.h"

namespace mixsga::nn {

MixSGAAttentionImpl::MixSGAAttentionImpl(MixSGAAttentionOptions options_) : options(std::move(options_)) { reset(); }

void MixSGAAttentionImpl::reset() {
  const auto& o = options;
  detail::check_positive(o.hidden_size(), "hidden_size");
  detail::check_positive(o.num_heads(), "num_heads");
  detail::check_positive(o.num_kv_heads(), "num_kv_heads");
  TORCH_CHECK_VALUE(o.num_heads() % o.num_kv_heads() == 0,
                    fmt::format("num_kv_heads: must divide num_heads ({}), got {}", o.num_heads(), o.num_kv_heads()));
  if (o.head_dim() == 0) {
    TORCH_CHECK_VALUE(o.hidden_size() % o.num_heads() == 0,
                      fmt::format("num_heads: must divide hidden_size ({}) when head_dim is not given, got {}",
                                  o.hidden_size(), o.num_heads()));
    head_dim_ = o.hidden_size() / o.num_heads();
  } else {
    detail::check_positive(o.head_dim(), "head_dim");
    head_dim_ = o.head_dim();
  }
  TORCH_CHECK_VALUE(head_dim_ % 2 == 0, fmt::format("head_dim: must be even (RoPE rotates pairs), got {}", head_dim_));
  detail::check_group_sizes(o.group_sizes(), o.num_kv_heads());
  detail::check_ratios(o.ratios(), static_cast<int64_t>(o.group_sizes().size()));
  detail::check_aux_loss_kind(o.aux_loss());
  detail::check_prefill_routing(o.prefill_routing());
  TORCH_CHECK_VALUE(std::isfinite(o.aux_alpha()) && o.aux_alpha() >= 0.0,
                    fmt::format("aux_alpha: must be finite and >= 0, got {}", o.aux_alpha()));
  TORCH_CHECK_VALUE(o.attention_dropout() >= 0.0 && o.attention_dropout() < 1.0,
                    fmt::format("attention_dropout: must be in [0, 1), got {}", o.attention_dropout()));
  TORCH_CHECK_VALUE(o.rope_theta() > 0.0, fmt::format("rope_theta: must be > 0, got {}", o.rope_theta()));

  const int64_t D = o.hidden_size(), Hq = o.num_heads(), d = head_dim_;
  q_proj = register_module("q_proj", torch::nn::Linear(torch::nn::LinearOptions(D, Hq * d).bias(o.bias())));
  kv = SharedGroupKV(SharedGroupKVOptions(D, o.num_kv_heads(), d).group_sizes(o.group_sizes()).bias(o.bias()));
  k_proj = register_module("k_proj", kv->k_proj);
  v_proj = register_module("v_proj", kv->v_proj);
  o_proj = register_module("o_proj", torch::nn::Linear(torch::nn::LinearOptions(Hq * d, D).bias(o.bias())));
  router = register_module(
      "router", ExpertChoiceRouter(ExpertChoiceRouterOptions(D, o.ratios()).aux_loss(o.aux_loss())));
}

void MixSGAAttentionImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  stream << fmt::format(
      "mixsga::nn::MixSGAAttention(hidden_size={}, num_heads={}, num_kv_heads={}, head_dim={}, group_sizes=({}), "
      "ratios=({}), kv_fraction={:.4g}, bias={}, aux_loss={}, aux_alpha={}, prefill_routing={})",
      o.hidden_size(), o.num_heads(), o.num_kv_heads(), head_dim_, fmt::join(o.group_sizes(), ", "),
      fmt::join(o.ratios(), ", "), kv_fraction(), o.bias(), o.aux_loss(), o.aux_alpha(), o.prefill_routing());
}

double MixSGAAttentionImpl::kv_fraction() const { return ops::kv_fraction(options.group_sizes(), options.ratios()); }

std::tuple<torch::Tensor, torch::Tensor> MixSGAAttentionImpl::forward(const torch::Tensor& hidden_states,
                                                                      const std::optional<torch::Tensor>& attention_mask,
                                                                      const std::optional<torch::Tensor>& position_ids) {
  auto result = forward_with_routing(hidden_states, attention_mask, position_ids);
  return {result.output, result.aux_loss};
}

MixSGAForwardResult MixSGAAttentionImpl::forward_with_routing(const torch::Tensor& x,
                                                              const std::optional<torch::Tensor>& attention_mask,
                                                              const std::optional<torch::Tensor>& position_ids) {
  const auto& o = options;
  detail::check_floating(x, "hidden_states");
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(2) == o.hidden_size(),
                    fmt::format("hidden_states: expected shape [B, L, {}] (hidden_size), got {}", o.hidden_size(),
                                detail::shape_str(x.sizes())));
  TORCH_CHECK_TYPE(x.scalar_type() == q_proj->weight.scalar_type(),
                   fmt::format("hidden_states: expected the parameters' dtype {}, got {}",
                               c10::toString(q_proj->weight.scalar_type()), c10::toString(x.scalar_type())));
  TORCH_CHECK_VALUE(x.device() == q_proj->weight.device(),
                    fmt::format("hidden_states: expected the parameters' device {}, got {}",
                                q_proj->weight.device().str(), x.device().str()));
  const int64_t B = x.size(0), L = x.size(1), Hq = o.num_heads(), Hkv = o.num_kv_heads(), d = head_dim_;

  std::optional<torch::Tensor> valid;
  if (attention_mask.has_value() && attention_mask->defined()) {
    const auto& m = *attention_mask;
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == L,
                      fmt::format("attention_mask: expected a [B, L] = [{}, {}] 0/1 padding mask, got shape {}", B, L,
                                  detail::shape_str(m.sizes())));
    TORCH_CHECK_VALUE(m.device() == x.device(), fmt::format("attention_mask: expected device {}, got {}",
                                                            x.device().str(), m.device().str()));
    valid = m.ne(0);
  }
  torch::Tensor positions;
  if (position_ids.has_value() && position_ids->defined()) {
    positions = *position_ids;
    TORCH_CHECK_VALUE((positions.dim() == 2 && positions.size(0) == B && positions.size(1) == L) ||
                          (positions.dim() == 1 && positions.size(0) == L),
                      fmt::format("position_ids: expected shape [{}, {}] or [{}], got {}", B, L, L,
                                  detail::shape_str(positions.sizes())));
  } else if (valid.has_value()) {
    positions = (valid->to(torch::kLong).cumsum(1) - 1).clamp_min(0);
  } else {
    positions = torch::arange(L, x.options().dtype(torch::kLong));
  }

  const auto zero = torch::zeros({}, x.options().dtype(x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat));
  if (B == 0 || L == 0) {
    const auto none = torch::empty({B, L}, x.options().dtype(torch::kLong));
    return {torch::zeros_like(x), zero, none, none};
  }

  // Routing: hard decisions, no gradient; only the aux loss trains the router.
  const auto logits = router->forward(o.detach_router_input() ? x.detach() : x);
  const auto scores = torch::sigmoid(logits);
  const auto target = router->route(scores, valid);
  auto expert_idx = o.prefill_routing() == "argmax" ? router->argmax_route(scores) : target;
  const auto aux = o.aux_alpha() == 0.0 ? zero : router->aux_loss(logits, target, valid) * o.aux_alpha();

  auto [k, v] = kv->forward(x, expert_idx);                  // [B, L, Hkv, d], pooled per token
  auto q = q_proj->forward(x).view({B, L, Hq, d});
  q = apply_rope(q, positions, o.rope_theta()).transpose(1, 2);  // [B, Hq, L, d]
  k = apply_rope(k, positions, o.rope_theta()).transpose(1, 2);  // [B, Hkv, L, d]
  v = v.transpose(1, 2);

  std::optional<torch::Tensor> attn_mask;
  if (valid.has_value()) {
    // Causal AND key-is-real; the diagonal stays open so a padded query never sees an all-masked row (NaN).
    const auto causal = torch::ones({L, L}, x.options().dtype(torch::kBool)).tril();
    const auto diagonal = torch::eye(L, x.options().dtype(torch::kBool));
    attn_mask = (causal & (valid->view({B, 1, 1, L}) | diagonal)).contiguous();
  }
  const double dropout = is_training() ? o.attention_dropout() : 0.0;
  auto attn = at::scaled_dot_product_attention(q, k, v, attn_mask, dropout, /*is_causal=*/!attn_mask.has_value(),
                                               /*scale=*/std::nullopt, /*enable_gqa=*/Hq != Hkv);
  auto out = o_proj->forward(attn.transpose(1, 2).reshape({B, L, Hq * d}));
  return {out, aux, expert_idx, target};
}

}  // namespace mixsga::nn
