// CPU kernels of grouped_kv_proj and its backward.
//
// Tokens are grouped by expert (expert_permutation); for each expert e the rows of its tokens are
// multiplied by the expert's pooled weight [(Hkv/g_e)*d, D] (one GEMM per expert, so the matrix work
// is sum_e n_e/g_e of a full projection) and the compact result is written back, repeated g_e times
// along the head axis, into the token's own output row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/accumulate.h>
#include <fmt/format.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "mixsga/ops.h"
#include "ops/validation.h"

namespace mixsga::cpu {
namespace {

using detail::ProjShapes;
using detail::check_grouped_kv_proj_args;

// Up to this many tokens per expert, the forward projects with the full weight and pools the outputs
// instead of pooling the weight (see grouped_kv_proj_cpu).
constexpr int64_t kProjectThenPoolMaxTokens = 16;

// out[row_i, c * g + r, :] = compact[i, c, :] for every r < g: one pass over the output, parallel
// over tokens (instead of materialising the repeat and then index-copying it).
void scatter_repeated(const at::Tensor& compact, const at::Tensor& rows, bool identity_rows, int64_t g, int64_t d,
                      at::Tensor& out) {
  const int64_t n = compact.size(0), row_elems = compact.size(1), heads = row_elems / d;
  const auto src = compact.contiguous();
  const int64_t* rp = identity_rows ? nullptr : rows.const_data_ptr<int64_t>();
  const int64_t out_row = heads * g * d, bytes = d * static_cast<int64_t>(src.element_size());
  const auto* sp = static_cast<const char*>(src.const_data_ptr());
  auto* op = static_cast<char*>(out.mutable_data_ptr());
  const int64_t elem = static_cast<int64_t>(src.element_size());
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, out_row)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const char* in = sp + i * row_elems * elem;
      char* dst = op + (rp ? rp[i] : i) * out_row * elem;
      for (int64_t c = 0; c < heads; ++c)
        for (int64_t r = 0; r < g; ++r) std::memcpy(dst + (c * g + r) * bytes, in + c * bytes, bytes);
    }
  });
}

at::Tensor grouped_kv_proj_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& expert_idx, c10::IntArrayRef group_sizes, int64_t head_dim) {
  const auto s = check_grouped_kv_proj_args(x, weight, expert_idx, group_sizes, head_dim);
  // Under autocast the inner GEMMs would otherwise be recast to lower precision and disagree with
  // the output buffer's dtype: the op computes in its inputs' dtype.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool has_bias = detail::check_grouped_kv_proj_bias(bias, x, weight);
  auto out = at::empty({s.tokens, s.heads, s.head_dim}, x.options());
  if (s.tokens == 0) return out.view(detail::grouped_kv_proj_out_shape(x, s.heads, s.head_dim));

  const auto x2 = x.reshape({s.tokens, s.hidden});
  const auto [perm, offsets] = ops::expert_permutation(expert_idx.reshape({s.tokens}), group_sizes.size());
  const auto off = offsets.accessor<int64_t, 1>();
  for (size_t e = 0; e < group_sizes.size(); ++e) {
    const int64_t n_e = off[e + 1] - off[e];
    if (n_e == 0) continue;
    const int64_t g = group_sizes[e];
    const bool all_tokens = n_e == s.tokens;  // one expert owns everything: no gather/scatter needed
    const auto rows = perm.narrow(0, off[e], n_e);
    const auto xe = all_tokens ? x2 : x2.index_select(0, rows);
    at::Tensor ye;  // [n_e, (Hkv/g)*d], the expert's compact K/V
    if (g > 1 && n_e <= kProjectThenPoolMaxTokens) {
      // Few tokens (decode): the GEMM is a memory-bound pass over the weight either way, so projecting
      // with the full weight and pooling the few outputs is cheaper than pooling the whole weight first.
      // Same result (pooling is linear; METHOD.md step 5) up to rounding.
      const auto full = has_bias ? at::addmm(*bias, xe, weight.t()) : at::mm(xe, weight.t());
      ye = full.view({n_e, s.heads / g, g, s.head_dim}).mean(2).view({n_e, s.heads / g * s.head_dim});
    } else {
      const auto we = ops::pool_kv_weight(weight, g, s.head_dim);
      ye = has_bias ? at::addmm(ops::pool_kv_weight(*bias, g, s.head_dim), xe, we.t()) : at::mm(xe, we.t());
    }
    scatter_repeated(ye, rows, all_tokens, g, s.head_dim, out);
  }
  return out.view(detail::grouped_kv_proj_out_shape(x, s.heads, s.head_dim));
}

// Forward: y_e = x_e @ P_e(W)^T + P_e(b), out[h] = y_e[group(h)]. So with G the incoming gradient,
// dy_e = sum of G over the heads of each group, dx_e = dy_e @ P_e(W), dP_e(W) = dy_e^T @ x_e, and
// P_e's adjoint spreads each pooled row back over its g_e heads with weight 1/g_e.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_kv_proj_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_idx,
    c10::IntArrayRef group_sizes, int64_t head_dim) {
  const auto s = check_grouped_kv_proj_args(x, weight, expert_idx, group_sizes, head_dim);
  // Under autocast the inner GEMMs would otherwise be recast to lower precision and disagree with
  // the output buffer's dtype: the op computes in its inputs' dtype.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  detail::check_grouped_kv_proj_grad_out(grad_out, x, s.heads, s.head_dim);
  // Every token belongs to exactly one expert (expert_idx is checked to be in range), so every row of
  // grad_x is written below: no need to zero it first.
  auto grad_x = at::empty({s.tokens, s.hidden}, x.options());
  // The group-size-1 expert (if it has tokens) writes grad_w / grad_b whole; otherwise start from zero.
  // Skipping the zero fill matters: it is a weight-sized write per call.
  auto grad_w = at::empty_like(weight, at::MemoryFormat::Contiguous);
  auto grad_b = at::empty({weight.size(0)}, weight.options());
  bool grads_written = false;
  if (s.tokens == 0) return {grad_x.view(x.sizes()), grad_w.zero_(), grad_b.zero_()};

  const auto x2 = x.reshape({s.tokens, s.hidden});
  const auto g2 = grad_out.reshape({s.tokens, s.heads * s.head_dim});
  const auto [perm, offsets] = ops::expert_permutation(expert_idx.reshape({s.tokens}), group_sizes.size());
  const auto off = offsets.accessor<int64_t, 1>();
  for (size_t e = 0; e < group_sizes.size(); ++e) {
    const int64_t n_e = off[e + 1] - off[e];
    if (n_e == 0) continue;
    const int64_t g = group_sizes[e], compact_heads = s.heads / g;
    const bool all_tokens = n_e == s.tokens;
    const auto rows = perm.narrow(0, off[e], n_e);
    const auto ge = all_tokens ? g2 : g2.index_select(0, rows);
    // dy_e: the incoming gradient summed over the g heads of each group (nothing to sum when g == 1).
    const auto dy = g == 1 ? ge : ge.reshape({n_e, compact_heads, g, s.head_dim}).sum(2).view({n_e, compact_heads * s.head_dim});
    const auto xe = all_tokens ? x2 : x2.index_select(0, rows);
    if (all_tokens) {
      at::mm_out(grad_x, dy, ops::pool_kv_weight(weight, g, s.head_dim));
    } else {
      grad_x.index_copy_(0, rows, at::mm(dy, ops::pool_kv_weight(weight, g, s.head_dim)));
    }
    if (g == 1 && !grads_written) {
      at::mm_out(grad_w, dy.t(), xe);
      at::sum_out(grad_b, dy, 0);
      grads_written = true;
      continue;
    }
    if (!grads_written) {
      grad_w.zero_();
      grad_b.zero_();
      grads_written = true;
    }
    const auto dwp = at::mm(dy.t(), xe);
    if (g == 1) {
      grad_w.add_(dwp);
      grad_b.add_(dy.sum(0));
    } else {
      grad_w.view({compact_heads, g, s.head_dim, s.hidden}).add_(dwp.view({compact_heads, 1, s.head_dim, s.hidden}),
                                                                  1.0 / static_cast<double>(g));
      grad_b.view({compact_heads, g, s.head_dim})
          .add_(dy.sum(0).view({compact_heads, 1, s.head_dim}), 1.0 / static_cast<double>(g));
    }
  }
  if (!grads_written) {  // unreachable with s.tokens > 0 (some expert has tokens); kept for safety
    grad_w.zero_();
    grad_b.zero_();
  }
  return {grad_x.view(x.sizes()), grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CPU, m) {
  m.impl("grouped_kv_proj", &grouped_kv_proj_cpu);
  m.impl("_grouped_kv_proj_backward", &grouped_kv_proj_backward_cpu);
}

}  // namespace mixsga::cpu
