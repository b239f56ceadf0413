#include "mixsga/nn/rope.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cmath>

#include "mixsga/ops.h"
#include "ops/validation.h"

namespace mixsga::nn {

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& positions, double theta) {
  detail::check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(-1) % 2 == 0,
                    fmt::format("x: expected shape [B, L, H, d] with even d, got {}", detail::shape_str(x.sizes())));
  const int64_t B = x.size(0), L = x.size(1), d = x.size(3);
  TORCH_CHECK_VALUE((positions.dim() == 1 && positions.size(0) == L) ||
                        (positions.dim() == 2 && positions.size(1) == L && (positions.size(0) == B || positions.size(0) == 1)),
                    fmt::format("positions: expected shape [{}, {}] or [{}], got {}", B, L, L,
                                detail::shape_str(positions.sizes())));
  TORCH_CHECK_TYPE(at::isIntegralType(positions.scalar_type(), false),
                   fmt::format("positions: expected an integer dtype, got {}", c10::toString(positions.scalar_type())));
  TORCH_CHECK_VALUE(std::isfinite(theta) && theta > 0.0, fmt::format("theta: must be finite and > 0, got {}", theta));
  const auto [cos, sin] = rope_angles(positions, d, theta, x.scalar_type());
  return rotate(x, cos, sin);
}

std::tuple<at::Tensor, at::Tensor> rope_angles(const at::Tensor& positions, int64_t head_dim, double theta,
                                               c10::ScalarType dtype) {
  const auto angle_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = positions.options().dtype(angle_dtype);
  const auto inv_freq =
      at::pow(theta, at::arange(0, head_dim, 2, opts.dtype(at::kLong)).to(angle_dtype) / static_cast<double>(head_dim))
          .reciprocal();
  const auto pos = (positions.dim() == 1 ? positions.unsqueeze(0) : positions).to(opts);
  const auto freqs = pos.unsqueeze(-1) * inv_freq;  // [B|1, L, d/2]
  const auto emb = at::cat({freqs, freqs}, -1);     // [B|1, L, d]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

at::Tensor apply_rope_cos_sin(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  detail::check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(-1) % 2 == 0,
                    fmt::format("x: expected shape [B, L, H, d] with even d, got {}", detail::shape_str(x.sizes())));
  const int64_t B = x.size(0), L = x.size(1), d = x.size(3);
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    TORCH_CHECK_VALUE(t->defined() && t->dim() == 3 && t->size(1) == L && t->size(2) == d && (t->size(0) == B || t->size(0) == 1),
                      fmt::format("{}: expected shape [{}, {}, {}] or [1, {}, {}], got {}", name, B, L, d, L, d,
                                  t->defined() ? detail::shape_str(t->sizes()) : "undefined"));
    TORCH_CHECK_VALUE(t->device() == x.device(),
                      fmt::format("{}: expected x's device {}, got {}", name, x.device().str(), t->device().str()));
  }
  return rotate(x, cos, sin);
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const auto c = cos.to(x.scalar_type()), s = sin.to(x.scalar_type());
  // The fused one-pass kernel where there is one (CPU, angles without grad); the composite form is its reference.
  if (x.device().is_cpu() && !c.requires_grad() && !s.requires_grad()) return ops::rope_rotate(x, c, s);
  return rotate_half_reference(x, c.unsqueeze(2), s.unsqueeze(2));
}

at::Tensor rotate_half_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const auto halves = x.chunk(2, -1);
  const auto rotated = at::cat({-halves[1], halves[0]}, -1);
  return x * cos + rotated * sin;
}

}  // namespace mixsga::nn
