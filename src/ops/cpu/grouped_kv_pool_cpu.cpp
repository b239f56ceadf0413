// CPU kernel of grouped_kv_pool: parallel over tokens; each token averages its heads within its
// expert's groups (accumulating in float for bf16/fp16) and writes the mean back to every head of
// the group.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <torch/library.h>

#include <vector>

#include "ops/validation.h"

namespace mixsga::cpu {
namespace {

template <typename scalar_t>
void pool_token(const scalar_t* in, scalar_t* out, int64_t heads, int64_t d, int64_t g,
                at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  if (g == 1) {
    std::copy(in, in + heads * d, out);
    return;
  }
  const acc_t inv_g = acc_t(1) / static_cast<acc_t>(g);
  for (int64_t group = 0; group < heads / g; ++group) {
    const scalar_t* src = in + group * g * d;
    for (int64_t i = 0; i < d; ++i) acc[i] = static_cast<acc_t>(src[i]);
    for (int64_t h = 1; h < g; ++h) {
      const scalar_t* row = src + h * d;
      for (int64_t i = 0; i < d; ++i) acc[i] += static_cast<acc_t>(row[i]);
    }
    scalar_t* dst = out + group * g * d;
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(acc[i] * inv_g);
    for (int64_t h = 1; h < g; ++h) std::copy(dst, dst + d, dst + h * d);
  }
}

at::Tensor grouped_kv_pool_cpu(const at::Tensor& kv, const at::Tensor& expert_idx, c10::IntArrayRef group_sizes) {
  detail::check_grouped_kv_pool_args(kv, expert_idx, group_sizes);
  const int64_t heads = kv.size(-2), d = kv.size(-1);

  const auto in = kv.contiguous();
  auto out = at::empty_like(in);
  const int64_t tokens = in.numel() == 0 ? 0 : in.numel() / (heads * d);
  if (tokens == 0) return out;
  const auto idx = expert_idx.to(at::kLong).contiguous();
  const std::vector<int64_t> groups(group_sizes.begin(), group_sizes.end());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "grouped_kv_pool_cpu", [&] {
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t* ep = idx.const_data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, heads * d));
    at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
      std::vector<at::opmath_type<scalar_t>> acc(d);
      for (int64_t t = begin; t < end; ++t) {
        pool_token<scalar_t>(ip + t * heads * d, op + t * heads * d, heads, d, groups[ep[t]], acc.data());
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CPU, m) { m.impl("grouped_kv_pool", &grouped_kv_pool_cpu); }

}  // namespace mixsga::cpu
