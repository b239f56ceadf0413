#pragma once
// Argument checks shared by the op kernels and the modules. Each throws a c10 error whose message
// names the argument and the value seen.

#include <ATen/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string_view>
#include <vector>

namespace mixsga::detail {

/// ratios: non-empty, each finite and in [0, 1], summing to 1 within 1e-6; size == num_experts
/// unless num_experts < 0.
void check_ratios(c10::ArrayRef<double> ratios, int64_t num_experts = -1, std::string_view name = "ratios");

/// group_sizes: non-empty, each >= 1, strictly increasing, each dividing num_kv_heads (if > 0).
void check_group_sizes(c10::IntArrayRef group_sizes, int64_t num_kv_heads = -1,
                       std::string_view name = "group_sizes");

/// expert_idx: integer dtype, on `device`, shape == expected leading shape, values in [0, num_experts).
void check_expert_idx(const at::Tensor& expert_idx, c10::IntArrayRef expected_shape, int64_t num_experts,
                      c10::Device device, std::string_view name = "expert_idx");

/// A floating tensor (float32, float64, bfloat16 or float16) whose sizes pass check_sizes_fit.
void check_floating(const at::Tensor& t, std::string_view name);

/// The product of the tensor's non-zero dims fits in int64. A tensor with a zero dim can have other
/// dims of any size (e.g. [0, 2^62, 4]); reshaping it or multiplying its sizes would overflow.
void check_sizes_fit(const at::Tensor& t, std::string_view name);
/// The same for a shape that an op is about to create (an output, a reshape of `name`).
void check_sizes_fit(c10::IntArrayRef sizes, std::string_view name);

/// An expert count argument: in [1, 2^20] (sizes are allocated from it).
void check_num_experts(int64_t num_experts, std::string_view name = "num_experts");

/// _grouped_kv_proj_backward's grad_out: shape x's leading dims + [heads, head_dim], x's dtype and device.
void check_grouped_kv_proj_grad_out(const at::Tensor& grad_out, const at::Tensor& x, int64_t heads, int64_t head_dim);

/// route_expert_choice's arguments: scores [B, L, E] floating, ratios matching E, optional [B, L]
/// valid_mask on scores' device where every sequence has a valid token. Returns the mask as a
/// contiguous bool tensor, or an undefined tensor when no mask was given.
at::Tensor check_routing_args(const at::Tensor& scores, c10::ArrayRef<double> ratios,
                              const std::optional<at::Tensor>& valid_mask);

/// Sizes of a grouped_kv_proj call.
struct ProjShapes {
  int64_t tokens, hidden, heads, head_dim;
};

/// grouped_kv_proj's (and its backward's) x / weight / expert_idx / group_sizes / head_dim checks.
ProjShapes check_grouped_kv_proj_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_idx,
                                      c10::IntArrayRef group_sizes, int64_t head_dim);

/// grouped_kv_proj's optional bias: [weight.size(0)], x's dtype and device. Returns whether it is given.
bool check_grouped_kv_proj_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, const at::Tensor& weight);

/// grouped_kv_pool's arguments: kv [*, Hkv, d] floating, group sizes dividing Hkv, expert_idx [*].
void check_grouped_kv_pool_args(const at::Tensor& kv, const at::Tensor& expert_idx, c10::IntArrayRef group_sizes);

/// Output shape of grouped_kv_proj: x's leading dims + [heads, head_dim].
std::vector<int64_t> grouped_kv_proj_out_shape(const at::Tensor& x, int64_t heads, int64_t head_dim);

/// expert_scatter / expert_gather: x [N, *] and an int64 [N] permutation on x's device (values are
/// checked by each backend).
void check_permutation_args(const at::Tensor& x, const at::Tensor& permutation);

/// rope_rotate's arguments: x [B, L, H, d] floating with even d; cos and sin [B|1, L, d] in x's dtype
/// and on its device.
void check_rope_rotate_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

/// Formats a shape as "[2, 3, 4]".
std::string shape_str(c10::IntArrayRef shape);

/// Sizes of a hetero_cache_attention call.
struct CacheAttentionShapes {
  int64_t batch, queries, query_heads, head_dim, experts;
};

/// hetero_cache_attention's arguments: q [B, L, Hq, d] floating; query_positions [B, L] integer on q's
/// device; E >= 1 pools k_pools[e] / v_pools[e] [B, Hkv/g_e, T_e, d] in q's dtype and on its device with
/// a contiguous head dim and Hkv/g_e dividing num_kv_heads; key_positions[e] [B, T_e] integer on q's
/// device; lengths [B, E] integer (CPU or q's device) with column e in [0, T_e]; num_kv_heads dividing Hq.
CacheAttentionShapes check_cache_attention_args(const at::Tensor& q, const at::Tensor& query_positions,
                                                at::TensorList k_pools, at::TensorList v_pools,
                                                at::TensorList key_positions, const at::Tensor& lengths,
                                                int64_t num_kv_heads);

}  // namespace mixsga::detail
