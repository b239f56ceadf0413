// CPU kernels of expert_permutation (a counting sort, stable), expert_scatter and expert_gather
// (row copies, parallel over rows).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "ops/validation.h"

namespace mixsga::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> expert_permutation_cpu(const at::Tensor& expert_idx, int64_t num_experts) {
  detail::check_num_experts(num_experts);
  detail::check_expert_idx(expert_idx, expert_idx.sizes(), num_experts, expert_idx.device());
  const auto idx = expert_idx.to(at::kLong).contiguous();
  const int64_t n = idx.numel();
  auto permutation = at::empty({n}, idx.options());
  auto offsets = at::zeros({num_experts + 1}, idx.options());
  const int64_t* ep = idx.const_data_ptr<int64_t>();
  int64_t* pp = permutation.mutable_data_ptr<int64_t>();
  int64_t* op = offsets.mutable_data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) ++op[ep[t] + 1];
  for (int64_t e = 0; e < num_experts; ++e) op[e + 1] += op[e];
  std::vector<int64_t> next(op, op + num_experts);
  for (int64_t t = 0; t < n; ++t) pp[next[ep[t]]++] = t;
  return {permutation, offsets};
}

// Validates and returns the permutation as a contiguous int64 tensor. A true permutation is required
// (every row exactly once), so parallel row copies never race and no output row stays unwritten.
at::Tensor checked_permutation(const at::Tensor& x, const at::Tensor& permutation) {
  detail::check_permutation_args(x, permutation);
  auto perm = permutation.contiguous();
  const int64_t n = perm.numel();
  const int64_t* pp = perm.const_data_ptr<int64_t>();
  std::vector<char> seen(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = pp[i];
    TORCH_CHECK_VALUE(v >= 0 && v < n, fmt::format("permutation: values must be in [0, {}), got permutation[{}] = {}", n, i, v));
    TORCH_CHECK_VALUE(!seen[v], fmt::format("permutation: must be a permutation of 0..{}, but {} appears twice", n - 1, v));
    seen[v] = 1;
  }
  return perm;
}

// out[dst(i)] = in[src(i)] for rows of `row_bytes` bytes.
template <typename DstOf, typename SrcOf>
void copy_rows(const at::Tensor& in, at::Tensor& out, int64_t rows, DstOf dst_of, SrcOf src_of) {
  const int64_t row_bytes = rows == 0 ? 0 : in.numel() / rows * static_cast<int64_t>(in.element_size());
  if (row_bytes == 0) return;  // empty rows: the data pointers may be null, and memcpy(nullptr, ..) is UB
  const auto* ip = static_cast<const char*>(in.const_data_ptr());
  auto* op = static_cast<char*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(op + dst_of(i) * row_bytes, ip + src_of(i) * row_bytes, row_bytes);
  });
}

at::Tensor expert_scatter_cpu(const at::Tensor& x, const at::Tensor& permutation) {
  const auto perm = checked_permutation(x, permutation);
  const auto in = x.contiguous();
  auto out = at::empty_like(in);
  const int64_t* pp = perm.const_data_ptr<int64_t>();
  copy_rows(in, out, x.size(0), [](int64_t i) { return i; }, [pp](int64_t i) { return pp[i]; });
  return out;
}

at::Tensor expert_gather_cpu(const at::Tensor& x, const at::Tensor& permutation) {
  const auto perm = checked_permutation(x, permutation);
  const auto in = x.contiguous();
  auto out = at::empty_like(in);
  const int64_t* pp = perm.const_data_ptr<int64_t>();
  copy_rows(in, out, x.size(0), [pp](int64_t i) { return pp[i]; }, [](int64_t i) { return i; });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CPU, m) {
  m.impl("expert_permutation", &expert_permutation_cpu);
  m.impl("expert_scatter", &expert_scatter_cpu);
  m.impl("expert_gather", &expert_gather_cpu);
}

}  // namespace mixsga::cpu
