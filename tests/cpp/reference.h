#pragma once
// Slow, obviously-correct references written straight from METHOD.md, used by the tests only.
// They share no code with the library.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <vector>

namespace mixsga::testing {

/// Step 2 of METHOD.md with a full sort per expert. scores [B, L, E], valid [B, L] bool.
inline torch::Tensor reference_route(const torch::Tensor& scores, const std::vector<double>& ratios,
                                     const torch::Tensor& valid) {
  const auto s = scores.to(torch::kDouble).contiguous();
  const int64_t B = s.size(0), L = s.size(1), E = s.size(2);
  auto out = torch::full({B, L}, E - 1, torch::kLong);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> remaining;
    for (int64_t t = 0; t < L; ++t)
      if (valid[b][t].item<bool>()) remaining.push_back(t);
    const int64_t n = static_cast<int64_t>(remaining.size());
    for (int64_t e = 0; e + 1 < E; ++e) {
      // ceil(rho * n), with the project's 1e-6 tolerance against float rounding.
      int64_t k = static_cast<int64_t>(std::ceil(ratios[e] * n - 1e-6));
      k = std::clamp<int64_t>(k, 0, static_cast<int64_t>(remaining.size()));
      auto key = [&](int64_t t) {
        const double v = s[b][t][e].item<double>();
        return std::isnan(v) ? -std::numeric_limits<double>::infinity() : v;
      };
      std::stable_sort(remaining.begin(), remaining.end(), [&](int64_t a, int64_t c) {
        const double va = key(a), vc = key(c);
        const bool na = std::isnan(s[b][a][e].item<double>()), nc = std::isnan(s[b][c][e].item<double>());
        if (na != nc) return nc;
        return va > vc;  // stable: equal scores keep position order, so the lower position wins
      });
      for (int64_t i = 0; i < k; ++i) out[b][remaining[i]] = e;
      remaining.erase(remaining.begin(), remaining.begin() + k);
      std::sort(remaining.begin(), remaining.end());
    }
  }
  return out;
}

/// Per-token mean of heads within groups of g_e, repeated back. kv [N, H, d], idx [N].
inline torch::Tensor reference_pool(const torch::Tensor& kv, const torch::Tensor& idx, const std::vector<int64_t>& groups) {
  auto out = torch::empty_like(kv);
  const int64_t N = kv.size(0), H = kv.size(1);
  for (int64_t t = 0; t < N; ++t) {
    const int64_t g = groups[idx[t].item<int64_t>()];
    for (int64_t j = 0; j < H / g; ++j) {
      const auto mean = kv[t].narrow(0, j * g, g).mean(0);
      for (int64_t h = j * g; h < (j + 1) * g; ++h) out[t][h] = mean;
    }
  }
  return out;
}

/// HF Llama RoPE written out per pair: for i < d/2, (x_i, x_{i+d/2}) rotated by pos * theta^(-2i/d).
/// x [B, L, H, d], positions [L].
inline torch::Tensor reference_rope(const torch::Tensor& x, const std::vector<int64_t>& positions, double theta) {
  auto out = x.clone();
  const int64_t L = x.size(1), d = x.size(3);
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t i = 0; i < d / 2; ++i) {
      const double angle = static_cast<double>(positions[t]) * std::pow(theta, -2.0 * i / d);
      const auto a = x.select(1, t).select(-1, i), b = x.select(1, t).select(-1, i + d / 2);
      out.select(1, t).select(-1, i).copy_(a * std::cos(angle) - b * std::sin(angle));
      out.select(1, t).select(-1, i + d / 2).copy_(b * std::cos(angle) + a * std::sin(angle));
    }
  }
  return out;
}

/// Plain causal GQA attention with explicit softmax: x [B, L, D]; wk/wv [Hkv*d, D] (already pooled for a
/// static GQA baseline). Returns [B, L, D].
inline torch::Tensor reference_gqa_attention(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& wk,
                                             const torch::Tensor& wv, const torch::Tensor& wo, int64_t Hq, int64_t d,
                                             double theta) {
  const int64_t B = x.size(0), L = x.size(1), Hkv = wk.size(0) / d;
  std::vector<int64_t> pos(L);
  std::iota(pos.begin(), pos.end(), 0);
  auto q = reference_rope(torch::matmul(x, wq.t()).view({B, L, Hq, d}), pos, theta).permute({0, 2, 1, 3});
  auto k = reference_rope(torch::matmul(x, wk.t()).view({B, L, Hkv, d}), pos, theta).permute({0, 2, 1, 3});
  auto v = torch::matmul(x, wv.t()).view({B, L, Hkv, d}).permute({0, 2, 1, 3});
  k = k.repeat_interleave(Hq / Hkv, 1);
  v = v.repeat_interleave(Hq / Hkv, 1);
  auto scores = torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(d));
  const auto future = torch::ones({L, L}, torch::kBool).triu(1);
  scores = scores.masked_fill(future, -std::numeric_limits<double>::infinity());
  const auto out = torch::matmul(torch::softmax(scores, -1), v);  // [B, Hq, L, d]
  return torch::matmul(out.permute({0, 2, 1, 3}).reshape({B, L, Hq * d}), wo.t());
}

/// Mean of consecutive groups of g heads of a [H*d, D] projection weight -> [(H/g)*d, D].
inline torch::Tensor reference_pool_weight(const torch::Tensor& w, int64_t g, int64_t d) {
  const int64_t H = w.size(0) / d;
  std::vector<torch::Tensor> rows;
  for (int64_t j = 0; j < H / g; ++j) {
    auto acc = torch::zeros({d, w.size(1)}, w.options());
    for (int64_t h = j * g; h < (j + 1) * g; ++h) acc += w.narrow(0, h * d, d);
    rows.push_back(acc / static_cast<double>(g));
  }
  return torch::cat(rows, 0);
}

/// Central finite differences of sum(f(inputs) * weights) vs autograd, in float64.
/// Returns the largest |analytic - numeric| over every element of every input that requires grad.
inline double max_gradient_error(const std::function<torch::Tensor(const std::vector<torch::Tensor>&)>& f,
                                 std::vector<torch::Tensor> inputs, double eps = 1e-6) {
  for (auto& t : inputs) t = t.detach().clone().to(torch::kDouble).requires_grad_(true);
  const auto probe = f(inputs);
  torch::manual_seed(1234);
  const auto weights = torch::randn_like(probe);
  (probe * weights).sum().backward();
  double worst = 0.0;
  torch::NoGradGuard no_grad;
  for (auto& t : inputs) {
    const auto analytic = t.grad().defined() ? t.grad().clone() : torch::zeros_like(t);
    auto flat = t.view({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const double old = flat[i].item<double>();
      flat[i] = old + eps;
      const double plus = (f(inputs) * weights).sum().item<double>();
      flat[i] = old - eps;
      const double minus = (f(inputs) * weights).sum().item<double>();
      flat[i] = old;
      const double numeric = (plus - minus) / (2 * eps);
      worst = std::max(worst, std::abs(numeric - analytic.view({-1})[i].item<double>()));
    }
  }
  return worst;
}

}  // namespace mixsga::testing
