// CPU kernel of route_expert_choice: one sequence per task (at::parallel_for over the batch).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/routing_capacity.h"
#include "ops/validation.h"

namespace mixsga::cpu {
namespace {

// Orders candidate positions best first: higher score, then lower position. NaN ranks below every
// number, so the order stays a strict weak ordering and a NaN never steals capacity from a number.
template <typename acc_t>
struct BestFirst {
  const acc_t* column;  // scores of one expert for one sequence, stride E
  int64_t stride;
  bool operator()(int64_t a, int64_t b) const {
    const acc_t sa = column[a * stride], sb = column[b * stride];
    const bool na = std::isnan(sa), nb = std::isnan(sb);
    if (na != nb) return nb;  // the non-NaN one first
    if (!na && sa != sb) return sa > sb;
    return a < b;
  }
};

template <typename scalar_t>
void route_one_sequence(const scalar_t* scores, const bool* valid, int64_t L, int64_t E,
                        c10::ArrayRef<double> ratios, int64_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> s(static_cast<size_t>(L * E));
  for (int64_t i = 0; i < L * E; ++i) s[i] = static_cast<acc_t>(scores[i]);

  std::vector<int64_t> free_positions;
  free_positions.reserve(L);
  for (int64_t t = 0; t < L; ++t) {
    out[t] = E - 1;  // padding and everything not taken by a finer expert
    if (valid[t]) free_positions.push_back(t);
  }
  const int64_t n = static_cast<int64_t>(free_positions.size());
  for (int64_t e = 0; e + 1 < E && !free_positions.empty(); ++e) {
    const int64_t k = std::min(detail::expert_capacity(ratios[e], n), static_cast<int64_t>(free_positions.size()));
    if (k == 0) continue;
    BestFirst<acc_t> better{s.data() + e, E};
    // The k best go to the front (in position order after the sort, which keeps the rest intact).
    std::nth_element(free_positions.begin(), free_positions.begin() + (k - 1), free_positions.end(), better);
    for (int64_t i = 0; i < k; ++i) out[free_positions[i]] = e;
    free_positions.erase(free_positions.begin(), free_positions.begin() + k);
  }
}

at::Tensor route_expert_choice_cpu(const at::Tensor& scores, c10::ArrayRef<double> ratios,
                                   const std::optional<at::Tensor>& valid_mask) {
  auto valid = detail::check_routing_args(scores, ratios, valid_mask);
  const int64_t B = scores.size(0), L = scores.size(1), E = scores.size(2);
  if (!valid.defined()) valid = at::ones({B, L}, scores.options().dtype(at::kBool));

  auto out = at::empty({B, L}, scores.options().dtype(at::kLong));
  if (B == 0 || L == 0) return out;
  const auto s = scores.contiguous();
  const std::vector<double> ratio_vec(ratios.begin(), ratios.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "route_expert_choice_cpu", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const bool* vp = valid.data_ptr<bool>();
    int64_t* op = out.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        route_one_sequence<scalar_t>(sp + b * L * E, vp + b * L, L, E, ratio_vec, op + b * L);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CPU, m) { m.impl("route_expert_choice", &route_expert_choice_cpu); }

}  // namespace mixsga::cpu
