#pragma once
/// SharedGroupKV: the weight-shared K/V projections of all experts (METHOD.md step 5). It holds only
/// the layer's original W_k, W_v (and biases); expert e uses them pooled over groups of g_e heads.

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace mixsga::nn {

/// Options of SharedGroupKV.
struct SharedGroupKVOptions {
  SharedGroupKVOptions(int64_t hidden_size, int64_t num_kv_heads, int64_t head_dim)
      : hidden_size_(hidden_size), num_kv_heads_(num_kv_heads), head_dim_(head_dim) {}
  /// D: input size.
  TORCH_ARG(int64_t, hidden_size);
  /// Hkv: base number of KV heads (expert 0 with group size 1 keeps all of them).
  TORCH_ARG(int64_t, num_kv_heads);
  /// d: head dim.
  TORCH_ARG(int64_t, head_dim);
  /// Group size per expert, strictly increasing, each dividing num_kv_heads. Default (1, 2, 4).
  TORCH_ARG(std::vector<int64_t>, group_sizes) = std::vector<int64_t>{1, 2, 4};
  /// Whether k_proj / v_proj have biases. Default false.
  TORCH_ARG(bool, bias) = false;
};

/// The K/V of the valid tokens at their compact size (SharedGroupKV::forward_compact).
struct CompactKV {
  std::vector<torch::Tensor> keys;    ///< E tensors [N_e, Hkv/g_e, d]
  std::vector<torch::Tensor> values;  ///< E tensors [N_e, Hkv/g_e, d]
  std::vector<torch::Tensor> rows;    ///< E int64 tensors [N_e]: flat token index b * L + t, batch-major
};

/// k_proj, v_proj: Linear(D, Hkv * d). forward gives each token's K and V under its own expert.
class SharedGroupKVImpl : public torch::nn::Cloneable<SharedGroupKVImpl> {
 public:
  explicit SharedGroupKVImpl(SharedGroupKVOptions options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  /// Writes parameters, buffers and every option (include/mixsga/checkpoint.h), so torch::save keeps them.
  void save(torch::serialize::OutputArchive& archive) const override;
  /// Reads what save() wrote; different options, or missing, extra or differently shaped tensors, are a
  /// c10::ValueError naming the option or tensor with both values, and nothing is loaded.
  void load(torch::serialize::InputArchive& archive) override;

  /// @param x          [B, L, D].
  /// @param expert_idx [B, L] integer expert per token.
  /// @return (K, V), each [B, L, Hkv, d]: the expert's compact heads repeated back to Hkv heads. Both
  ///         are views (split on the head axis) of one [B, L, 2*Hkv, d] tensor, since K and V are
  ///         projected together; call .contiguous() if you need dense storage.
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x, const torch::Tensor& expert_idx);

  /// Each valid token's K and V at its expert's compact size, never expanded to Hkv heads: what the
  /// compact cache stores (HeteroKVCache::append_compact), for decode steps and chunks. Expert e projects
  /// its tokens with its pooled [W_k; W_v], so it reads (1/g_e) of the weights. Without autograd the pooled
  /// weights are kept between calls while the parameters are unchanged (same storage and version).
  /// @param x          [B, L, D].
  /// @param expert_idx [B, L] integer expert per token.
  /// @param valid      optional [B, L] bool mask: padding tokens are skipped.
  CompactKV forward_compact(const torch::Tensor& x, const torch::Tensor& expert_idx,
                            const std::optional<torch::Tensor>& valid = std::nullopt);

  /// The pooled weight and bias (bias undefined when bias=false) of expert e for K (`key=true`) or V:
  /// [(Hkv/g_e) * d, D] and [(Hkv/g_e) * d]. What the compact cache projects with.
  std::tuple<torch::Tensor, torch::Tensor> expert_weights(int64_t expert, bool key) const;

  SharedGroupKVOptions options;
  torch::nn::Linear k_proj{nullptr};
  torch::nn::Linear v_proj{nullptr};

 private:
  // Pooled [W_k; W_v] (and biases) per expert, for forward_compact without autograd; `key` is the
  // storage and version of every parameter they were pooled from.
  struct PooledWeights {
    std::vector<std::pair<const void*, uint32_t>> key;
    std::vector<std::pair<torch::Tensor, torch::Tensor>> experts;
  };
  const std::vector<std::pair<torch::Tensor, torch::Tensor>>& pooled_kv_weights();
  PooledWeights pooled_;
};
TORCH_MODULE(SharedGroupKV);

}  // namespace mixsga::nn
