#pragma once
// Argument checks of hetero_decode_attention, shared by the CPU and CUDA kernels.
#include <ATen/ATen.h>
#include <fmt/format.h>

#include "ops/validation.h"

namespace mixsga::detail {

struct DecodeShapes {
  int64_t batch, query_heads, head_dim, experts;
};

inline DecodeShapes check_decode_attention_args(const at::Tensor& q, at::TensorList k_pools, at::TensorList v_pools,
                                                const at::Tensor& lengths, int64_t num_kv_heads) {
  check_floating(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 3, fmt::format("q: expected shape [B, Hq, d], got {}", shape_str(q.sizes())));
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2);
  TORCH_CHECK_VALUE(num_kv_heads > 0 && Hq % num_kv_heads == 0,
                    fmt::format("num_kv_heads: must be > 0 and divide the query heads ({}), got {}", Hq, num_kv_heads));
  const int64_t E = static_cast<int64_t>(k_pools.size());
  TORCH_CHECK_VALUE(E >= 1 && v_pools.size() == k_pools.size(),
                    fmt::format("k_pools / v_pools: expected the same number (>= 1) of pools, got {} and {}", E,
                                v_pools.size()));
  TORCH_CHECK_VALUE(lengths.dim() == 2 && lengths.size(0) == B && lengths.size(1) == E,
                    fmt::format("lengths: expected shape [{}, {}] (batch, pools), got {}", B, E, shape_str(lengths.sizes())));
  TORCH_CHECK_TYPE(at::isIntegralType(lengths.scalar_type(), false),
                   fmt::format("lengths: expected an integer dtype, got {}", c10::toString(lengths.scalar_type())));
  for (int64_t e = 0; e < E; ++e) {
    for (const auto& [pools, name] : {std::pair{k_pools, "k_pools"}, std::pair{v_pools, "v_pools"}}) {
      const auto& p = pools[e];
      TORCH_CHECK_VALUE(p.dim() == 4 && p.size(0) == B && p.size(3) == d && p.size(1) > 0 && num_kv_heads % p.size(1) == 0,
                        fmt::format("{}[{}]: expected shape [{}, Hkv/g, T, {}] with Hkv/g dividing num_kv_heads ({}), got {}",
                                    name, e, B, d, num_kv_heads, shape_str(p.sizes())));
      TORCH_CHECK_TYPE(p.scalar_type() == q.scalar_type(), fmt::format("{}[{}]: expected the dtype of q ({}), got {}", name,
                                                                       e, c10::toString(q.scalar_type()),
                                                                       c10::toString(p.scalar_type())));
      TORCH_CHECK_VALUE(p.device() == q.device(), fmt::format("{}[{}]: expected the device of q ({}), got {}", name, e,
                                                              q.device().str(), p.device().str()));
      TORCH_CHECK_VALUE(p.size(3) == 0 || p.stride(3) == 1,
                        fmt::format("{}[{}]: the head dim must be contiguous (stride 1), got stride {}", name, e, p.stride(3)));
    }
    TORCH_CHECK_VALUE(v_pools[e].sizes().equals(k_pools[e].sizes()),
                      fmt::format("v_pools[{}]: expected the shape of k_pools[{}] {}, got {}", e, e,
                                  shape_str(k_pools[e].sizes()), shape_str(v_pools[e].sizes())));
    if (B > 0) {
      const auto col = lengths.select(1, e);
      const auto [lo, hi] = at::aminmax(col);
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() <= k_pools[e].size(2),
                        fmt::format("lengths: column {} must be in [0, {}] (the pool's token dim), got values in [{}, {}]",
                                    e, k_pools[e].size(2), lo.item<int64_t>(), hi.item<int64_t>()));
    }
  }
  return {B, Hq, d, E};
}

}  // namespace mixsga::detail
