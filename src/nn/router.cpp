#include "mixsga/nn/router.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/init.h>

#include <algorithm>
#include <cmath>
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

namespace {
void check_decode_offsets(const std::vector<double>& offsets, size_t experts) {
  TORCH_CHECK_VALUE(offsets.empty() || offsets.size() == experts,
                    fmt::format("decode_offsets: expected none or one per expert ({}), got {}", experts, offsets.size()));
  for (double v : offsets) {
    TORCH_CHECK_VALUE(std::isfinite(v), fmt::format("decode_offsets: must be finite, got [{}]", fmt::join(offsets, ", ")));
  }
}
}  // namespace

void ExpertChoiceRouterImpl::reset() {
  detail::check_positive(options.hidden_size(), "hidden_size");
  detail::check_ratios(options.ratios());
  detail::check_aux_loss_kind(options.aux_loss());
  check_decode_offsets(options.decode_offsets(), options.ratios().size());
  offsets_cache_ = torch::Tensor();
  proj = register_module("proj", torch::nn::Linear(torch::nn::LinearOptions(options.hidden_size(), num_experts())));
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_normal_(proj->weight);  // He init (fan_in, gain sqrt(2)), METHOD.md step 1
  proj->bias.zero_();
}

void ExpertChoiceRouterImpl::pretty_print(std::ostream& stream) const {
  stream << fmt::format("mixsga::nn::ExpertChoiceRouter(hidden_size={}, experts={}, ratios=({}), aux_loss={}",
                        options.hidden_size(), num_experts(), fmt::join(options.ratios(), ", "), options.aux_loss());
  if (!options.decode_offsets().empty()) {
    stream << fmt::format(", decode_offsets=({:.4g})", fmt::join(options.decode_offsets(), ", "));
  }
  stream << ")";
}

void ExpertChoiceRouterImpl::set_routing(std::vector<double> ratios, std::vector<double> decode_offsets) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(ratios.size()) == num_experts(),
                    fmt::format("ratios: expected one per expert ({}), got {}", num_experts(), ratios.size()));
  detail::check_ratios(ratios);
  check_decode_offsets(decode_offsets, ratios.size());
  options.ratios(std::move(ratios));
  options.decode_offsets(std::move(decode_offsets));
  offsets_cache_ = torch::Tensor();
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
  const auto& offsets = options.decode_offsets();
  if (offsets.empty()) return argmax_routing(scores, options.ratios());
  if (!offsets_cache_.defined() || offsets_cache_.scalar_type() != scores.scalar_type() ||
      offsets_cache_.device() != scores.device()) {
    offsets_cache_ = torch::tensor(offsets, torch::kDouble).to(scores.options());
  }
  return argmax_routing(scores, options.ratios(), offsets_cache_);
}

torch::Tensor argmax_routing(const torch::Tensor& scores, const std::vector<double>& ratios,
                             const torch::Tensor& offsets) {
  // argmax returns the first maximum, so ties go to the finer expert, as in expert choice. NaN ranks
  // lowest, as in expert choice (torch.argmax would pick it). An expert with ratio 0 has no capacity and
  // is never chosen: a token whose every open score is NaN goes to the finest expert with capacity.
  auto s = scores.detach();
  if (offsets.defined()) s = s + offsets;  // NaN + offset stays NaN; zero offsets change nothing
  auto ranked = at::where(s.isnan(), -std::numeric_limits<double>::infinity(), s);
  const int64_t E = static_cast<int64_t>(ratios.size());
  std::vector<int64_t> closed;
  int64_t first_open = -1;
  for (int64_t e = 0; e < E; ++e) {
    if (ratios[e] == 0.0) closed.push_back(e);
    else if (first_open < 0) first_open = e;
  }
  if (closed.empty()) return ranked.argmax(-1);
  const auto closed_idx = torch::tensor(closed, s.options().dtype(torch::kLong));
  ranked.index_fill_(-1, closed_idx, -std::numeric_limits<double>::infinity());
  const auto idx = ranked.argmax(-1);
  auto is_closed = torch::zeros({E}, s.options().dtype(torch::kBool));
  is_closed.index_fill_(0, closed_idx, true);
  return at::where(is_closed.index({idx}), torch::full_like(idx, first_open), idx);
}

std::vector<double> fit_decode_offsets(const torch::Tensor& scores, const std::vector<double>& ratios) {
  const int64_t E = static_cast<int64_t>(ratios.size());
  detail::check_ratios(ratios);
  detail::check_floating(scores, "scores");
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(1) == E,
                    fmt::format("scores: expected [N, {}] (one row of router scores per calibration token), got {}",
                                E, detail::shape_str(scores.sizes())));
  const int64_t N = scores.size(0);
  TORCH_CHECK_VALUE(N >= 100 * E, fmt::format("scores: {} calibration tokens are too few to fit the decode offsets of "
                                              "{} experts; give at least {} (100 per expert)", N, E, 100 * E));
  const auto s = scores.detach().to(torch::kCPU, torch::kDouble);
  const auto target = torch::tensor(ratios, torch::kDouble);
  auto open = target.gt(0.0);
  int64_t first_open = 0;
  while (ratios[first_open] == 0.0) ++first_open;
  // Finite score range: the scale of a useful offset (sigmoid scores lie in [0, 1]).
  const auto finite = s.masked_select(s.isfinite());
  double step = finite.numel() > 0 ? std::max(0.5 * (finite.max() - finite.min()).item<double>(), 1e-3) : 1.0;
  auto offsets = torch::zeros({E}, torch::kDouble);
  auto best = offsets.clone();
  double best_err = std::numeric_limits<double>::infinity();
  for (int iter = 0; iter < 600; ++iter) {
    const auto idx = argmax_routing(s, ratios, offsets);
    const auto share = torch::bincount(idx, {}, E).to(torch::kDouble) / static_cast<double>(N);
    const double err = (share - target).abs().max().item<double>();
    if (err < best_err) {
      best_err = err;
      best = offsets.clone();
    }
    if (err <= 0.5 / static_cast<double>(N)) break;
    offsets = offsets + step * (target - share) * open.to(torch::kDouble);
    offsets = offsets - offsets[first_open];  // only differences matter: pin the finest open expert at 0
    step *= 0.985;
  }
  const auto b = best.contiguous();
  return std::vector<double>(b.data_ptr<double>(), b.data_ptr<double>() + E);
}

std::vector<double> ratios_for_budget(const std::vector<int64_t>& group_sizes, const std::vector<double>& ratios,
                                      double budget) {
  detail::check_ratios(ratios, static_cast<int64_t>(group_sizes.size()));
  const double lo = 1.0 / static_cast<double>(group_sizes.back());
  const double hi = 1.0 / static_cast<double>(group_sizes.front());
  TORCH_CHECK_VALUE(std::isfinite(budget) && budget >= lo - 1e-12 && budget <= hi + 1e-12,
                    fmt::format("budget: must be in [{:.6g}, {:.6g}] (all tokens in the coarsest expert .. all in the "
                                "finest) for group sizes ({}), got {}", lo, hi, fmt::join(group_sizes, ", "), budget));
  const double trained = mixsga::kv_fraction(group_sizes, ratios);
  std::vector<double> out(ratios);
  const size_t edge = budget < trained ? group_sizes.size() - 1 : 0;  // mix with all-coarsest or all-finest
  const double extreme = budget < trained ? lo : hi;
  const double t = std::abs(trained - extreme) < 1e-15 ? 1.0 : (budget - extreme) / (trained - extreme);
  for (size_t e = 0; e < out.size(); ++e) out[e] = t * ratios[e] + (e == edge ? 1.0 - t : 0.0);
  return out;
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
  detail::OptionRecord record{{"hidden_size", fmt::format("{}", o.hidden_size())},
                              {"ratios", fmt::format("[{}]", fmt::join(o.ratios(), ", "))},
                              {"aux_loss", o.aux_loss()}};
  // Recorded only when set, so checkpoints written before decode offsets existed still load.
  if (!o.decode_offsets().empty()) {
    record.emplace_back("decode_offsets", fmt::format("[{}]", fmt::join(o.decode_offsets(), ", ")));
  }
  return record;
}
}  // namespace

void ExpertChoiceRouterImpl::save(torch::serialize::OutputArchive& archive) const {
  detail::save_with_options(*this, archive, "ExpertChoiceRouter", option_record(options));
}

void ExpertChoiceRouterImpl::load(torch::serialize::InputArchive& archive) {
  detail::load_with_options(*this, archive, "ExpertChoiceRouter", option_record(options));
}

}  // namespace mixsga::nn
