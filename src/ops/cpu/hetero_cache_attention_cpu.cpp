// CPU kernel of hetero_cache_attention: L new queries per sequence against the per-expert compact K/V
// pools, causal by the positions stored with the keys.
//
// Work item = (sequence b, KV head kh, block of up to kQueryBlock consecutive queries): the rep = Hq/Hkv
// query heads of kh read the same compact head kh / g_e of every pool e, so the item's rep x nq query
// rows share each key block. The pools are read in place, never expanded to Hkv heads. Per block of
// kKeyBlock slots the keys are transposed once into a [d, kKeyBlock] tile (widened to the accumulation
// type), so scoring a row is d broadcast-FMAs over a fixed-width vector of slots that stays in registers;
// each row keeps a running softmax (max, sum, weighted V) in float32 (float64 for float64 inputs). An
// item holds every partial state of its rows, so no merge pass is needed and items are independent:
// the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops/validation.h"

namespace mixsga::cpu {
namespace {

constexpr int64_t kKeyBlock = 64;   // slots scored together (the width of the transposed key tile)
constexpr int64_t kQueryBlock = 8;  // queries per work item (times rep query heads = the item's rows)

// exp(x) for float32 in plain arithmetic the compiler vectorises (std::exp is a scalar libm call, and
// one is needed per visible score: it dominated the kernel's time at d = 64). Cody-Waite range
// reduction x = n ln2 + r, |r| <= ln2 / 2, then the degree-6 Taylor polynomial of e^r (truncation error
// < 2e-7 relative) scaled by 2^n through the exponent bits. Exact at x = 0; inputs are clamped to
// [-87, 88], where 2^n stays a normal float.
__attribute__((always_inline)) inline float exp_f32(float x) {
  x = x < -87.f ? -87.f : x;
  x = x > 88.f ? 88.f : x;
  const float t = x * 1.44269504088896341f;     // x / ln2
  const float nf = (t + 12582912.f) - 12582912.f;  // rounded to nearest (1.5 * 2^23 drops the fraction)
  const int32_t n = static_cast<int32_t>(nf);
  const float r = (x - nf * 0.693145751953125f) - nf * 1.42860682030941723e-6f;  // ln2 = hi + lo
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename acc_t>
__attribute__((always_inline)) inline acc_t exp_acc(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp_f32(x);
  } else {
    return std::exp(x);  // float64: the reference-grade path keeps libm
  }
}

// Online-softmax update of one row with its scores s [kKeyBlock] of a block (masked slots and the
// padding past T already -inf). Fixed trip counts and 16 partial sums / maxima, so the max, exp and
// sum loops vectorise (a plain float reduction does not without -ffast-math).
template <typename acc_t>
__attribute__((always_inline)) inline void update_row(acc_t* s, int64_t T, int64_t d, const acc_t* values, acc_t& m,
                                                      acc_t& l, acc_t* ar) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr int64_t kLanes = 16;
  acc_t lane[kLanes];
  for (int64_t u = 0; u < kLanes; ++u) lane[u] = kNegInf;
  for (int64_t t = 0; t < kKeyBlock; t += kLanes)
    for (int64_t u = 0; u < kLanes; ++u) lane[u] = s[t + u] > lane[u] ? s[t + u] : lane[u];
  acc_t block_max = kNegInf;
  for (int64_t u = 0; u < kLanes; ++u) block_max = lane[u] > block_max ? lane[u] : block_max;
  if (block_max == kNegInf) return;  // nothing visible to this row in the block
  const acc_t new_m = m > block_max ? m : block_max;
  const acc_t alpha = std::exp(m - new_m);  // 0 while m = -inf
  for (int64_t t = 0; t < kKeyBlock; ++t) {
    const acc_t e = exp_acc(s[t] - new_m);  // computed for masked slots too, then dropped: no branch
    s[t] = s[t] == kNegInf ? acc_t(0) : e;
  }
  for (int64_t u = 0; u < kLanes; ++u) lane[u] = 0;
  for (int64_t t = 0; t < kKeyBlock; t += kLanes)
    for (int64_t u = 0; u < kLanes; ++u) lane[u] += s[t + u];
  acc_t sum = 0;
  for (int64_t u = 0; u < kLanes; ++u) sum += lane[u];
  // ar = alpha * ar + sum_t p_t v_t, a chunk of kVChunk columns at a time held in registers, so each
  // V row costs one load per FMA and the running sum is stored once per block.
  constexpr int64_t kVChunk = 64;
  for (int64_t i0 = 0; i0 < d; i0 += kVChunk) {
    acc_t a[kVChunk];
    if (d - i0 >= kVChunk) {
      for (int64_t u = 0; u < kVChunk; ++u) a[u] = ar[i0 + u] * alpha;
      for (int64_t t = 0; t < T; ++t) {
        const acc_t p = s[t];
        if (p == acc_t(0)) continue;
        const acc_t* v = values + t * d + i0;
        for (int64_t u = 0; u < kVChunk; ++u) a[u] += p * v[u];
      }
      for (int64_t u = 0; u < kVChunk; ++u) ar[i0 + u] = a[u];
    } else {
      const int64_t w = d - i0;
      for (int64_t u = 0; u < w; ++u) a[u] = ar[i0 + u] * alpha;
      for (int64_t t = 0; t < T; ++t) {
        const acc_t p = s[t];
        if (p == acc_t(0)) continue;
        const acc_t* v = values + t * d + i0;
        for (int64_t u = 0; u < w; ++u) a[u] += p * v[u];
      }
      for (int64_t u = 0; u < w; ++u) ar[i0 + u] = a[u];
    }
  }
  l = l * alpha + sum;
  m = new_m;
}

// One key block against the item's query rows, generic over the accumulation type. Inlined into the
// per-ISA clones below, so each gets its own vectorisation.
//   q      [rows, d] pre-scaled queries        qpos [rows] their positions
//   kt     [d, kKeyBlock] transposed keys (columns >= T are zeros)
//   values [T, d] contiguous                   kpos [T] the slots' positions
//   m, l   [rows] running max and sum          acc  [rows, d] running weighted V
template <typename acc_t>
__attribute__((always_inline)) inline void attend_block(const acc_t* q, const int64_t* qpos, int64_t rows, int64_t d,
                                                        const acc_t* kt, const acc_t* values, const int64_t* kpos,
                                                        int64_t T, acc_t* m, acc_t* l, acc_t* acc) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  int64_t r = 0;
  // Two rows at a time, so each loaded tile row serves two FMAs; a fixed trip count over the slots
  // keeps both score vectors in registers.
  for (; r + 2 <= rows; r += 2) {
    acc_t s0[kKeyBlock] = {}, s1[kKeyBlock] = {};
    const acc_t* q0 = q + r * d;
    const acc_t* q1 = q0 + d;
    for (int64_t i = 0; i < d; ++i) {
      const acc_t a = q0[i], b = q1[i];
      const acc_t* row = kt + i * kKeyBlock;
      for (int64_t t = 0; t < kKeyBlock; ++t) {
        s0[t] += a * row[t];
        s1[t] += b * row[t];
      }
    }
    for (int64_t t = 0; t < T; ++t) {  // a later token is causally invisible
      if (kpos[t] > qpos[r]) s0[t] = kNegInf;
      if (kpos[t] > qpos[r + 1]) s1[t] = kNegInf;
    }
    for (int64_t t = T; t < kKeyBlock; ++t) s0[t] = s1[t] = kNegInf;  // padding
    update_row(s0, T, d, values, m[r], l[r], acc + r * d);
    update_row(s1, T, d, values, m[r + 1], l[r + 1], acc + (r + 1) * d);
  }
  for (; r < rows; ++r) {
    acc_t s[kKeyBlock] = {};
    const acc_t* qr = q + r * d;
    for (int64_t i = 0; i < d; ++i) {
      const acc_t a = qr[i];
      const acc_t* row = kt + i * kKeyBlock;
      for (int64_t t = 0; t < kKeyBlock; ++t) s[t] += a * row[t];
    }
    for (int64_t t = 0; t < T; ++t)
      if (kpos[t] > qpos[r]) s[t] = kNegInf;
    for (int64_t t = T; t < kKeyBlock; ++t) s[t] = kNegInf;
    update_row(s, T, d, values, m[r], l[r], acc + r * d);
  }
}

}  // namespace

// The float32 block update compiled for AVX-512 and AVX2 as well as baseline x86-64 (GCC function
// multiversioning picks one at load time), as the decode kernel does. no-trapping-math: without it GCC
// keeps the clamps and selects of the exp / mask loops as branches (a compare may raise an FP flag),
// and those loops stay scalar below AVX-512; nothing here reads the FP exception flags.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MIXSGA_CACHE_ATTENTION_CLONES \
  __attribute__((optimize("no-trapping-math"), target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MIXSGA_CACHE_ATTENTION_CLONES
#endif

MIXSGA_CACHE_ATTENTION_CLONES void cache_attend_block_f32(const float* q, const int64_t* qpos, int64_t rows, int64_t d,
                                                          const float* kt, const float* values, const int64_t* kpos,
                                                          int64_t T, float* m, float* l, float* acc) {
  attend_block<float>(q, qpos, rows, d, kt, values, kpos, T, m, l, acc);
}

namespace {

void attend(const float* q, const int64_t* qpos, int64_t rows, int64_t d, const float* kt, const float* values,
            const int64_t* kpos, int64_t T, float* m, float* l, float* acc) {
  cache_attend_block_f32(q, qpos, rows, d, kt, values, kpos, T, m, l, acc);
}

void attend(const double* q, const int64_t* qpos, int64_t rows, int64_t d, const double* kt, const double* values,
            const int64_t* kpos, int64_t T, double* m, double* l, double* acc) {
  attend_block<double>(q, qpos, rows, d, kt, values, kpos, T, m, l, acc);
}

// T key rows (row stride `stride`) as the transposed tile kt [d, kKeyBlock], widened to acc_t.
template <typename scalar_t, typename acc_t>
void load_keys_transposed(const scalar_t* src, int64_t T, int64_t d, int64_t stride, acc_t* kt) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < d; ++i) kt[i * kKeyBlock + t] = static_cast<acc_t>(src[t * stride + i]);
  // Columns past T are scored too (fixed-width loop) and then ignored; keep them finite.
  if (T < kKeyBlock)
    for (int64_t i = 0; i < d; ++i) std::fill(kt + i * kKeyBlock + T, kt + (i + 1) * kKeyBlock, acc_t(0));
}

// T value rows (row stride `stride`) as contiguous acc_t rows: the rows themselves when they already
// are, else widened / packed into `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* load_values(const scalar_t* src, int64_t T, int64_t d, int64_t stride, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == d) return src;
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < d; ++i) buf[t * d + i] = static_cast<acc_t>(src[t * stride + i]);
  return buf.data();
}

at::Tensor hetero_cache_attention_cpu(const at::Tensor& q, const at::Tensor& query_positions, at::TensorList k_pools,
                                      at::TensorList v_pools, at::TensorList key_positions, const at::Tensor& lengths,
                                      int64_t num_kv_heads, std::optional<double> scale) {
  const auto shapes =
      detail::check_cache_attention_args(q, query_positions, k_pools, v_pools, key_positions, lengths, num_kv_heads);
  const int64_t B = shapes.batch, L = shapes.queries, Hq = shapes.query_heads, d = shapes.head_dim, E = shapes.experts;
  const int64_t rep = Hq / num_kv_heads;
  auto out = at::empty({B, L, Hq, d}, q.options());
  if (out.numel() == 0) return out;
  const double softmax_scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(d)));
  const auto len = lengths.to(at::kCPU, at::kLong).contiguous();
  const auto qpos_t = query_positions.to(at::kLong).contiguous();
  std::vector<at::Tensor> kpos_t;  // int64 copies: [B, T_e] each, small next to the K/V rows
  for (int64_t e = 0; e < E; ++e) kpos_t.push_back(key_positions[e].to(at::kLong).contiguous());
  const int64_t* lp = len.const_data_ptr<int64_t>();
  const int64_t* qpp = qpos_t.const_data_ptr<int64_t>();
  const auto qc = q.contiguous();
  const int64_t query_blocks = (L + kQueryBlock - 1) / kQueryBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "hetero_cache_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = qc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t max_rows = rep * kQueryBlock;
    at::parallel_for(0, B * num_kv_heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> qf(max_rows * d), acc(max_rows * d), m(max_rows), lsum(max_rows);
      std::vector<acc_t> kt(d * kKeyBlock), vbuf(kKeyBlock * d);
      std::vector<int64_t> qpos(max_rows);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / (num_kv_heads * query_blocks), kh = item / query_blocks % num_kv_heads;
        const int64_t l0 = item % query_blocks * kQueryBlock, nq = std::min(kQueryBlock, L - l0), rows = rep * nq;
        // Row r = (query head kh * rep + r / nq, query l0 + r % nq).
        int64_t latest = std::numeric_limits<int64_t>::min();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t h = kh * rep + r / nq, l = l0 + r % nq;
          qpos[r] = qpp[b * L + l];
          latest = std::max(latest, qpos[r]);
          const scalar_t* row = qp + ((b * L + l) * Hq + h) * d;
          for (int64_t i = 0; i < d; ++i) qf[r * d + i] = static_cast<acc_t>(row[i]) * static_cast<acc_t>(softmax_scale);
        }
        std::fill(m.begin(), m.begin() + rows, -std::numeric_limits<acc_t>::infinity());
        std::fill(lsum.begin(), lsum.begin() + rows, acc_t(0));
        std::fill(acc.begin(), acc.begin() + rows * d, acc_t(0));
        for (int64_t e = 0; e < E; ++e) {
          const int64_t n = lp[b * E + e];
          if (n == 0) continue;
          const auto& K = k_pools[e];
          const auto& V = v_pools[e];
          const int64_t c = kh / (num_kv_heads / K.size(1));  // the compact head of kh in pool e
          const scalar_t* kp = K.const_data_ptr<scalar_t>() + b * K.stride(0) + c * K.stride(1);
          const scalar_t* vp = V.const_data_ptr<scalar_t>() + b * V.stride(0) + c * V.stride(1);
          const int64_t* kpos = kpos_t[e].const_data_ptr<int64_t>() + b * kpos_t[e].size(1);
          for (int64_t t0 = 0; t0 < n; t0 += kKeyBlock) {
            const int64_t T = std::min(kKeyBlock, n - t0);
            // Skip (without loading its rows) a block entirely after the item's latest query: with
            // slots in arrival order, every block past the chunk's own tokens.
            if (*std::min_element(kpos + t0, kpos + t0 + T) > latest) continue;
            load_keys_transposed<scalar_t, acc_t>(kp + t0 * K.stride(2), T, d, K.stride(2), kt.data());
            const acc_t* vf = load_values<scalar_t, acc_t>(vp + t0 * V.stride(2), T, d, V.stride(2), vbuf);
            attend(qf.data(), qpos.data(), rows, d, kt.data(), vf, kpos + t0, T, m.data(), lsum.data(), acc.data());
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          // A query that sees no stored token attends to nothing: its output is 0 (defined, not NaN).
          const acc_t inv = lsum[r] > 0 ? acc_t(1) / lsum[r] : acc_t(0);
          const int64_t h = kh * rep + r / nq, l = l0 + r % nq;
          scalar_t* dst = op + ((b * L + l) * Hq + h) * d;
          for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(acc[r * d + i] * inv);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CPU, m) { m.impl("hetero_cache_attention", &hetero_cache_attention_cpu); }

}  // namespace mixsga::cpu
