#pragma once
/// MixSGAAttention: a causal self-attention layer whose tokens are routed to weight-shared grouped
/// KV experts (METHOD.md). Drop-in for a Llama-style attention layer.

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "mixsga/cache.h"
#include "mixsga/nn/router.h"
#include "mixsga/nn/shared_group_kv.h"

namespace mixsga::nn {

/// Options of MixSGAAttention; names and defaults match mixsga.nn.MixSGAAttention in Python.
struct MixSGAAttentionOptions {
  MixSGAAttentionOptions(int64_t hidden_size, int64_t num_heads, int64_t num_kv_heads)
      : hidden_size_(hidden_size), num_heads_(num_heads), num_kv_heads_(num_kv_heads) {}
  /// D: model width.
  TORCH_ARG(int64_t, hidden_size);
  /// Hq: query heads.
  TORCH_ARG(int64_t, num_heads);
  /// Hkv: base KV heads; must divide num_heads.
  TORCH_ARG(int64_t, num_kv_heads);
  /// d: head dim; 0 (default) means hidden_size / num_heads, which must then divide evenly.
  TORCH_ARG(int64_t, head_dim) = 0;
  /// Group size per expert, finest first, strictly increasing, each dividing num_kv_heads. Default (1, 2, 4).
  TORCH_ARG(std::vector<int64_t>, group_sizes) = std::vector<int64_t>{1, 2, 4};
  /// Capacity ratio per expert, summing to 1. Default 3:1:6 (a 50 % KV budget with (1, 2, 4)).
  TORCH_ARG(std::vector<double>, ratios) = std::vector<double>{0.3, 0.1, 0.6};
  /// Biases on q/k/v/o projections. Default false (Llama).
  TORCH_ARG(bool, bias) = false;
  /// RoPE base. Default 10000.
  TORCH_ARG(double, rope_theta) = 10000.0;
  /// "sigmoid_ce" (default), "logit_ce" or "bce"; see ExpertChoiceRouterOptions::aux_loss.
  TORCH_ARG(std::string, aux_loss) = "sigmoid_ce";
  /// The layer returns aux_alpha * aux loss. Default 0.1.
  TORCH_ARG(double, aux_alpha) = 0.1;
  /// How the prompt is routed: "expert_choice" (default, capacity-exact, non-causal across the prompt)
  /// or "argmax" (per-token argmax, fully causal).
  TORCH_ARG(std::string, prefill_routing) = "expert_choice";
  /// Feed the router a detached input, so the aux loss trains only the router. Default false.
  TORCH_ARG(bool, detach_router_input) = false;
  /// Dropout on attention probabilities while training (not with a cache). Default 0.
  TORCH_ARG(double, attention_dropout) = 0.0;
  /// Extension E1 (docs/METHOD.md): how a pooled key is scaled. "none" (default, the paper), "group"
  /// (expert e's keys times g_e) or "learned" (times exp(key_log_scale[e]), a parameter [E] initialised
  /// at 0 = the paper). Values are never scaled; applied before the cache.
  TORCH_ARG(std::string, key_scale) = "none";
  /// Extension E2 (docs/METHOD.md): what expert choice ranks at training and prefill. "router" (default,
  /// the paper) or "pooling_error" (each token's K/V pooling error; also the aux-loss target, so the
  /// router's argmax, which routes decode, learns to predict it).
  TORCH_ARG(std::string, routing_signal) = "router";
  /// Deliver the aux loss through backward instead of returning it for the caller to add. Default false.
  /// When true (in a forward with gradients), the output passes through unchanged and, in backward, the
  /// router also receives aux_backward_scale * d(aux_alpha * L_aux), so any loss backpropagated through the
  /// layer trains the router; the returned aux loss is then detached (a value to log: adding it to the loss
  /// cannot count it twice). Not part of a checkpoint's options: it changes how the gradient is delivered,
  /// not the model.
  TORCH_ARG(bool, aux_in_backward) = false;
  /// Per-expert offsets added to the router scores before the causal argmax (decode routing, and the
  /// prefill with prefill_routing "argmax"); fitted on calibration text so that decoding realises `ratios`
  /// (mixsga::nn::fit_decode_offsets; Python: mixsga.hf.calibrate_decode_routing / set_kv_budget). Empty
  /// (default): none, the paper's plain argmax. Passed to the router; see set_routing.
  TORCH_ARG(std::vector<double>, decode_offsets) = {};
  /// With aux_in_backward, the factor of the aux gradient: what the training loop's loss normalisation
  /// implies, e.g. 1 / gradient-accumulation steps. Default 1. May be changed between steps
  /// (`layer->options.aux_backward_scale(s)`; Python: `set_aux_backward_scale(s)`).
  TORCH_ARG(double, aux_backward_scale) = 1.0;
};

/// (cos, sin), each [B, L, d] or [1, L, d]: rotary angles computed by the caller, for models whose RoPE
/// variant (scaled, YaRN, ...) makes its own (Hugging Face passes them as position_embeddings).
using RopeAngles = std::tuple<torch::Tensor, torch::Tensor>;

/// Everything a forward pass decided, for users who need more than (output, aux_loss).
struct MixSGAForwardResult {
  torch::Tensor output;      ///< [B, L, D]
  torch::Tensor aux_loss;    ///< 0-dim: aux_alpha * aux loss
  torch::Tensor expert_idx;  ///< [B, L] int64: the expert each token's K/V used
  torch::Tensor target_idx;  ///< [B, L] int64: the expert-choice assignment (the aux loss target)
};

/// Submodules: q_proj Linear(D, Hq*d), k_proj / v_proj Linear(D, Hkv*d) (shared by all experts),
/// o_proj Linear(Hq*d, D), router (ExpertChoiceRouter with proj Linear(D, E)).
class MixSGAAttentionImpl : public torch::nn::Cloneable<MixSGAAttentionImpl> {
 public:
  explicit MixSGAAttentionImpl(MixSGAAttentionOptions options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  /// Writes parameters, buffers and every option (include/mixsga/checkpoint.h), so torch::save keeps them.
  void save(torch::serialize::OutputArchive& archive) const override;
  /// Reads what save() wrote; different options, or missing, extra or differently shaped tensors, are a
  /// c10::ValueError naming the option or tensor with both values, and nothing is loaded.
  void load(torch::serialize::InputArchive& archive) override;

  /// @param hidden_states  [B, L, D].
  /// @param attention_mask optional [B, L] 0/1 padding mask (1 = real token). Padded keys are never
  ///                       attended to (nor stored in a cache); padded positions' outputs are finite but
  ///                       meaningless.
  /// @param position_ids   optional [B, L] or [L] positions; default arange(L), or cumsum(mask) - 1 when a
  ///                       mask is given (so left padding keeps positions starting at 0), offset by the
  ///                       cache's next_positions(layer). The cache stores them: a sequence's valid
  ///                       tokens must continue its stored positions one by one.
  /// @param cache          optional KV cache (inference). On an empty cache the call is a prefill: tokens
  ///                       are routed by `prefill_routing`, stored compactly, and attend as without a
  ///                       cache. On a non-empty cache tokens are routed by argmax (causal); a single
  ///                       token (L = 1) attends through hetero_decode_attention over the compact
  ///                       pools, a longer chunk through hetero_cache_attention over the compact pools;
  ///                       their K/V are projected at the compact size and stored with append_compact,
  ///                       never expanded to Hkv heads.
  /// @param layer          this layer's index in the cache.
  /// @param rope           optional (cos, sin) to rotate q and k with instead of the layer's own plain
  ///                       RoPE (rope_theta); position_ids / the defaults still give the positions the
  ///                       cache stores.
  /// @return (output [B, L, D], aux_loss 0-dim = aux_alpha * L_aux; 0 for calls on a non-empty cache).
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& hidden_states,
                                                   const std::optional<torch::Tensor>& attention_mask = std::nullopt,
                                                   const std::optional<torch::Tensor>& position_ids = std::nullopt,
                                                   HeteroKVCache* cache = nullptr, int64_t layer = 0,
                                                   const std::optional<RopeAngles>& rope = std::nullopt);

  /// forward() plus the routing decisions.
  MixSGAForwardResult forward_with_routing(const torch::Tensor& hidden_states,
                                           const std::optional<torch::Tensor>& attention_mask = std::nullopt,
                                           const std::optional<torch::Tensor>& position_ids = std::nullopt,
                                           HeteroKVCache* cache = nullptr, int64_t layer = 0,
                                           const std::optional<RopeAngles>& rope = std::nullopt);

  /// The layer with routing given instead of computed (teacher-forced routing, analysis, tests):
  /// expert_idx [B, L] integer. No cache. Returns the output [B, L, D].
  torch::Tensor forward_routed(const torch::Tensor& hidden_states, const torch::Tensor& expert_idx,
                               const std::optional<torch::Tensor>& attention_mask = std::nullopt,
                               const std::optional<torch::Tensor>& position_ids = std::nullopt);

  /// Routing quality on given text: the fraction of valid tokens whose argmax expert equals their
  /// expert-choice expert, and both assignments' per-expert ratios ([E] float64 each).
  struct RoutingAgreement {
    double agreement;
    torch::Tensor argmax_ratios, expert_choice_ratios;
  };
  RoutingAgreement routing_agreement(const torch::Tensor& hidden_states,
                                     const std::optional<torch::Tensor>& attention_mask = std::nullopt);

  /// A cache options object matching this layer (num_kv_heads, head_dim, group sizes, dtype, device).
  HeteroKVCacheOptions cache_options(int64_t num_layers = 1) const;

  /// KV budget of this layer relative to the base layer: sum_e ratios[e] / group_sizes[e].
  double kv_fraction() const;
  /// Replaces the capacity ratios (prefill expert choice) and decode offsets (causal argmax) of this layer
  /// and its router, e.g. to serve another KV budget without retraining (ratios_for_budget,
  /// fit_decode_offsets). `decode_offsets`: empty or one finite value per expert. Invalid values are a
  /// c10::ValueError naming the argument; nothing changes then.
  void set_routing(std::vector<double> ratios, std::vector<double> decode_offsets);
  /// The factor each expert's pooled keys are multiplied by ([E], the parameters' dtype); undefined for
  /// key_scale "none".
  torch::Tensor key_scales() const;
  int64_t head_dim() const { return head_dim_; }

  MixSGAAttentionOptions options;
  torch::nn::Linear q_proj{nullptr};
  torch::nn::Linear k_proj{nullptr};  ///< the same module as kv->k_proj
  torch::nn::Linear v_proj{nullptr};  ///< the same module as kv->v_proj
  torch::nn::Linear o_proj{nullptr};
  ExpertChoiceRouter router{nullptr};
  /// [E] log key scale per expert (key_scale "learned" only; undefined otherwise). Registered last.
  torch::Tensor key_log_scale;
  /// Not registered (its Linears are registered as k_proj / v_proj, so parameter names match the
  /// Python module and Hugging Face checkpoints).
  SharedGroupKV kv{nullptr};

 private:
  struct Inputs {
    std::optional<torch::Tensor> valid;  // [B, L] bool
    torch::Tensor positions;             // [B, L] or [L] int64
    std::optional<RopeAngles> rope;      // the caller's (cos, sin), if any
  };
  // q or k [B, L, H, d] rotated by the caller's angles or the layer's own RoPE at in.positions.
  torch::Tensor rotate(const torch::Tensor& t, const Inputs& in) const;
  Inputs check_inputs(const torch::Tensor& x, const std::optional<torch::Tensor>& attention_mask,
                      const std::optional<torch::Tensor>& position_ids, const HeteroKVCache* cache, int64_t layer) const;
  torch::Tensor importance(const torch::Tensor& x, const torch::Tensor& scores);
  torch::Tensor attend(const torch::Tensor& x, const torch::Tensor& expert_idx, const Inputs& in, HeteroKVCache* cache,
                       int64_t layer, bool cache_was_empty);
  // attend() on a non-empty cache: q [B, L, Hq, d] after RoPE -> attention output [B, L, Hq, d].
  torch::Tensor attend_cached(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& expert_idx,
                              const Inputs& in, HeteroKVCache& cache, int64_t layer);

  int64_t head_dim_ = 0;

 protected:
  // So AnyModule / Sequential can call forward(hidden_states) with the other arguments defaulted.
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(std::optional<torch::Tensor>())},
                           {2, torch::nn::AnyValue(std::optional<torch::Tensor>())},
                           {3, torch::nn::AnyValue(static_cast<HeteroKVCache*>(nullptr))},
                           {4, torch::nn::AnyValue(int64_t{0})},
                           {5, torch::nn::AnyValue(std::optional<RopeAngles>())})
};
TORCH_MODULE(MixSGAAttention);

}  // namespace mixsga::nn
