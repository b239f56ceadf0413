#pragma once
// Progressive exclusive expert-choice routing (METHOD.md step 2) on the GPU: one block per sequence.
// Torch-free; the element type of the scores is the template argument (float, double,
// __nv_bfloat16, __half).
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernel_types.h"

namespace mixsga::kernels {

/// Expert e < E-1 takes the min(capacity(ratios[e], n), remaining) free valid tokens of its sequence
/// with the highest scores[..., e] (ties: lower position first; NaN below every number), the last
/// expert takes the rest, padding gets E-1. capacity = ceil(ratio * n - 1e-6) clamped to [0, n],
/// evaluated with the same IEEE double operations as detail::expert_capacity on the host.
struct RouteExpertChoiceParams {
  const void* scores;      ///< [batch, length, num_experts]
  const uint8_t* valid;    ///< [batch, length], nonzero = real token; nullptr = all valid
  int64_t* out;            ///< [batch, length] expert index
  double ratios[kMaxExperts];
  int64_t batch, length;
  int num_experts;
};

template <typename T>
void launch_route_expert_choice(const RouteExpertChoiceParams& params, cudaStream_t stream);

}  // namespace mixsga::kernels
