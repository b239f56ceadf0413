// The one schema table of the mixsga ops. Backends register their kernels in their own files
// (cpu/, cuda/, autograd/); a missing backend is the dispatcher's error, never an #ifdef here.
// Every output shape follows from input shapes and int arguments, so every op can have a fake kernel.
#include <torch/library.h>

TORCH_LIBRARY(mixsga, m) {
  // Progressive exclusive expert-choice routing: scores [B,L,E] -> expert index [B,L] int64.
  m.def("route_expert_choice(Tensor scores, float[] ratios, Tensor? valid_mask=None) -> Tensor");
  // Per-token average of KV heads within the token's expert groups, repeated back: [*,Hkv,d] -> [*,Hkv,d].
  m.def("grouped_kv_pool(Tensor kv, Tensor expert_idx, int[] group_sizes) -> Tensor");
  // Each token's K/V from its expert's pooled weights: x [*,D], weight [Hkv*d,D] -> [*,Hkv,d].
  m.def("grouped_kv_proj(Tensor x, Tensor weight, Tensor? bias, Tensor expert_idx, int[] group_sizes, "
        "int head_dim) -> Tensor");
  // Backward of grouped_kv_proj: (grad_x [*,D], grad_weight [Hkv*d,D], grad_bias [Hkv*d]).
  m.def("_grouped_kv_proj_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor expert_idx, "
        "int[] group_sizes, int head_dim) -> (Tensor, Tensor, Tensor)");
  // Stable token permutation grouping tokens by expert: (permutation [N], offsets [E+1]).
  m.def("expert_permutation(Tensor expert_idx, int num_experts) -> (Tensor, Tensor)");
  // Rows into per-expert blocks: out[i] = x[permutation[i]].
  m.def("expert_scatter(Tensor x, Tensor permutation) -> Tensor");
  // Rows back to token order: out[permutation[i]] = x[i].
  m.def("expert_gather(Tensor x, Tensor permutation) -> Tensor");
  // Rotary position embedding, rotate_half convention, from precomputed angles: x [B,L,H,d], cos/sin
  // [B|1,L,d] in x's dtype -> [B,L,H,d] contiguous. transpose=True applies the transposed rotation (the
  // backward). Differentiable in x only.
  m.def("rope_rotate(Tensor x, Tensor cos, Tensor sin, bool transpose=False) -> Tensor");
  // One decode query per sequence vs per-expert compact pools, merged by log-sum-exp: q [B,Hq,d] -> [B,Hq,d].
  m.def("hetero_decode_attention(Tensor q, Tensor[] k_pools, Tensor[] v_pools, Tensor lengths, int num_kv_heads, "
        "float? scale=None) -> Tensor");
  // L new queries at explicit positions vs the compact pools, causal by stored key positions (key pos <=
  // query pos), never expanded: q [B,L,Hq,d], query_positions [B,L], key_positions[e] [B,T_e] -> [B,L,Hq,d].
  // Not differentiable (inference over a detached cache).
  m.def("hetero_cache_attention(Tensor q, Tensor query_positions, Tensor[] k_pools, Tensor[] v_pools, "
        "Tensor[] key_positions, Tensor lengths, int num_kv_heads, float? scale=None) -> Tensor");
}
