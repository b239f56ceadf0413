// CUDA registrations of expert_permutation (stable counting sort), expert_scatter and expert_gather
// (row copies), with the same argument checks as the CPU kernels. The permutation check runs on the
// device and reports back the first bad position / the smallest repeated value.
#include "ops/cuda/expert_permute_cuda.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <fmt/format.h>
#include <torch/library.h>

#include "expert_permutation.h"
#include "ops/cuda/cuda_launch.h"
#include "ops/validation.h"

namespace mixsga::cuda {

std::tuple<at::Tensor, at::Tensor> sort_by_expert(const at::Tensor& expert_idx, int64_t num_experts) {
  const int64_t n = expert_idx.numel();
  auto permutation = at::empty({n}, expert_idx.options());
  auto offsets = at::empty({num_experts + 1}, expert_idx.options());
  if (n == 0) return {permutation, offsets.zero_()};
  auto scratch = at::empty({kernels::expert_permutation_blocks(n) * num_experts}, expert_idx.options());
  kernels::ExpertPermutationParams params{};
  params.expert_idx = expert_idx.const_data_ptr<int64_t>();
  params.permutation = permutation.mutable_data_ptr<int64_t>();
  params.offsets = offsets.mutable_data_ptr<int64_t>();
  params.block_bases = scratch.mutable_data_ptr<int64_t>();
  params.n = n;
  params.num_experts = static_cast<int>(num_experts);
  kernels::launch_expert_permutation(params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {permutation, offsets};
}

at::Tensor permute_rows(const at::Tensor& rows, const at::Tensor& permutation, bool gather_rows) {
  auto out = at::empty_like(rows, at::MemoryFormat::Contiguous);
  const int64_t n = rows.size(0);
  if (n == 0 || rows.numel() == 0) return out;
  kernels::RowCopyParams params{};
  params.in = rows.const_data_ptr();
  params.out = out.mutable_data_ptr();
  params.permutation = permutation.const_data_ptr<int64_t>();
  params.rows = n;
  params.row_bytes = rows.numel() / n * static_cast<int64_t>(rows.element_size());
  params.gather_rows = gather_rows;
  kernels::launch_row_copy(params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

namespace {

std::tuple<at::Tensor, at::Tensor> expert_permutation_cuda(const at::Tensor& expert_idx, int64_t num_experts) {
  TORCH_CHECK_VALUE(num_experts >= 1, fmt::format("num_experts: must be >= 1, got {}", num_experts));
  detail::check_expert_idx(expert_idx, expert_idx.sizes(), num_experts, expert_idx.device());
  TORCH_CHECK_VALUE(num_experts <= kernels::kMaxPermutationExperts,
                    fmt::format("num_experts: the CUDA kernel supports at most {} experts, got {}",
                                kernels::kMaxPermutationExperts, num_experts));
  c10::cuda::CUDAGuard guard(expert_idx.device());
  return sort_by_expert(long_indices(expert_idx).view({-1}), num_experts);
}

// The CPU kernel's checks, with the every-value-once test done on the device.
at::Tensor checked_permutation(const at::Tensor& x, const at::Tensor& permutation) {
  detail::check_permutation_args(x, permutation);
  c10::cuda::CUDAGuard guard(x.device());
  auto perm = permutation.contiguous();
  const int64_t n = perm.numel();
  if (n == 0) return perm;
  auto seen = at::zeros({n}, perm.options().dtype(at::kInt));
  auto status = at::full({2}, n, perm.options());
  kernels::PermutationCheckParams params{};
  params.permutation = perm.const_data_ptr<int64_t>();
  params.seen = seen.mutable_data_ptr<int32_t>();
  params.status = status.mutable_data_ptr<int64_t>();
  params.n = n;
  kernels::launch_permutation_check(params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto found = status.cpu();
  const int64_t bad_position = found[0].item<int64_t>(), repeated = found[1].item<int64_t>();
  TORCH_CHECK_VALUE(bad_position == n, fmt::format("permutation: values must be in [0, {}), got permutation[{}] = {}", n,
                                                   bad_position, bad_position < n ? perm[bad_position].item<int64_t>() : 0));
  TORCH_CHECK_VALUE(repeated == n,
                    fmt::format("permutation: must be a permutation of 0..{}, but {} appears twice", n - 1, repeated));
  return perm;
}

at::Tensor expert_scatter_cuda(const at::Tensor& x, const at::Tensor& permutation) {
  const auto perm = checked_permutation(x, permutation);
  c10::cuda::CUDAGuard guard(x.device());
  return permute_rows(x.contiguous(), perm, /*gather_rows=*/true);
}

at::Tensor expert_gather_cuda(const at::Tensor& x, const at::Tensor& permutation) {
  const auto perm = checked_permutation(x, permutation);
  c10::cuda::CUDAGuard guard(x.device());
  return permute_rows(x.contiguous(), perm, /*gather_rows=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CUDA, m) {
  m.impl("expert_permutation", &expert_permutation_cuda);
  m.impl("expert_scatter", &expert_scatter_cuda);
  m.impl("expert_gather", &expert_gather_cuda);
}

}  // namespace mixsga::cuda
