// HeteroKVCache's hard per-sequence cap (kv_cap) and exact pool reservation (reserve), kept apart from the
// append / read paths in hetero_kv_cache.cpp.
//
// The cap is counted in integer units so that it holds exactly, with no rounding drift over long
// sequences: with u = lcm(group sizes), a token of expert e takes u / g_e units and a full token u, so n
// tokens may take at most floor(kv_cap * u * n) units.
//
// Why one fitting expert always exists (cap_routing never fails):
//  - without quotas, the coarsest expert fits: its u / g_max units are <= kv_cap * u, and the units
//    already stored are <= kv_cap * u * n, so the sum is <= kv_cap * u * (n + 1) and, being an integer,
//    <= its floor;
//  - with reserve()'s quotas, which hold max_length tokens in all and at most kv_cap * u * max_length units
//    when full: any expert with room whose unit count is <= kv_cap * u fits by the same argument. If every
//    expert with room takes more, the remaining tokens up to max_length must all go to such experts and fill
//    every pool, so the stored units plus the next token's plus more than kv_cap * u for each later token
//    add up to at most kv_cap * u * max_length; hence the next token's sum is below kv_cap * u * (n + 1).

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <numeric>
#include <string>

#include "mixsga/cache.h"
#include "ops/validation.h"

namespace mixsga {

int64_t HeteroKVCache::unit_of(int64_t expert) const { return unit_lcm_ / options_.group_sizes[expert]; }

int64_t HeteroKVCache::cap_units(int64_t tokens) const {
  if (options_.kv_cap <= 0.0) return tokens * unit_lcm_;
  // The tolerance absorbs the binary rounding of a cap like 0.3 (0.3 * 10 * 10 must allow 30 units).
  return static_cast<int64_t>(std::floor(options_.kv_cap * static_cast<double>(unit_lcm_ * tokens) + 1e-6));
}

bool HeteroKVCache::fits(const std::vector<int64_t>& counts, int64_t units, int64_t expert) const {
  if (!quota_.empty() && counts[expert] >= quota_[expert]) return false;
  const int64_t tokens = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  return units + unit_of(expert) <= cap_units(tokens + 1);
}

at::Tensor HeteroKVCache::cap_routing(int64_t layer, const at::Tensor& expert_idx,
                                      const std::optional<at::Tensor>& valid) const {
  check_layer(layer);
  TORCH_CHECK_VALUE(expert_idx.defined() && expert_idx.dim() == 2,
                    fmt::format("expert_idx: expected shape [B, L], got {}",
                                expert_idx.defined() ? detail::shape_str(expert_idx.sizes()) : "undefined"));
  if (options_.kv_cap <= 0.0 && quota_.empty()) return expert_idx;
  const int64_t B = expert_idx.size(0), L = expert_idx.size(1), E = num_experts();
  const auto routing = host_routing(B, L, expert_idx, valid);
  auto out = routing.expert_idx.clone();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const bool* vp = routing.valid.const_data_ptr<bool>();
  const bool stored = batch_ > 0;
  const int64_t* lp = stored ? layers_[layer].lengths.const_data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> counts(E);
  for (int64_t b = 0; b < B; ++b) {
    int64_t units = 0;
    for (int64_t e = 0; e < E; ++e) {
      counts[e] = stored ? lp[b * E + e] : 0;
      units += counts[e] * unit_of(e);
    }
    for (int64_t t = 0; t < L; ++t) {
      if (!vp[b * L + t]) continue;
      const int64_t wanted = op[b * L + t];
      int64_t chosen = -1;
      for (int64_t e = wanted; e < E && chosen < 0; ++e) chosen = fits(counts, units, e) ? e : -1;
      for (int64_t e = wanted - 1; e >= 0 && chosen < 0; --e) chosen = fits(counts, units, e) ? e : -1;
      // Only a sequence longer than reserve()'s max_length finds no expert; append() then names that error.
      if (chosen < 0) chosen = wanted;
      op[b * L + t] = chosen;
      ++counts[chosen];
      units += unit_of(chosen);
    }
  }
  return out.to(expert_idx.device());
}

void HeteroKVCache::reserve(int64_t batch, int64_t max_length, const std::vector<double>& ratios) {
  const auto& o = options_;
  const int64_t E = num_experts();
  TORCH_CHECK_VALUE(o.kv_cap > 0.0, "reserve: needs kv_cap (the budget the pools are sized for); without a cap any "
                                    "token may be stored at the finest expert, so no reservation below the full K/V "
                                    "is safe");
  TORCH_CHECK_VALUE(batch_ == 0, fmt::format("reserve: the cache holds {} sequence(s); reset() it first", batch_));
  TORCH_CHECK_VALUE(batch >= 1, fmt::format("batch: must be >= 1, got {}", batch));
  TORCH_CHECK_VALUE(max_length >= 1 && (o.max_tokens == 0 || max_length <= o.max_tokens),
                    fmt::format("max_length: must be in [1, {}], got {}",
                                o.max_tokens == 0 ? std::string("inf") : std::to_string(o.max_tokens), max_length));
  TORCH_CHECK_VALUE(static_cast<int64_t>(ratios.size()) == E,
                    fmt::format("ratios: expected one per expert ({}), got {}", E, ratios.size()));
  double sum = 0.0, budget = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(std::isfinite(ratios[e]) && ratios[e] >= 0.0,
                      fmt::format("ratios: must be finite and >= 0, got ({})", fmt::join(ratios, ", ")));
    sum += ratios[e];
    budget += ratios[e] / static_cast<double>(o.group_sizes[e]);
  }
  TORCH_CHECK_VALUE(std::abs(sum - 1.0) <= 1e-6, fmt::format("ratios: must sum to 1, got ({}) = {}",
                                                             fmt::join(ratios, ", "), sum));
  TORCH_CHECK_VALUE(budget <= o.kv_cap + 1e-9,
                    fmt::format("ratios: their KV budget {:.6g} exceeds kv_cap = {}; give ratios for the cap (e.g. "
                                "ratios_for_budget(group_sizes, ratios, kv_cap))", budget, o.kv_cap));
  std::vector<int64_t> quota(E, 0);
  int64_t finer = 0;
  for (int64_t e = 0; e + 1 < E; ++e) {
    quota[e] = static_cast<int64_t>(std::floor(ratios[e] * static_cast<double>(max_length) + 1e-9));
    finer += quota[e];
  }
  quota[E - 1] = max_length - finer;  // rounding moves tokens to the cheapest expert: the budget still holds
  const int bits = detail::expert_id_bits(E);
  const auto opts = at::TensorOptions().dtype(o.dtype).device(o.device);
  for (auto& l : layers_) {
    l.lengths = at::zeros({batch, E}, at::kLong);
    l.pools.assign(E, Pool{});
    for (int64_t e = 0; e < E; ++e) {
      if (quota[e] == 0) continue;
      const int64_t heads = o.num_kv_heads / o.group_sizes[e];
      l.pools[e] = Pool{at::zeros({batch, heads, quota[e], o.head_dim}, opts),
                        at::zeros({batch, heads, quota[e], o.head_dim}, opts)};
    }
    l.index.assign(batch, detail::ExpertStream(bits));
    for (auto& stream : l.index) stream.reserve(max_length);
  }
  batch_ = batch;
  quota_ = std::move(quota);
  reserved_length_ = max_length;
}

int64_t HeteroKVCache::worst_case_bytes(int64_t max_length, int64_t batch) const {
  TORCH_CHECK_VALUE(max_length >= 0, fmt::format("max_length: must be >= 0, got {}", max_length));
  TORCH_CHECK_VALUE(batch >= 0, fmt::format("batch: must be >= 0, got {}", batch));
  const auto& o = options_;
  const int64_t unit_bytes = 2 * (o.num_kv_heads / unit_lcm_) * o.head_dim * static_cast<int64_t>(c10::elementSize(o.dtype));
  const int64_t index_bytes = (max_length * detail::expert_id_bits(num_experts()) + 7) / 8;
  return o.num_layers * batch * (cap_units(max_length) * unit_bytes + index_bytes);
}

}  // namespace mixsga
