// CUDA registration of route_expert_choice: the same argument checks as the CPU kernel, then one
// block per sequence (kernels/routing.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <fmt/format.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ops/cuda/cuda_launch.h"
#include "ops/validation.h"
#include "routing.h"
#include "static_switch.h"

namespace mixsga::cuda {
namespace {

at::Tensor route_expert_choice_cuda(const at::Tensor& scores, c10::ArrayRef<double> ratios,
                                    const std::optional<at::Tensor>& valid_mask) {
  const auto valid = detail::check_routing_args(scores, ratios, valid_mask);
  const int64_t B = scores.size(0), L = scores.size(1), E = scores.size(2);
  check_cuda_experts(E, "scores");

  auto out = at::empty({B, L}, scores.options().dtype(at::kLong));
  if (B == 0 || L == 0) return out;
  TORCH_CHECK_VALUE(B <= std::numeric_limits<int32_t>::max() && L <= std::numeric_limits<int32_t>::max(),
                    fmt::format("scores: the CUDA kernel takes at most 2^31 - 1 sequences of at most 2^31 - 1 tokens, "
                                "got shape {}",
                                detail::shape_str(scores.sizes())));
  c10::cuda::CUDAGuard guard(scores.device());
  const auto s = scores.contiguous();
  kernels::RouteExpertChoiceParams params{};
  params.scores = s.const_data_ptr();
  params.valid = valid.defined() ? reinterpret_cast<const uint8_t*>(valid.const_data_ptr<bool>()) : nullptr;
  params.out = out.mutable_data_ptr<int64_t>();
  std::copy(ratios.begin(), ratios.end(), params.ratios);
  params.batch = B;
  params.length = L;
  params.num_experts = static_cast<int>(E);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SCALAR_SWITCH(scalar_kind(s.scalar_type()), elem_t,
                [&] { kernels::launch_route_expert_choice<elem_t>(params, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CUDA, m) { m.impl("route_expert_choice", &route_expert_choice_cuda); }

}  // namespace mixsga::cuda
