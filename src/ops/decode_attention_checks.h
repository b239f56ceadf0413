#pragma once
// Argument checks of hetero_decode_attention, shared by the CPU and CUDA kernels.
//
// Decode runs once per generated token, so the checks must not synchronise with the device: shapes,
// dtypes and devices are host metadata and always checked, but the values of `lengths` are read only
// when they already live on the host (a CPU tensor, as HeteroKVCache hands them out). Lengths on a
// GPU stay there unread; the CUDA kernels clamp them to [0, capacity], so a bad value cannot read
// out of bounds. MIXSGA_DEBUG_CHECKS=1 in the environment reads them anyway (one sync per call).
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "ops/validation.h"

namespace mixsga::detail {

/// Whether MIXSGA_DEBUG_CHECKS is set (to anything but "" or "0"): read once per process.
inline bool debug_checks_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("MIXSGA_DEBUG_CHECKS");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

/// Whether the decode checks read the values of `lengths`: on the host they cost nothing; on a
/// device reading them would block the host until the GPU catches up, so only in debug mode.
inline bool decode_checks_read_lengths(const at::Tensor& lengths) {
  return lengths.device().is_cpu() || debug_checks_enabled();
}

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
  }
  if (B > 0 && decode_checks_read_lengths(lengths)) {
    // One host copy at most (a no-op for CPU int64 lengths), then a plain loop: no per-column
    // aminmax temporaries and no item() calls.
    const auto len = lengths.to(at::kCPU, at::kLong).contiguous();
    const int64_t* lp = len.const_data_ptr<int64_t>();
    for (int64_t e = 0; e < E; ++e) {
      int64_t lo = lp[e], hi = lp[e];
      for (int64_t b = 1; b < B; ++b) {
        lo = std::min(lo, lp[b * E + e]);
        hi = std::max(hi, lp[b * E + e]);
      }
      TORCH_CHECK_VALUE(lo >= 0 && hi <= k_pools[e].size(2),
                        fmt::format("lengths: column {} must be in [0, {}] (the pool's token dim), got values in [{}, {}]",
                                    e, k_pools[e].size(2), lo, hi));
    }
  }
  return {B, Hq, d, E};
}

}  // namespace mixsga::detail
