// CUDA registration of rope_rotate: the checks shared with the CPU kernel, then the one-pass kernel of
// kernels/rope_rotate.cuh. Without it CUDA callers composed x * cos + rotate_half(x) * sin from five
// elementwise ops (x-sized temporaries read and written each time).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/cuda/cuda_launch.h"
#include "ops/validation.h"
#include "rope_rotate.h"
#include "static_switch.h"

namespace mixsga::cuda {
namespace {

at::Tensor rope_rotate_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
  detail::check_rope_rotate_args(x, cos, sin);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), d = x.size(3);
  // Rows of d contiguous values; the leading dims may be strided (k and v are views of one tensor).
  const auto in = x.stride(3) == 1 ? x : x.contiguous();
  const auto c = cos.contiguous(), s = sin.contiguous();
  auto out = at::empty({B, L, H, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  kernels::RopeRotateParams params{};
  params.x = in.const_data_ptr();
  params.cos = c.const_data_ptr();
  params.sin = s.const_data_ptr();
  params.out = out.mutable_data_ptr();
  params.batch = B;
  params.seq = L;
  params.heads = H;
  params.head_dim = d;
  params.x_stride_b = in.stride(0);
  params.x_stride_l = in.stride(1);
  params.x_stride_h = in.stride(2);
  params.angle_stride_b = c.size(0) == 1 ? 0 : L * d;
  params.transpose = transpose;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SCALAR_SWITCH(scalar_kind(x.scalar_type()), elem_t, [&] { kernels::launch_rope_rotate<elem_t>(params, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CUDA, m) { m.impl("rope_rotate", &rope_rotate_cuda); }

}  // namespace mixsga::cuda
