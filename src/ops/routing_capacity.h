#pragma once
// The capacity rule of progressive expert choice, shared by every backend and the tests.
#include <cmath>
#include <cstdint>

namespace mixsga::detail {

/// ceil(ratio * n) with a 1e-6 tolerance, so that float rounding (0.3 * 10 = 3.0000000000000004)
/// never hands an expert one token more than the ratio asks for.
inline int64_t expert_capacity(double ratio, int64_t n) {
  const double want = ratio * static_cast<double>(n);
  const auto k = static_cast<int64_t>(std::ceil(want - 1e-6));
  return k < 0 ? 0 : (k > n ? n : k);
}

}  // namespace mixsga::detail
