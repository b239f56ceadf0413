// CUDA registrations of grouped_kv_pool, grouped_kv_proj and _grouped_kv_proj_backward.
//
// grouped_kv_proj follows the CPU kernel's plan with the row work on our kernels and the matrix work
// on cuBLAS: tokens are sorted by expert once (counting sort + one row gather), each expert's
// contiguous block of rows is multiplied by its pooled weight [(Hkv/g_e)*d, D] (at::addmm), and the
// compact result is written expanded into the tokens' own output rows (expand_rows). The backward sums
// the incoming gradient over each group's heads (group_reduce), runs the two GEMMs per expert, and
// spreads the pooled weight gradient back over the group's heads.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <fmt/format.h>
#include <torch/library.h>

#include <vector>

#include "grouped_kv.h"
#include "ops/cuda/cuda_launch.h"
#include "ops/cuda/expert_permute_cuda.h"
#include "ops/validation.h"
#include "static_switch.h"

namespace mixsga::cuda {
namespace {

at::Tensor grouped_kv_pool_cuda(const at::Tensor& kv, const at::Tensor& expert_idx, c10::IntArrayRef group_sizes) {
  detail::check_grouped_kv_pool_args(kv, expert_idx, group_sizes);
  const int64_t heads = kv.size(-2), d = kv.size(-1);
  check_cuda_experts(static_cast<int64_t>(group_sizes.size()), "group_sizes");
  c10::cuda::CUDAGuard guard(kv.device());

  const auto in = kv.contiguous();
  auto out = at::empty_like(in);
  const int64_t tokens = in.numel() == 0 ? 0 : in.numel() / (heads * d);
  if (tokens == 0) return out;
  const auto idx = long_indices(expert_idx);
  kernels::GroupedKVPoolParams params{};
  params.in = in.const_data_ptr();
  params.out = out.mutable_data_ptr();
  params.expert_idx = idx.const_data_ptr<int64_t>();
  std::copy(group_sizes.begin(), group_sizes.end(), params.group_sizes);
  params.tokens = tokens;
  params.heads = heads;
  params.head_dim = d;
  params.num_experts = static_cast<int>(group_sizes.size());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SCALAR_SWITCH(scalar_kind(in.scalar_type()), elem_t, [&] { kernels::launch_grouped_kv_pool<elem_t>(params, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

using detail::ProjShapes;

// The shared checks plus the CUDA kernels' expert limit.
ProjShapes check_proj_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_idx,
                           c10::IntArrayRef group_sizes, int64_t head_dim) {
  const auto shapes = detail::check_grouped_kv_proj_args(x, weight, expert_idx, group_sizes, head_dim);
  check_cuda_experts(static_cast<int64_t>(group_sizes.size()), "group_sizes");
  return shapes;
}

// out[m, r] = scale * sum_{i < group} in[m * group + i, r] for a contiguous `in` of groups * group rows
// of `row` elements; the result has shape `shape`.
at::Tensor reduce_groups(const at::Tensor& in, int64_t groups, int64_t group, int64_t row, double scale,
                         c10::IntArrayRef shape) {
  auto out = at::empty(shape, in.options());
  if (out.numel() == 0) return out;
  kernels::GroupReduceParams params{};
  params.in = in.const_data_ptr();
  params.out = out.mutable_data_ptr();
  params.groups = groups;
  params.group_size = group;
  params.row = row;
  params.scale = scale;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SCALAR_SWITCH(scalar_kind(in.scalar_type()), elem_t, [&] { kernels::launch_group_reduce<elem_t>(params, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// pool_kv_weight on the device: [Hkv*d, *] contiguous -> [(Hkv/g)*d, *], group means of head blocks.
at::Tensor pooled_rows(const at::Tensor& w, int64_t g, int64_t head_dim) {
  if (g == 1) return w;
  const int64_t heads = w.size(0) / head_dim;
  std::vector<int64_t> shape(w.sizes().begin(), w.sizes().end());
  shape[0] = heads / g * head_dim;
  return reduce_groups(w, heads / g, g, w.numel() / heads, 1.0 / static_cast<double>(g), shape);
}

// Sorted-by-expert layout of the tokens: the permutation, host copies of the expert offsets, and
// whether one expert owns every token (then the sorted order is the token order and no row moves).
struct ExpertBlocks {
  at::Tensor permutation;
  std::vector<int64_t> offsets;
  bool one_expert_owns_all = false;
  int64_t size(size_t e) const { return offsets[e + 1] - offsets[e]; }
};

ExpertBlocks expert_blocks(const at::Tensor& expert_idx, int64_t tokens, size_t num_experts) {
  ExpertBlocks blocks;
  auto [permutation, offsets] = sort_by_expert(long_indices(expert_idx).view({tokens}), static_cast<int64_t>(num_experts));
  blocks.permutation = permutation;
  // The GEMM sizes are needed on the host: one small device-to-host copy per call.
  const auto host = offsets.cpu();
  blocks.offsets.assign(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + num_experts + 1);
  for (size_t e = 0; e < num_experts; ++e) blocks.one_expert_owns_all |= blocks.size(e) == tokens;
  return blocks;
}

at::Tensor grouped_kv_proj_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& expert_idx, c10::IntArrayRef group_sizes, int64_t head_dim) {
  const auto s = check_proj_args(x, weight, expert_idx, group_sizes, head_dim);
  // Under autocast the inner GEMMs would otherwise be recast to lower precision and disagree with
  // the output buffer's dtype: the op computes in its inputs' dtype.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool has_bias = detail::check_grouped_kv_proj_bias(bias, x, weight);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({s.tokens, s.heads, s.head_dim}, x.options());
  if (s.tokens == 0) return out.view(detail::grouped_kv_proj_out_shape(x, s.heads, s.head_dim));

  const auto x2 = x.reshape({s.tokens, s.hidden}).contiguous();
  const auto w = weight.contiguous();
  const auto b = has_bias ? bias->contiguous() : at::Tensor();
  const auto blocks = expert_blocks(expert_idx, s.tokens, group_sizes.size());
  const auto sorted = blocks.one_expert_owns_all ? x2 : permute_rows(x2, blocks.permutation, /*gather_rows=*/true);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t e = 0; e < group_sizes.size(); ++e) {
    const int64_t n_e = blocks.size(e);
    if (n_e == 0) continue;
    const int64_t g = group_sizes[e];
    const auto xe = sorted.narrow(0, blocks.offsets[e], n_e);
    const auto we = pooled_rows(w, g, s.head_dim);
    const auto ye = has_bias ? at::addmm(pooled_rows(b, g, s.head_dim), xe, we.t()) : at::mm(xe, we.t());
    kernels::ExpandRowsParams params{};
    params.in = ye.const_data_ptr();
    params.out = out.mutable_data_ptr();
    params.rows = blocks.one_expert_owns_all ? nullptr
                                             : blocks.permutation.const_data_ptr<int64_t>() + blocks.offsets[e];
    params.n = n_e;
    params.heads = s.heads;
    params.group_size = g;
    params.head_dim = s.head_dim;
    SCALAR_SWITCH(scalar_kind(x.scalar_type()), elem_t, [&] { kernels::launch_expand_rows<elem_t>(params, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.view(detail::grouped_kv_proj_out_shape(x, s.heads, s.head_dim));
}

// Forward: y_e = x_e @ P_e(W)^T + P_e(b), out[h] = y_e[group(h)]. With G the incoming gradient:
// dy_e = sum of G over the heads of each group, dx_e = dy_e @ P_e(W), dP_e(W) = dy_e^T @ x_e, and
// P_e's adjoint spreads each pooled row back over its g_e heads with weight 1/g_e.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_kv_proj_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_idx,
    c10::IntArrayRef group_sizes, int64_t head_dim) {
  const auto s = check_proj_args(x, weight, expert_idx, group_sizes, head_dim);
  // Under autocast the inner GEMMs would otherwise be recast to lower precision and disagree with
  // the output buffer's dtype: the op computes in its inputs' dtype.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK_VALUE(grad_out.sizes().equals(detail::grouped_kv_proj_out_shape(x, s.heads, s.head_dim)),
                    fmt::format("grad_out: expected shape {}, got {}", detail::shape_str(detail::grouped_kv_proj_out_shape(x, s.heads, s.head_dim)),
                                detail::shape_str(grad_out.sizes())));
  TORCH_CHECK_VALUE(grad_out.device() == x.device(),
                    fmt::format("grad_out: expected device {}, got {}", x.device().str(), grad_out.device().str()));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(),
                   fmt::format("grad_out: expected the dtype of x ({}), got {}", c10::toString(x.scalar_type()),
                               c10::toString(grad_out.scalar_type())));
  c10::cuda::CUDAGuard guard(x.device());
  auto grad_w = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  auto grad_b = at::zeros({weight.size(0)}, weight.options());
  if (s.tokens == 0) return {at::zeros(x.sizes(), x.options()), grad_w, grad_b};

  const int64_t compact_row = s.heads * s.head_dim;
  const auto x2 = x.reshape({s.tokens, s.hidden}).contiguous();
  const auto g2 = grad_out.reshape({s.tokens, compact_row}).contiguous();
  const auto w = weight.contiguous();
  const auto blocks = expert_blocks(expert_idx, s.tokens, group_sizes.size());
  const auto x_sorted = blocks.one_expert_owns_all ? x2 : permute_rows(x2, blocks.permutation, /*gather_rows=*/true);
  const auto g_sorted = blocks.one_expert_owns_all ? g2 : permute_rows(g2, blocks.permutation, /*gather_rows=*/true);
  auto grad_x_sorted = at::empty({s.tokens, s.hidden}, x.options());
  for (size_t e = 0; e < group_sizes.size(); ++e) {
    const int64_t n_e = blocks.size(e);
    if (n_e == 0) continue;
    const int64_t g = group_sizes[e], compact_heads = s.heads / g;
    const auto ge = g_sorted.narrow(0, blocks.offsets[e], n_e);
    const auto dy = g == 1 ? ge
                           : reduce_groups(ge, n_e * compact_heads, g, s.head_dim, 1.0,
                                           {n_e, compact_heads * s.head_dim});
    const auto xe = x_sorted.narrow(0, blocks.offsets[e], n_e);
    auto dx = grad_x_sorted.narrow(0, blocks.offsets[e], n_e);
    at::mm_out(dx, dy, pooled_rows(w, g, s.head_dim));
    const auto dwp = at::mm(dy.t(), xe).view({compact_heads, 1, s.head_dim, s.hidden});
    grad_w.view({compact_heads, g, s.head_dim, s.hidden}).add_(dwp, 1.0 / static_cast<double>(g));
    const auto dbp = dy.sum(0).view({compact_heads, 1, s.head_dim});
    grad_b.view({compact_heads, g, s.head_dim}).add_(dbp, 1.0 / static_cast<double>(g));
  }
  const auto grad_x = blocks.one_expert_owns_all
                          ? grad_x_sorted
                          : permute_rows(grad_x_sorted, blocks.permutation, /*gather_rows=*/false);
  return {grad_x.view(x.sizes()), grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CUDA, m) {
  m.impl("grouped_kv_pool", &grouped_kv_pool_cuda);
  m.impl("grouped_kv_proj", &grouped_kv_proj_cuda);
  m.impl("_grouped_kv_proj_backward", &grouped_kv_proj_backward_cuda);
}

}  // namespace mixsga::cuda
