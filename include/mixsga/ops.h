#pragma once
/// mixsga dispatcher ops, callable from C++.
///
/// Every function here calls through the c10 dispatcher (schema table: src/ops/schema.cpp), so C++
/// callers get autograd, device routing and the same validation as `torch.ops.mixsga.*` in Python.
/// Shapes use: B batch, L sequence, E experts, Hkv base KV heads, d head dim, D hidden size,
/// N = number of tokens (the product of the leading dims).

#include <ATen/Tensor.h>
#include <ATen/core/ATen_fwd.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace mixsga::ops {

/// Progressive exclusive expert-choice routing (METHOD.md step 2), per sequence.
///
/// Experts are visited from finest (0) to coarsest (E-1); expert e < E-1 takes the
/// min(ceil(ratios[e] * n), remaining) untaken valid tokens with the highest `scores[..., e]`,
/// the last expert takes the rest. n is the number of valid tokens of the sequence. Ties go to the
/// lower position; NaN scores rank below every number. Padding tokens take no capacity and get E-1.
/// (ceil is taken with a 1e-6 tolerance, so that e.g. 0.3 * 10 gives 3, not 4.)
///
/// @param scores     [B, L, E] floating router scores (any float dtype; not differentiated).
/// @param ratios     E capacity ratios, each in [0, 1], summing to 1 (tolerance 1e-6).
/// @param valid_mask optional [B, L] mask, nonzero/true = real token; default: all valid.
///                   Every sequence needs at least one valid token.
/// @return [B, L] int64 expert index of every token.
at::Tensor route_expert_choice(const at::Tensor& scores, c10::ArrayRef<double> ratios,
                               const std::optional<at::Tensor>& valid_mask = std::nullopt);

/// Weight-shared grouped K/V pooling (METHOD.md step 5) applied to already projected heads.
///
/// Token t of expert e = expert_idx[t] has its heads averaged within consecutive groups of
/// group_sizes[e] heads and repeated back, so the output keeps the input shape. It is a symmetric
/// projection, so its gradient is the same op applied to the incoming gradient.
///
/// @param kv          [*, Hkv, d] projected K or V (float32, float64, bfloat16, float16).
/// @param expert_idx  [*] integer expert index per token, values in [0, E).
/// @param group_sizes E strictly increasing group sizes, each dividing Hkv.
/// @return [*, Hkv, d], same dtype as kv.
at::Tensor grouped_kv_pool(const at::Tensor& kv, const at::Tensor& expert_idx,
                           c10::IntArrayRef group_sizes);

/// Grouped K/V projection: each token's K (or V) under its own expert, computed from the expert's
/// pooled weights (x @ pool_e(W)^T + pool_e(b)), so the matrix work is sum_e (n_e/N) / g_e of the full
/// projection. The compact per-expert result is repeated back to Hkv heads on output. Differentiable
/// with respect to x, weight and bias.
///
/// @param x           [*, D] attention input.
/// @param weight      [Hkv * head_dim, D] the layer's original W_k or W_v (nn.Linear layout).
/// @param bias        optional [Hkv * head_dim].
/// @param expert_idx  [*] integer expert index per token, values in [0, E).
/// @param group_sizes E strictly increasing group sizes, each dividing Hkv.
/// @param head_dim    d; must divide weight.size(0).
/// @return [*, Hkv, d] in x's dtype; equals grouped_kv_pool(linear(x, weight, bias), ...).
at::Tensor grouped_kv_proj(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& expert_idx,
                           c10::IntArrayRef group_sizes, int64_t head_dim);

/// Stable permutation that groups tokens by expert.
///
/// @param expert_idx  [*] integer expert index per token, values in [0, num_experts).
/// @return (permutation [N] int64: token ids sorted by expert, original order kept within an expert;
///          offsets [num_experts + 1] int64: expert e owns permutation[offsets[e] : offsets[e+1]]).
std::tuple<at::Tensor, at::Tensor> expert_permutation(const at::Tensor& expert_idx, int64_t num_experts);

/// Token scatter into per-expert contiguous blocks: out[i] = x[permutation[i]]. Differentiable
/// (its gradient is expert_gather).
/// @param x           [N, *] one row per token.
/// @param permutation [N] int64 permutation of 0..N-1 (e.g. from expert_permutation).
at::Tensor expert_scatter(const at::Tensor& x, const at::Tensor& permutation);

/// Inverse of expert_scatter: out[permutation[i]] = x[i]. Differentiable (gradient: expert_scatter).
/// @param x           [N, *] rows in per-expert block order.
/// @param permutation [N] int64 permutation of 0..N-1.
at::Tensor expert_gather(const at::Tensor& x, const at::Tensor& permutation);

/// Decode attention over the heterogeneous cache: one new query per sequence against all of its cached
/// tokens across the expert pools, each pool's partial softmax merged by log-sum-exp. The expanded K/V
/// are never formed. Accumulates in float32 for every input dtype. Not differentiable (inference).
///
/// @param q            [B, Hq, d] queries (after RoPE).
/// @param k_pools      E tensors [B, Hkv/g_e, T_e, d] (e.g. HeteroKVCache::keys(layer)); head dim contiguous.
/// @param v_pools      E tensors of the same shapes.
/// @param lengths      [B, E] integer: sequence b attends to the first lengths[b, e] tokens of pool e.
/// @param num_kv_heads Hkv; query head h reads compact head (h / (Hq/Hkv)) / g_e of pool e.
/// @param scale        softmax scale, default 1/sqrt(d).
/// @return [B, Hq, d] in q's dtype; a sequence with no cached token gets zeros.
at::Tensor hetero_decode_attention(const at::Tensor& q, at::TensorList k_pools, at::TensorList v_pools,
                                   const at::Tensor& lengths, int64_t num_kv_heads,
                                   std::optional<double> scale = std::nullopt);

/// Attention of L new queries per sequence over the heterogeneous cache, causal by stored positions:
/// query (b, l) attends to the stored token in slot t < lengths[b, e] of pool e when
/// key_positions[e][b, t] <= query_positions[b, l]. The pools are read in place, never expanded to Hkv
/// heads: query head h reads compact head (h / (Hq/Hkv)) / g_e of pool e, with g_e = Hkv / k_pools[e].size(1).
/// One online softmax per query over all pools, accumulated in float32 (float64 for float64 inputs).
/// With L = 1 and every stored position <= the query's, it equals hetero_decode_attention. The usual
/// caller is a chunk after cached tokens (chunked prefill, speculative verification): append the chunk
/// to the cache first, then attend with the chunk's positions. Not differentiable (inference over a
/// detached cache): a backward through it raises an error.
///
/// @param q               [B, L, Hq, d] queries (after RoPE).
/// @param query_positions [B, L] integer position of each query in its sequence.
/// @param k_pools         E tensors [B, Hkv/g_e, T_e, d] (e.g. HeteroKVCache::keys(layer)); head dim contiguous.
/// @param v_pools         E tensors of the same shapes.
/// @param key_positions   E integer tensors [B, T_e] (e.g. HeteroKVCache::positions(layer), int32).
/// @param lengths         [B, E] integer, CPU or q's device: sequence b holds the first lengths[b, e] slots of pool e.
/// @param num_kv_heads    Hkv (divides Hq).
/// @param scale           softmax scale, default 1/sqrt(d).
/// @return [B, L, Hq, d] contiguous, q's dtype. A query that sees no stored token (every visible slot
///         empty or at a later position) gets zeros, as hetero_decode_attention does for an empty sequence.
at::Tensor hetero_cache_attention(const at::Tensor& q, const at::Tensor& query_positions, at::TensorList k_pools,
                                  at::TensorList v_pools, at::TensorList key_positions, const at::Tensor& lengths,
                                  int64_t num_kv_heads, std::optional<double> scale = std::nullopt);

/// Pools the rows of a K/V projection weight (or bias) for one expert: [Hkv*d, ...] ->
/// [(Hkv/group_size)*d, ...], each group of group_size consecutive heads averaged. Plain ATen
/// (differentiable through autograd); used by the cache and by tests.
at::Tensor pool_kv_weight(const at::Tensor& weight, int64_t group_size, int64_t head_dim);

/// Deprecated spelling of mixsga::kv_fraction (kept so existing callers compile); same result.
[[deprecated("use mixsga::kv_fraction")]] double kv_fraction(c10::IntArrayRef group_sizes,
                                                             c10::ArrayRef<double> ratios);

/// Rotary position embedding (rotate_half convention of Hugging Face Llama) from precomputed angles,
/// in one pass: y = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] over the two halves of d.
///
/// @param x         [B, L, H, d] floating, d even; rows of d must be contiguous or x is copied once.
/// @param cos, sin  [B, L, d] or [1, L, d] (the same for every head), in x's dtype, on x's device.
/// @param transpose apply the transposed rotation instead (the backward of the rotation). Default false.
/// @return [B, L, H, d] contiguous, x's dtype. Differentiable in x (the angles must not require grad).
///         CPU kernel only for now; mixsga::nn::apply_rope falls back to the composite form elsewhere.
at::Tensor rope_rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose = false);

}  // namespace mixsga::ops

namespace mixsga {

/// Fraction of the base model's KV cache kept by a configuration: sum_e ratios[e] / group_sizes[e]
/// (e.g. group sizes {1, 2, 4} at ratios {0.3, 0.1, 0.6} keep 0.3 + 0.05 + 0.15 = 0.5). The same
/// function as Python's mixsga.kv_fraction; not an op (no tensors).
/// @param group_sizes E strictly increasing group sizes, each >= 1.
/// @param ratios      E ratios in [0, 1] summing to 1.
double kv_fraction(c10::IntArrayRef group_sizes, c10::ArrayRef<double> ratios);

}  // namespace mixsga
