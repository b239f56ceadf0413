#pragma once
// hetero_cache_attention written with ATen ops, for devices without a hand kernel (registered for CUDA
// in src/ops/cuda/hetero_cache_attention_cuda.cpp; tests/cpp/test_cache.cpp checks it against the CPU
// kernel on CPU).
//
// Each pool is attended on its own, at its compact head count: the query heads that read compact head c
// of pool e are the consecutive heads [c * r_e, (c + 1) * r_e) with r_e = Hq / (Hkv / g_e), so q viewed as
// [B, Hkv/g_e, r_e * L, d] multiplies the pool [B, Hkv/g_e, T_e, d] directly (no repeat to Hkv heads).
// The pools' partial softmaxes (max, sum, weighted V) are merged by log-sum-exp, in float32 (float64
// for float64 inputs). Memory: one [B, Hq, L, T_e] score tensor per pool.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "ops/validation.h"

namespace mixsga::detail {

inline at::Tensor hetero_cache_attention_composite(const at::Tensor& q, const at::Tensor& query_positions,
                                                   at::TensorList k_pools, at::TensorList v_pools,
                                                   at::TensorList key_positions, const at::Tensor& lengths,
                                                   int64_t num_kv_heads, std::optional<double> scale) {
  const auto shapes = check_cache_attention_args(q, query_positions, k_pools, v_pools, key_positions, lengths, num_kv_heads);
  const int64_t B = shapes.batch, L = shapes.queries, Hq = shapes.query_heads, d = shapes.head_dim, E = shapes.experts;
  if (B * L * Hq * d == 0) return at::empty({B, L, Hq, d}, q.options());
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const double softmax_scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(d)));
  const double neg_inf = -std::numeric_limits<double>::infinity();
  const auto qa = q.to(acc_dtype).permute({0, 2, 1, 3}).mul(softmax_scale);  // [B, Hq, L, d]
  const auto qpos = query_positions.to(at::kLong);                          // [B, L]
  const auto len = lengths.to(q.device(), at::kLong);                       // [B, E]
  std::vector<at::Tensor> maxes, sums, accs;                                // [B, Hq, L] (x d)
  for (int64_t e = 0; e < E; ++e) {
    const int64_t capacity = k_pools[e].size(2), heads = k_pools[e].size(1), r = Hq / heads;
    if (capacity == 0) continue;
    const auto slots = at::arange(capacity, len.options());
    const auto stored = slots.unsqueeze(0) < len.select(1, e).unsqueeze(1);                         // [B, T]
    const auto keys = k_pools[e].to(acc_dtype);
    // Slots past a sequence's length are never read by the CPU kernel; here they meet a zero weight in
    // the matmul, and 0 * inf would be NaN, so whatever they hold (a cropped token) is zeroed first.
    const auto values = v_pools[e].to(acc_dtype).masked_fill(stored.logical_not().view({B, 1, capacity, 1}), 0.0);
    const auto causal = key_positions[e].to(at::kLong).unsqueeze(1) <= qpos.unsqueeze(2);         // [B, L, T]
    const auto visible = (stored.unsqueeze(1) & causal).view({B, 1, 1, L, capacity});
    auto scores = at::matmul(qa.reshape({B, heads, r * L, d}), keys.transpose(2, 3)).view({B, heads, r, L, capacity});
    scores = scores.masked_fill(visible.logical_not(), neg_inf);
    const auto m = scores.amax(-1, /*keepdim=*/true);              // -inf where nothing is visible
    const auto m_safe = m.masked_fill(m.eq(neg_inf), 0.0);          // exp(-inf - 0) = 0, not NaN
    const auto p = (scores - m_safe).exp();
    sums.push_back(p.sum(-1).reshape({B, Hq, L}));
    accs.push_back(at::matmul(p.view({B, heads, r * L, capacity}), values).reshape({B, Hq, L, d}));
    maxes.push_back(m.reshape({B, Hq, L}));
  }
  if (maxes.empty()) return at::zeros({B, L, Hq, d}, q.options());
  const auto top = at::stack(maxes).amax(0);
  const auto top_safe = top.masked_fill(top.eq(neg_inf), 0.0);
  auto denom = at::zeros_like(top);
  auto numer = at::zeros_like(accs.front());
  for (size_t i = 0; i < maxes.size(); ++i) {
    const auto w = (maxes[i] - top_safe).exp();  // 0 for a pool with nothing visible
    denom = denom + w * sums[i];
    numer = numer + w.unsqueeze(-1) * accs[i];
  }
  // A query that sees no stored token gets zeros, like the CPU kernel.
  const auto has_keys = denom.gt(0).unsqueeze(-1);
  const auto out = at::where(has_keys, numer / denom.clamp_min(std::numeric_limits<double>::min()).unsqueeze(-1), 0.0);
  return out.permute({0, 2, 1, 3}).to(q.scalar_type()).contiguous();
}

}  // namespace mixsga::detail
