#include "mixsga/nn/router.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/init.h>

#include <limits>
#include <vector>

#include "mixsga/ops.h"
#include "nn/module_checks.h"
#include "nn/option_record.h"
#include "ops/validation.h"

namespace mixsga::nn {

ExpertChoiceRouterImpl::ExpertChoiceRouterImpl(ExpertChoiceRouterOptions options_) : options(std::move(options_)) {
  reset();
}

void ExpertChoiceRouterImpl::reset() {
  detail::check_positive(options.hidden_size(), "hidden_size");
  detail::check_ratios(options.ratios());
  detail::check_aux_loss_kind(options.aux_loss());
  proj = register_module("proj", torch::nn::Linear(torch::nn::LinearOptions(options.hidden_size(), num_experts())));
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_normal_(proj->weight);  // He init (fan_in, gain sqrt(2)), METHOD.md step 1
  proj->bias.zero_();
}

void ExpertChoiceRouterImpl::pretty_print(std::ostream& stream) const {
  stream << fmt::format("mixsga::nn::ExpertChoiceRouter(hidden_size={}, experts={}, ratios=({}), aux_loss={})",
                        options.hidden_size(), num_experts(), fmt::join(options.ratios(), ", "), options.aux_loss());
}

torch::Tensor ExpertChoiceRouterImpl::forward(const torch::Tensor& x) {
  detail::check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == options.hidden_size(),
                    fmt::format("x: expected last dim {} (hidden_size), got shape {}", options.hidden_size(),
                                detail::shape_str(x.sizes())));
  TORCH_CHECK_TYPE(x.scalar_type() == proj->weight.scalar_type(),
                   fmt::format("x: expected the parameters' dtype {}, got {}", c10::toString(proj->weight.scalar_type()),
                               c10::toString(x.scalar_type())));
  TORCH_CHECK_VALUE(x.device() == proj->weight.device(), fmt::format("x: expected the parameters' device {}, got {}",
                                                                     proj->weight.device().str(), x.device().str()));
  return proj->forward(x);
}

void ExpertChoiceRouterImpl::check_scores(const torch::Tensor& scores) const {
  detail::check_floating(scores, "scores");
  TORCH_CHECK_VALUE(scores.dim() >= 1 && scores.size(-1) == num_experts(),
                    fmt::format("scores: expected last dim {} (experts), got shape {}", num_experts(),
                                detail::shape_str(scores.sizes())));
}

torch::Tensor ExpertChoiceRouterImpl::scores(const torch::Tensor& x) { return torch::sigmoid(forward(x)); }

torch::Tensor ExpertChoiceRouterImpl::route(const torch::Tensor& scores, const std::optional<torch::Tensor>& valid_mask) const {
  check_scores(scores);
  return ops::route_expert_choice(scores.detach(), options.ratios(), valid_mask);
}

torch::Tensor ExpertChoiceRouterImpl::argmax_route(const torch::Tensor& scores) const {
  check_scores(scores);
  // argmax returns the first maximum, so ties go to the finer expert, as in expert choice. NaN ranks
  // lowest, as in expert choice (torch.argmax would pick it). An expert with ratio 0 has no capacity and
  // is never chosen: a token whose every open score is NaN goes to the finest expert with capacity.
  const auto s = scores.detach();
  auto ranked = at::where(s.isnan(), -std::numeric_limits<double>::infinity(), s);
  const auto& ratios = options.ratios();
  std::vector<int64_t> closed;
  int64_t first_open = -1;
  for (int64_t e = 0; e < num_experts(); ++e) {
    if (ratios[e] == 0.0) closed.push_back(e);
    else if (first_open < 0) first_open = e;
  }
  if (closed.empty()) return ranked.argmax(-1);
  const auto closed_idx = torch::tensor(closed, s.options().dtype(torch::kLong));
  ranked.index_fill_(-1, closed_idx, -std::numeric_limits<double>::infinity());
  const auto idx = ranked.argmax(-1);
  auto is_closed = torch::zeros({num_experts()}, s.options().dtype(torch::kBool));
  is_closed.index_fill_(0, closed_idx, true);
  return at::where(is_closed.index({idx}), torch::full_like(idx, first_open), idx);
}

torch::Tensor ExpertChoiceRouterImpl::aux_loss(const torch::Tensor& logits, const torch::Tensor& target,
                                               const std::optional<torch::Tensor>& valid_mask) const {
  namespace F = torch::nn::functional;
  const int64_t E = num_experts();
  detail::check_floating(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) == E,
                    fmt::format("logits: expected last dim {} (experts), got shape {}", E, detail::shape_str(logits.sizes())));
  detail::check_expert_idx(target, logits.sizes().slice(0, logits.dim() - 1), E, logits.device(), "target");
  const auto acc = logits.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  const auto z = logits.to(acc).reshape({-1, E});
  const auto t = target.reshape({-1}).to(torch::kLong);
  torch::Tensor per_token;
  if (options.aux_loss() == "sigmoid_ce") {
    per_token = F::cross_entropy(torch::sigmoid(z), t, F::CrossEntropyFuncOptions().reduction(torch::kNone));
  } else if (options.aux_loss() == "logit_ce") {
    per_token = F::cross_entropy(z, t, F::CrossEntropyFuncOptions().reduction(torch::kNone));
  } else {
    const auto one_hot = torch::one_hot(t, E).to(acc);
    per_token = F::binary_cross_entropy_with_logits(
                    z, one_hot, F::BinaryCrossEntropyWithLogitsFuncOptions().reduction(torch::kNone))
                    .mean(-1);
  }
  if (!valid_mask.has_value() || !valid_mask->defined()) return per_token.mean();
  TORCH_CHECK_VALUE(valid_mask->sizes().equals(target.sizes()),
                    fmt::format("valid_mask: expected shape {}, got {}", detail::shape_str(target.sizes()),
                                detail::shape_str(valid_mask->sizes())));
  const auto w = valid_mask->reshape({-1}).ne(0).to(acc);
  return (per_token * w).sum() / w.sum().clamp_min(1.0);
}

}  // namespace mixsga::nn

namespace mixsga::nn {
namespace {
detail::OptionRecord option_record(const ExpertChoiceRouterOptions& o) {
  return {{"hidden_size", fmt::format("{}", o.hidden_size())},
          {"ratios", fmt::format("[{}]", fmt::join(o.ratios(), ", "))},
          {"aux_loss", o.aux_loss()}};
}
}  // namespace

void ExpertChoiceRouterImpl::save(torch::serialize::OutputArchive& archive) const {
  detail::save_with_options(*this, archive, "ExpertChoiceRouter", option_record(options));
}

void ExpertChoiceRouterImpl::load(torch::serialize::InputArchive& archive) {
  detail::load_with_options(*this, archive, "ExpertChoiceRouter", option_record(options));
}

}  // namespace mixsga::nn
