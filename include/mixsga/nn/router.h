#pragma once
/// ExpertChoiceRouter: the per-layer router of mixSGA (METHOD.md steps 1-4).

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <optional>
#include <string>
#include <vector>

namespace mixsga::nn {

/// Options of ExpertChoiceRouter. The number of experts is ratios().size().
struct ExpertChoiceRouterOptions {
  ExpertChoiceRouterOptions(int64_t hidden_size, std::vector<double> ratios = {0.3, 0.1, 0.6})
      : hidden_size_(hidden_size), ratios_(std::move(ratios)) {}
  /// D: size of the router input (the attention input).
  TORCH_ARG(int64_t, hidden_size);
  /// Capacity ratio per expert, finest expert first; each in [0, 1], summing to 1. Default 3:1:6.
  TORCH_ARG(std::vector<double>, ratios);
  /// Aux loss kind: "sigmoid_ce" (CE with the post-sigmoid scores as logits, the paper's literal form),
  /// "logit_ce" (CE on the router logits) or "bce" (per-expert binary CE of the scores against the
  /// one-hot expert-choice target). Default "sigmoid_ce".
  TORCH_ARG(std::string, aux_loss) = "sigmoid_ce";
  /// Per-expert offsets added to the scores before the causal argmax (decode, and argmax prefill):
  /// fitted on calibration text (fit_decode_offsets) so that decoding realises `ratios`. Empty (default):
  /// no offsets, the paper's plain argmax.
  TORCH_ARG(std::vector<double>, decode_offsets) = {};
};

/// Linear(D, E) + sigmoid router. `proj.weight` [E, D] is Kaiming (He) initialised, `proj.bias` [E] is 0.
/// Routing decisions are hard (no gradient); only aux_loss trains the router.
class ExpertChoiceRouterImpl : public torch::nn::Cloneable<ExpertChoiceRouterImpl> {
 public:
  explicit ExpertChoiceRouterImpl(ExpertChoiceRouterOptions options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  /// Writes parameters, buffers and every option (include/mixsga/checkpoint.h), so torch::save keeps them.
  void save(torch::serialize::OutputArchive& archive) const override;
  /// Reads what save() wrote; different options, or missing, extra or differently shaped tensors, are a
  /// c10::ValueError naming the option or tensor with both values, and nothing is loaded.
  void load(torch::serialize::InputArchive& archive) override;

  /// Router logits x @ phi^T + beta: [*, D] -> [*, E].
  torch::Tensor forward(const torch::Tensor& x);
  /// Sigmoid scores S: [*, D] -> [*, E].
  torch::Tensor scores(const torch::Tensor& x);
  /// Expert-choice assignment from scores [B, L, E] and an optional [B, L] valid mask -> [B, L] int64.
  torch::Tensor route(const torch::Tensor& scores, const std::optional<torch::Tensor>& valid_mask = std::nullopt) const;
  /// Causal per-token routing: argmax over experts of scores [*, E] plus options().decode_offsets ->
  /// [*] int64 (ties and NaN as in expert choice: the finer expert wins a tie, NaN ranks lowest).
  torch::Tensor argmax_route(const torch::Tensor& scores) const;
  /// Replaces the capacity ratios (expert choice) and the decode offsets (causal argmax), e.g. to serve
  /// another KV budget without retraining. `decode_offsets` empty (no offsets) or one finite value per
  /// expert. Invalid values are a c10::ValueError naming the argument; nothing changes then.
  void set_routing(std::vector<double> ratios, std::vector<double> decode_offsets);
  /// Unscaled aux loss (the kind in options) of logits [B, L, E] against target expert indices [B, L],
  /// averaged over valid tokens. Returns a 0-dim tensor in float32 (float64 for float64 logits).
  torch::Tensor aux_loss(const torch::Tensor& logits, const torch::Tensor& target,
                         const std::optional<torch::Tensor>& valid_mask = std::nullopt) const;

  int64_t num_experts() const { return static_cast<int64_t>(options.ratios().size()); }

  ExpertChoiceRouterOptions options;
  torch::nn::Linear proj{nullptr};

 private:
  void check_scores(const torch::Tensor& scores) const;
  /// decode_offsets as a tensor of the scores' dtype and device, made once per (dtype, device): a decode
  /// step must not copy it from the host every time.
  mutable torch::Tensor offsets_cache_;
};
TORCH_MODULE(ExpertChoiceRouter);

/// Causal argmax routing of scores [*, E] under `ratios` (experts with ratio 0 are never chosen) and
/// per-expert `offsets` added first (empty: none) -> [*] int64. What ExpertChoiceRouter::argmax_route
/// computes; NaN ranks lowest, ties go to the finer expert.
torch::Tensor argmax_routing(const torch::Tensor& scores, const std::vector<double>& ratios,
                             const torch::Tensor& offsets = {});

/// Decode offsets [E] for which causal argmax routing of `scores` [N, E] (the router scores of N
/// calibration tokens, padding excluded) gives each expert as close to `ratios[e]` of the tokens as N
/// allows (price adjustment: an expert below its share gets a higher offset, with a shrinking step; the
/// best iterate is kept). The finest open expert's offset is 0. Experts with ratio 0 get 0 (never chosen).
/// Raises c10::ValueError for scores that are not [N, E] with N >= 100 * E (too few to estimate shares).
std::vector<double> fit_decode_offsets(const torch::Tensor& scores, const std::vector<double>& ratios);

/// Capacity ratios with KV budget `budget` (sum_e ratios[e] / group_sizes[e], a fraction of the full
/// cache) that keep the trained `ratios`' proportions as far as possible: mixed linearly with all-coarsest
/// (below the trained budget) or all-finest (above it). Raises c10::ValueError naming the budget and the
/// reachable range [1 / max group size, 1 / min group size] when it is outside.
std::vector<double> ratios_for_budget(const std::vector<int64_t>& group_sizes, const std::vector<double>& ratios,
                                      double budget);

}  // namespace mixsga::nn
