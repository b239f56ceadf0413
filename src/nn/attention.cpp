#include "mixsga/nn/attention.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

#include "mixsga/nn/rope.h"
#include "mixsga/ops.h"
#include "nn/module_checks.h"
#include "nn/option_record.h"
#include "ops/validation.h"

namespace mixsga::nn {
namespace {
/// aux_in_backward: returns the layer's output unchanged; backward passes its gradient through and sends
/// `scale` to the aux loss, so whatever loss reaches the output also trains the router (once: the layer
/// then returns the aux loss detached). The Python twin is mixsga/nn/aux_gradient.py.
struct AuxGradient : torch::autograd::Function<AuxGradient> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& output,
                               const torch::Tensor& aux, double scale) {
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["aux_like"] = torch::empty({}, aux.options());  // dtype and device of d aux
    return output.view_as(output);  // no copy; autograd gives the alias this node as its history
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto like = ctx->saved_data["aux_like"].toTensor();
    return {grads[0], torch::full({}, ctx->saved_data["scale"].toDouble(), like.options()), torch::Tensor()};
  }
};
}  // namespace

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
  TORCH_CHECK_VALUE(std::isfinite(o.rope_theta()) && o.rope_theta() > 0.0,
                    fmt::format("rope_theta: must be finite and > 0, got {}", o.rope_theta()));
  detail::check_key_scale(o.key_scale());
  detail::check_routing_signal(o.routing_signal());

  const int64_t D = o.hidden_size(), Hq = o.num_heads(), d = head_dim_;
  q_proj = register_module("q_proj", torch::nn::Linear(torch::nn::LinearOptions(D, Hq * d).bias(o.bias())));
  kv = SharedGroupKV(SharedGroupKVOptions(D, o.num_kv_heads(), d).group_sizes(o.group_sizes()).bias(o.bias()));
  k_proj = register_module("k_proj", kv->k_proj);
  v_proj = register_module("v_proj", kv->v_proj);
  o_proj = register_module("o_proj", torch::nn::Linear(torch::nn::LinearOptions(Hq * d, D).bias(o.bias())));
  router = register_module(
      "router", ExpertChoiceRouter(
                    ExpertChoiceRouterOptions(D, o.ratios()).aux_loss(o.aux_loss()).decode_offsets(o.decode_offsets())));
  if (o.key_scale() == "learned") {
    key_log_scale = register_parameter("key_log_scale", torch::zeros({static_cast<int64_t>(o.group_sizes().size())}));
  }
}

void MixSGAAttentionImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  stream << fmt::format(
      "mixsga::nn::MixSGAAttention(hidden_size={}, num_heads={}, num_kv_heads={}, head_dim={}, group_sizes=({}), "
      "ratios=({}), kv_fraction={:.4g}, bias={}, aux_loss={}, aux_alpha={}, prefill_routing={}, key_scale={}, "
      "routing_signal={}, aux_in_backward={})",
      o.hidden_size(), o.num_heads(), o.num_kv_heads(), head_dim_, fmt::join(o.group_sizes(), ", "),
      fmt::join(o.ratios(), ", "), kv_fraction(), o.bias(), o.aux_loss(), o.aux_alpha(), o.prefill_routing(),
      o.key_scale(), o.routing_signal(), o.aux_in_backward());
}

double MixSGAAttentionImpl::kv_fraction() const { return mixsga::kv_fraction(options.group_sizes(), options.ratios()); }

void MixSGAAttentionImpl::set_routing(std::vector<double> ratios, std::vector<double> decode_offsets) {
  detail::check_ratios(ratios, static_cast<int64_t>(options.group_sizes().size()));
  router->set_routing(ratios, decode_offsets);  // checks the offsets; changes nothing when it throws
  options.ratios(std::move(ratios));
  options.decode_offsets(std::move(decode_offsets));
}

torch::Tensor MixSGAAttentionImpl::key_scales() const {
  const auto& w = q_proj->weight;
  if (options.key_scale() == "group") return torch::tensor(options.group_sizes(), w.options().dtype(torch::kDouble)).to(w.scalar_type());
  if (options.key_scale() == "learned") return key_log_scale.to(w.scalar_type()).exp();
  return {};
}

torch::Tensor MixSGAAttentionImpl::importance(const torch::Tensor& x, const torch::Tensor& scores) {
  if (options.routing_signal() == "router") return scores;
  // Every expert's column = the token's K/V pooling error at the coarsest expert that has capacity, so
  // expert choice gives the finest expert the tokens pooling damages most (docs/METHOD.md, E2).
  int64_t group = 1;
  for (size_t e = 0; e < options.ratios().size(); ++e) {
    if (options.ratios()[e] > 0.0) group = std::max(group, options.group_sizes()[e]);
  }
  torch::NoGradGuard no_grad;
  const int64_t B = x.size(0), L = x.size(1), d = head_dim_;
  const auto acc = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  const auto kv = torch::cat({k_proj->forward(x.detach()), v_proj->forward(x.detach())}, -1)
                      .view({B, L, -1, group, d})
                      .to(acc);
  const auto err = (kv - kv.mean(3, /*keepdim=*/true)).square().sum({2, 3, 4});
  return err.unsqueeze(-1).expand({B, L, static_cast<int64_t>(options.group_sizes().size())}).contiguous();
}

std::tuple<torch::Tensor, torch::Tensor> MixSGAAttentionImpl::forward(const torch::Tensor& hidden_states,
                                                                      const std::optional<torch::Tensor>& attention_mask,
                                                                      const std::optional<torch::Tensor>& position_ids,
                                                                      HeteroKVCache* cache, int64_t layer,
                                                                      const std::optional<RopeAngles>& rope) {
  auto result = forward_with_routing(hidden_states, attention_mask, position_ids, cache, layer, rope);
  return {result.output, result.aux_loss};
}

HeteroKVCacheOptions MixSGAAttentionImpl::cache_options(int64_t num_layers) const {
  HeteroKVCacheOptions o;
  o.num_layers = num_layers;
  o.num_kv_heads = options.num_kv_heads();
  o.head_dim = head_dim_;
  o.group_sizes = options.group_sizes();
  o.dtype = q_proj->weight.scalar_type();
  o.device = q_proj->weight.device();
  return o;
}

MixSGAAttentionImpl::Inputs MixSGAAttentionImpl::check_inputs(const torch::Tensor& x,
                                                              const std::optional<torch::Tensor>& attention_mask,
                                                              const std::optional<torch::Tensor>& position_ids,
                                                              const HeteroKVCache* cache, int64_t layer) const {
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
  const int64_t B = x.size(0), L = x.size(1);
  Inputs in;
  if (attention_mask.has_value() && attention_mask->defined()) {
    const auto& m = *attention_mask;
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == L,
                      fmt::format("attention_mask: expected a [B, L] = [{}, {}] 0/1 padding mask, got shape {}", B, L,
                                  detail::shape_str(m.sizes())));
    TORCH_CHECK_VALUE(m.device() == x.device(), fmt::format("attention_mask: expected device {}, got {}",
                                                            x.device().str(), m.device().str()));
    TORCH_CHECK_TYPE(!at::isFloatingType(m.scalar_type()) && !at::isComplexType(m.scalar_type()),
                     fmt::format("attention_mask: expected a bool or integer 0/1 mask, got {}",
                                 detail::dtype_name(m.scalar_type())));
    in.valid = m.ne(0);
    if (B > 0 && L > 0) {
      const auto bad = (m.ne(0) & m.ne(1)).nonzero();
      if (bad.numel() > 0) {
        const int64_t b = bad[0][0].item<int64_t>(), t = bad[0][1].item<int64_t>();
        TORCH_CHECK_VALUE(false, fmt::format("attention_mask: must hold only 0 and 1, got {} at [{}, {}]",
                                             m[b][t].item<int64_t>(), b, t));
      }
      const auto empty = in.valid->sum(1).eq(0).nonzero();
      TORCH_CHECK_VALUE(empty.numel() == 0,
                        fmt::format("attention_mask: sequence {} has no valid token (all padding); every sequence "
                                    "needs at least one",
                                    empty.numel() ? empty[0][0].item<int64_t>() : -1));
    }
  }
  int64_t past_batch = 0;
  if (cache != nullptr) {
    const auto& c = cache->options();
    TORCH_CHECK_VALUE(c.num_kv_heads == o.num_kv_heads() && c.head_dim == head_dim_ && c.group_sizes == o.group_sizes(),
                      fmt::format("cache: built for num_kv_heads={}, head_dim={}, group_sizes=({}), but the layer has "
                                  "num_kv_heads={}, head_dim={}, group_sizes=({})",
                                  c.num_kv_heads, c.head_dim, fmt::join(c.group_sizes, ", "), o.num_kv_heads(), head_dim_,
                                  fmt::join(o.group_sizes(), ", ")));
    TORCH_CHECK_INDEX(layer >= 0 && layer < c.num_layers,
                      fmt::format("layer: must be in [0, {}) (the cache's num_layers), got {}", c.num_layers, layer));
    past_batch = cache->batch_size();
    TORCH_CHECK_VALUE(past_batch == 0 || past_batch == B,
                      fmt::format("hidden_states: batch size {} does not match the cache's batch size {}", B, past_batch));
  }
  if (position_ids.has_value() && position_ids->defined()) {
    in.positions = *position_ids;
    TORCH_CHECK_TYPE(at::isIntegralType(in.positions.scalar_type(), false),
                     fmt::format("position_ids: expected an integer dtype, got {}", detail::dtype_name(in.positions.scalar_type())));
    TORCH_CHECK_VALUE((in.positions.dim() == 2 && in.positions.size(0) == B && in.positions.size(1) == L) ||
                          (in.positions.dim() == 1 && in.positions.size(0) == L),
                      fmt::format("position_ids: expected shape [{}, {}] or [{}], got {}", B, L, L,
                                  detail::shape_str(in.positions.sizes())));
  } else {
    const auto long_opts = x.options().dtype(torch::kLong);
    in.positions = in.valid.has_value() ? (in.valid->to(torch::kLong).cumsum(1) - 1).clamp_min(0)
                                        : torch::arange(L, long_opts);
    if (past_batch > 0) in.positions = in.positions + cache->next_positions(layer).to(x.device()).unsqueeze(1);
  }
  return in;
}

MixSGAForwardResult MixSGAAttentionImpl::forward_with_routing(const torch::Tensor& x,
                                                              const std::optional<torch::Tensor>& attention_mask,
                                                              const std::optional<torch::Tensor>& position_ids,
                                                              HeteroKVCache* cache, int64_t layer,
                                                              const std::optional<RopeAngles>& rope) {
  const auto& o = options;
  auto in = check_inputs(x, attention_mask, position_ids, cache, layer);
  in.rope = rope;
  if (!in.rope.has_value() && x.size(0) > 0 && x.size(1) > 0) {
    // The layer's own RoPE: angles computed once for q and k (and every compact key).
    in.rope = rope_angles(in.positions.to(x.device()), head_dim_, o.rope_theta(), x.scalar_type());
  }
  const int64_t B = x.size(0), L = x.size(1);
  const auto zero = torch::zeros({}, x.options().dtype(x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat));
  if (B == 0 || L == 0) {
    const auto none = torch::empty({B, L}, x.options().dtype(torch::kLong));
    return {torch::zeros_like(x), zero, none, none};
  }
  const bool cache_was_empty = cache == nullptr || cache->batch_size() == 0 || cache->max_seq_length(layer) == 0;

  // Routing: hard decisions, no gradient; only the aux loss trains the router.
  const auto logits = router->forward(o.detach_router_input() ? x.detach() : x);
  const auto scores = torch::sigmoid(logits);
  if (!cache_was_empty) {
    // Decode / continuation: causal argmax routing; expert choice over a few new tokens means nothing.
    // The cache's kv_cap (if any) moves tokens to coarser experts before their K/V are projected.
    const auto idx = cache->cap_routing(layer, router->argmax_route(scores), in.valid);
    return {attend(x, idx, in, cache, layer, false), zero, idx, idx};
  }
  const auto target = router->route(importance(x, scores), in.valid);
  auto expert_idx = o.prefill_routing() == "argmax" ? router->argmax_route(scores) : target;
  if (cache != nullptr) expert_idx = cache->cap_routing(layer, expert_idx, in.valid);
  const auto aux = o.aux_alpha() == 0.0 ? zero : router->aux_loss(logits, target, in.valid) * o.aux_alpha();
  auto out = attend(x, expert_idx, in, cache, layer, true);
  if (o.aux_in_backward() && aux.requires_grad()) {
    return {AuxGradient::apply(out, aux, o.aux_backward_scale()), aux.detach(), expert_idx, target};
  }
  return {out, aux, expert_idx, target};
}

torch::Tensor MixSGAAttentionImpl::forward_routed(const torch::Tensor& x, const torch::Tensor& expert_idx,
                                                  const std::optional<torch::Tensor>& attention_mask,
                                                  const std::optional<torch::Tensor>& position_ids) {
  const auto in = check_inputs(x, attention_mask, position_ids, nullptr, 0);
  detail::check_expert_idx(expert_idx, x.sizes().slice(0, 2), static_cast<int64_t>(options.group_sizes().size()),
                           x.device());
  if (x.size(0) == 0 || x.size(1) == 0) return torch::zeros_like(x);
  return attend(x, expert_idx.to(torch::kLong), in, nullptr, 0, true);
}

torch::Tensor MixSGAAttentionImpl::attend(const torch::Tensor& x, const torch::Tensor& expert_idx, const Inputs& in,
                                          HeteroKVCache* cache, int64_t layer, bool cache_was_empty) {
  const auto& o = options;
  const int64_t B = x.size(0), L = x.size(1), Hq = o.num_heads(), Hkv = o.num_kv_heads(), d = head_dim_;
  const auto q = rotate(q_proj->forward(x).view({B, L, Hq, d}), in);
  if (!cache_was_empty) return o_proj->forward(attend_cached(x, q, expert_idx, in, *cache, layer).reshape({B, L, Hq * d}));

  auto [k, v] = kv->forward(x, expert_idx);                      // [B, L, Hkv, d], pooled per token
  if (o.key_scale() != "none") k = k * key_scales().index({expert_idx}).view({B, L, 1, 1});  // E1; V never scaled
  k = rotate(k, in);
  // A prefill stores what it attends with (the group means of the expanded K/V are the compact heads).
  if (cache != nullptr) cache->append(layer, k.detach(), v.detach(), expert_idx, in.valid, false, in.positions);

  // No dropout with a cache (inference), as in the Python layer.
  const double dropout = is_training() && cache == nullptr ? o.attention_dropout() : 0.0;
  std::optional<torch::Tensor> attn_mask;
  if (in.valid.has_value()) {
    // Causal AND key-is-real; the diagonal stays open so a padded query never sees an all-masked row (NaN).
    const auto causal = torch::ones({L, L}, x.options().dtype(torch::kBool)).tril();
    const auto diagonal = torch::eye(L, x.options().dtype(torch::kBool));
    attn_mask = (causal & (in.valid->view({B, 1, 1, L}) | diagonal)).contiguous();
  }
  const auto attn = at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask,
                                                     dropout, /*is_causal=*/!attn_mask.has_value(),
                                                     /*scale=*/std::nullopt, /*enable_gqa=*/Hq != Hkv)
                        .transpose(1, 2);
  return o_proj->forward(attn.reshape({B, L, Hq * d}));
}

torch::Tensor MixSGAAttentionImpl::rotate(const torch::Tensor& t, const Inputs& in) const {
  if (!in.rope.has_value()) return apply_rope(t, in.positions, options.rope_theta());  // forward_routed
  const auto& [cos, sin] = *in.rope;
  return apply_rope_cos_sin(t, cos, sin);
}

torch::Tensor MixSGAAttentionImpl::attend_cached(const torch::Tensor& x, const torch::Tensor& q,
                                                 const torch::Tensor& expert_idx, const Inputs& in,
                                                 HeteroKVCache& cache, int64_t layer) {
  const auto& o = options;
  const int64_t B = x.size(0), L = x.size(1), Hkv = o.num_kv_heads();
  // Decode step or chunk after cached tokens: K/V projected, scaled and rotated at their compact size and
  // stored as they are; attention reads the compact pools. Nothing is expanded to Hkv heads.
  auto compact = kv->forward_compact(x.detach(), expert_idx, in.valid);
  // Each compact token is rotated by the angles of its own row.
  const auto flat = [&](const torch::Tensor& t) { return t.expand({B, L, t.size(-1)}).reshape({B * L, t.size(-1)}); };
  const auto& [cos, sin] = *in.rope;  // always set on this path (forward_with_routing)
  const auto cos_rows = flat(cos), sin_rows = flat(sin);
  const auto scales = key_scales();
  for (size_t e = 0; e < compact.keys.size(); ++e) {
    auto& k = compact.keys[e];
    if (k.size(0) == 0) continue;
    if (scales.defined()) k = k * scales[static_cast<int64_t>(e)].detach();  // E1; V never scaled
    const auto& rows = compact.rows[e];
    k = nn::rotate(k.unsqueeze(0), cos_rows.index_select(0, rows).unsqueeze(0), sin_rows.index_select(0, rows).unsqueeze(0))
            .squeeze(0);
  }
  cache.append_compact(layer, compact.keys, compact.values, expert_idx, in.valid, true, in.positions);
  if (L == 1) {
    return ops::hetero_decode_attention(q.select(1, 0), cache.keys(layer), cache.values(layer), cache.lengths(layer), Hkv)
        .unsqueeze(1);
  }
  // A chunk (chunked prefill, speculative verification): causal by the positions stored with the pools.
  const auto query_pos = in.positions.dim() == 1 ? in.positions.unsqueeze(0).expand({B, L}) : in.positions;
  return ops::hetero_cache_attention(q, query_pos, cache.keys(layer), cache.values(layer), cache.positions(layer),
                                     cache.lengths(layer), Hkv);
}

MixSGAAttentionImpl::RoutingAgreement MixSGAAttentionImpl::routing_agreement(
    const torch::Tensor& x, const std::optional<torch::Tensor>& attention_mask) {
  torch::NoGradGuard no_grad;
  const auto in = check_inputs(x, attention_mask, std::nullopt, nullptr, 0);
  const int64_t E = router->num_experts();
  const auto scores = router->scores(x);
  const auto argmax = router->argmax_route(scores);
  const auto choice = router->route(importance(x, scores), in.valid);  // what prefill routes by
  const auto valid = in.valid.has_value() ? *in.valid : torch::ones_like(argmax, torch::kBool);
  const double n = std::max<double>(1.0, valid.sum().item<double>());
  auto ratios = [&](const torch::Tensor& idx) {
    return torch::one_hot(idx.masked_select(valid), E).sum(0).to(torch::kDouble).cpu() / n;
  };
  return {(argmax == choice).masked_select(valid).sum().item<double>() / n, ratios(argmax), ratios(choice)};
}

}  // namespace mixsga::nn

namespace mixsga::nn {
namespace {
// aux_in_backward, aux_backward_scale: how the gradient is delivered, not the model, so not recorded.
detail::OptionRecord option_record(const MixSGAAttentionOptions& o) {
  detail::OptionRecord record{{"hidden_size", fmt::format("{}", o.hidden_size())},
          {"num_heads", fmt::format("{}", o.num_heads())},
          {"num_kv_heads", fmt::format("{}", o.num_kv_heads())},
          {"head_dim", fmt::format("{}", o.head_dim())},
          {"group_sizes", fmt::format("[{}]", fmt::join(o.group_sizes(), ", "))},
          {"ratios", fmt::format("[{}]", fmt::join(o.ratios(), ", "))},
          {"bias", fmt::format("{}", o.bias())},
          {"rope_theta", fmt::format("{}", o.rope_theta())},
          {"aux_loss", o.aux_loss()},
          {"aux_alpha", fmt::format("{}", o.aux_alpha())},
          {"prefill_routing", o.prefill_routing()},
          {"detach_router_input", fmt::format("{}", o.detach_router_input())},
          {"attention_dropout", fmt::format("{}", o.attention_dropout())},
          {"key_scale", o.key_scale()},
          {"routing_signal", o.routing_signal()}};
  // decode_offsets: recorded only when set (checkpoints written before they existed still load).
  if (!o.decode_offsets().empty()) {
    record.emplace_back("decode_offsets", fmt::format("[{}]", fmt::join(o.decode_offsets(), ", ")));
  }
  return record;
}
}  // namespace

void MixSGAAttentionImpl::save(torch::serialize::OutputArchive& archive) const {
  detail::save_with_options(*this, archive, "MixSGAAttention", option_record(options));
}

void MixSGAAttentionImpl::load(torch::serialize::InputArchive& archive) {
  detail::load_with_options(*this, archive, "MixSGAAttention", option_record(options));
}

}  // namespace mixsga::nn
