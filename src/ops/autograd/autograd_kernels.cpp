// Autograd kernels of the mixsga ops (registered at the Autograd key, so C++ users can train
// without Python). Each backward calls a registered op, so it runs on whatever backend the forward
// ran on. Non-differentiable ops are registered too: they redispatch below autograd, so the
// dispatcher never warns about a missing autograd kernel when an input requires grad.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "mixsga/ops.h"

namespace mixsga::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class GroupedKVPoolFunction : public torch::autograd::Function<GroupedKVPoolFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& kv, const at::Tensor& expert_idx,
                            c10::IntArrayRef group_sizes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({expert_idx});
    ctx->saved_data["group_sizes"] = group_sizes.vec();
    return ops::grouped_kv_pool(kv, expert_idx, group_sizes);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto expert_idx = ctx->get_saved_variables()[0];
    const auto group_sizes = ctx->saved_data["group_sizes"].toIntVector();
    // The pool is an orthogonal projection per token, hence self-adjoint.
    return {ops::grouped_kv_pool(grad[0], expert_idx, group_sizes), at::Tensor(), at::Tensor()};
  }
};

using ProjBackwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&, const at::Tensor&,
                                                                        c10::IntArrayRef, int64_t);

const c10::TypedOperatorHandle<ProjBackwardOp>& grouped_kv_proj_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mixsga::_grouped_kv_proj_backward", "")
                             .typed<ProjBackwardOp>();
  return op;
}

// The backward op as a differentiable function (double backward of grouped_kv_proj, e.g. a gradient
// penalty through torch.autograd.grad(..., create_graph=True)). Without it the op's inner out= GEMMs
// would run under autograd and fail with torch's "out= ... don't support automatic differentiation".
//
// With G = grad_out, the backward is bilinear: grad_x = B_x(G, W) = S(G) P(W), grad_w = B_w(G, x) =
// P^T(S(G)^T x), grad_b = P^T(sum S(G)) (S sums the heads of a group, P pools, as in the CPU kernel).
// Its adjoints, for incoming (gg_x, gg_w, gg_b), are again the two registered ops:
//   dG = grouped_kv_proj(gg_x, W, None) + grouped_kv_proj(x, gg_w, gg_b)   (S^T repeats, P^T spreads)
//   dx = B_x(G, gg_w)   (grad_x of the backward op with gg_w as the weight)
//   dW = B_w(G, gg_x)   (grad_w of the backward op with gg_x as the input)
// They call through the dispatcher with autograd on, so higher orders work the same way.
class GroupedKVProjBackwardFunction : public torch::autograd::Function<GroupedKVProjBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& expert_idx, c10::IntArrayRef group_sizes,
                               int64_t head_dim) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // Unused outputs (often grad_b) get no zero-filled gradient: backward skips their terms.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_out, x, weight, expert_idx});
    ctx->saved_data["group_sizes"] = group_sizes.vec();
    ctx->saved_data["head_dim"] = head_dim;
    const auto [gx, gw, gb] = grouped_kv_proj_backward_op().call(grad_out, x, weight, expert_idx, group_sizes, head_dim);
    return {gx, gw, gb};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const auto &grad_out = saved[0], &x = saved[1], &weight = saved[2], &expert_idx = saved[3];
    const auto group_sizes = ctx->saved_data["group_sizes"].toIntVector();
    const int64_t head_dim = ctx->saved_data["head_dim"].toInt();
    const auto &gg_x = grad[0], &gg_w = grad[1], &gg_b = grad[2];
    at::Tensor d_grad_out, d_x, d_w;
    if (gg_x.defined()) {
      d_grad_out = ops::grouped_kv_proj(gg_x, weight, std::nullopt, expert_idx, group_sizes, head_dim);
      d_w = std::get<1>(grouped_kv_proj_backward_op().call(grad_out.contiguous(), gg_x, weight, expert_idx,
                                                           group_sizes, head_dim));
    }
    if (gg_w.defined() || gg_b.defined()) {
      // A bias-only incoming gradient still needs a weight argument: zeros contribute nothing.
      const auto w = gg_w.defined() ? gg_w : at::zeros_like(weight);
      const auto from_params = ops::grouped_kv_proj(x, w, gg_b.defined() ? std::optional(gg_b) : std::nullopt,
                                                    expert_idx, group_sizes, head_dim);
      d_grad_out = d_grad_out.defined() ? d_grad_out + from_params : from_params;
    }
    if (gg_w.defined()) {
      d_x = std::get<0>(grouped_kv_proj_backward_op().call(grad_out.contiguous(), x, gg_w, expert_idx, group_sizes,
                                                           head_dim));
    }
    return {d_grad_out, d_x, d_w, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_kv_proj_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_idx,
    c10::IntArrayRef group_sizes, int64_t head_dim) {
  const auto grads = GroupedKVProjBackwardFunction::apply(grad_out, x, weight, expert_idx, group_sizes, head_dim);
  return {grads[0], grads[1], grads[2]};
}

// Backward of grouped_kv_proj through the registered backward op (runs on the forward's backend).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_kv_proj_grads(AutogradContext* ctx, const at::Tensor& grad) {
  const auto saved = ctx->get_saved_variables();
  return grouped_kv_proj_backward_op().call(grad.contiguous(), saved[0], saved[1], saved[2],
                                            ctx->saved_data["group_sizes"].toIntVector(),
                                            ctx->saved_data["head_dim"].toInt());
}

void save_grouped_kv_proj(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& expert_idx, c10::IntArrayRef group_sizes, int64_t head_dim) {
  ctx->save_for_backward({x, weight, expert_idx});
  ctx->saved_data["group_sizes"] = group_sizes.vec();
  ctx->saved_data["head_dim"] = head_dim;
}

// Two Functions, with and without bias: an absent bias must not count as a differentiable input.
class GroupedKVProjFunction : public torch::autograd::Function<GroupedKVProjFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& expert_idx, c10::IntArrayRef group_sizes,
                            int64_t head_dim) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_grouped_kv_proj(ctx, x, weight, expert_idx, group_sizes, head_dim);
    return ops::grouped_kv_proj(x, weight, bias, expert_idx, group_sizes, head_dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto [grad_x, grad_w, grad_b] = grouped_kv_proj_grads(ctx, grad[0]);
    return {grad_x, grad_w, grad_b, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class GroupedKVProjNoBiasFunction : public torch::autograd::Function<GroupedKVProjNoBiasFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& expert_idx, c10::IntArrayRef group_sizes, int64_t head_dim) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_grouped_kv_proj(ctx, x, weight, expert_idx, group_sizes, head_dim);
    return ops::grouped_kv_proj(x, weight, std::nullopt, expert_idx, group_sizes, head_dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto [grad_x, grad_w, grad_b] = grouped_kv_proj_grads(ctx, grad[0]);
    return {grad_x, grad_w, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class ExpertScatterFunction : public torch::autograd::Function<ExpertScatterFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& permutation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({permutation});
    return ops::expert_scatter(x, permutation);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {ops::expert_gather(grad[0], ctx->get_saved_variables()[0]), at::Tensor()};
  }
};

class ExpertGatherFunction : public torch::autograd::Function<ExpertGatherFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& permutation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({permutation});
    return ops::expert_gather(x, permutation);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {ops::expert_scatter(grad[0], ctx->get_saved_variables()[0]), at::Tensor()};
  }
};

// RoPE is an orthogonal map per (token, head) row when cos^2 + sin^2 = 1, but the backward does not
// rely on it: it applies the exact transpose, so any angles (scaled variants) differentiate correctly.
class RopeRotateFunction : public torch::autograd::Function<RopeRotateFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            bool transpose) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["transpose"] = transpose;
    return ops::rope_rotate(x, cos, sin, transpose);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const bool transpose = ctx->saved_data["transpose"].toBool();
    return {ops::rope_rotate(grad[0], saved[0], saved[1], !transpose), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor rope_rotate_autograd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
  TORCH_CHECK_VALUE(!(cos.defined() && cos.requires_grad()) && !(sin.defined() && sin.requires_grad()),
                    "cos: rope_rotate differentiates x only; the angles (cos, sin) must not require grad "
                    "(rotate with the composite x * cos + rotate_half(x) * sin to train them)");
  return RopeRotateFunction::apply(x, cos, sin, transpose);
}

at::Tensor grouped_kv_pool_autograd(const at::Tensor& kv, const at::Tensor& expert_idx, c10::IntArrayRef group_sizes) {
  return GroupedKVPoolFunction::apply(kv, expert_idx, group_sizes);
}

at::Tensor grouped_kv_proj_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& expert_idx, c10::IntArrayRef group_sizes, int64_t head_dim) {
  if (bias.has_value() && bias->defined()) {
    return GroupedKVProjFunction::apply(x, weight, *bias, expert_idx, group_sizes, head_dim);
  }
  return GroupedKVProjNoBiasFunction::apply(x, weight, expert_idx, group_sizes, head_dim);
}

at::Tensor expert_scatter_autograd(const at::Tensor& x, const at::Tensor& permutation) {
  return ExpertScatterFunction::apply(x, permutation);
}

at::Tensor expert_gather_autograd(const at::Tensor& x, const at::Tensor& permutation) {
  return ExpertGatherFunction::apply(x, permutation);
}

at::Tensor route_expert_choice_autograd(const at::Tensor& scores, c10::ArrayRef<double> ratios,
                                        const std::optional<at::Tensor>& valid_mask) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::route_expert_choice(scores, ratios, valid_mask);
}

std::tuple<at::Tensor, at::Tensor> expert_permutation_autograd(const at::Tensor& expert_idx, int64_t num_experts) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::expert_permutation(expert_idx, num_experts);
}

at::Tensor hetero_decode_attention_autograd(const at::Tensor& q, at::TensorList k_pools, at::TensorList v_pools,
                                            const at::Tensor& lengths, int64_t num_kv_heads, std::optional<double> scale) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::hetero_decode_attention(q, k_pools, v_pools, lengths, num_kv_heads, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, Autograd, m) {
  m.impl("grouped_kv_pool", &grouped_kv_pool_autograd);
  m.impl("grouped_kv_proj", &grouped_kv_proj_autograd);
  m.impl("_grouped_kv_proj_backward", &grouped_kv_proj_backward_autograd);
  m.impl("expert_scatter", &expert_scatter_autograd);
  m.impl("expert_gather", &expert_gather_autograd);
  m.impl("route_expert_choice", &route_expert_choice_autograd);
  m.impl("expert_permutation", &expert_permutation_autograd);
  m.impl("hetero_decode_attention", &hetero_decode_attention_autograd);
  m.impl("rope_rotate", &rope_rotate_autograd);
}

}  // namespace mixsga::autograd
