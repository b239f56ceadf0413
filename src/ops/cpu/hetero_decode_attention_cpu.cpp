// CPU kernel of hetero_decode_attention: one query per sequence against per-expert compact K/V pools.
//
// Work item = (sequence b, expert e, compact KV head c, a range of its tokens): it streams those
// cached keys/values once for every query head that maps onto the head (g_e * Hq/Hkv heads), keeping a
// running softmax (max, sum, weighted V) per query head in float32 (float64 for float64 inputs). A
// second pass merges the partials of each (b, head) over experts and token ranges by log-sum-exp. The
// expanded K/V are never formed: each cached byte is read once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/decode_attention_checks.h"

namespace mixsga::cpu {
namespace {

constexpr int64_t kBlock = 64;     // tokens scored together before their V rows are accumulated
constexpr int64_t kMaxHeads = 64;  // query heads per work item (more are split into several items)
constexpr int64_t kSplits = 32;    // about this many equal work items per call (enough for 16+ threads)
constexpr int64_t kMinItemWork = 4096;  // tokens x query heads: below this, splitting costs more than it saves

}  // namespace

// The float32 inner loops, compiled for AVX-512 and AVX2 as well as baseline x86-64; the loader picks
// the best the CPU supports (GCC function multiversioning), so the library still runs anywhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MIXSGA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MIXSGA_CPU_CLONES
#endif

namespace simd {

/// Online-softmax update of nh query heads (q pre-scaled, [nh, d]) with a block of T keys / values
/// ([T, d] each, float32, contiguous): m / l / acc hold each head's running max, sum and weighted V.
MIXSGA_CPU_CLONES void attend_block_f32(const float* q, int64_t nh, int64_t d, const float* keys, const float* values,
                                        int64_t T, float* m, float* l, float* acc) {
  float scores[kMaxHeads * kBlock];
  for (int64_t j = 0; j < nh; ++j) {
    const float* qj = q + j * d;
    for (int64_t t = 0; t < T; ++t) {
      const float* k = keys + t * d;
      // 16 partial sums: the compiler keeps them in vector registers (a plain reduction would not
      // be vectorised without -ffast-math).
      float part[16] = {};
      int64_t i = 0;
      for (; i + 16 <= d; i += 16)
        for (int u = 0; u < 16; ++u) part[u] += qj[i + u] * k[i + u];
      float s = 0.f;
      for (int u = 0; u < 16; ++u) s += part[u];
      for (; i < d; ++i) s += qj[i] * k[i];
      scores[j * kBlock + t] = s;
    }
  }
  for (int64_t j = 0; j < nh; ++j) {
    float* sj = scores + j * kBlock;
    float block_max = sj[0];
    for (int64_t t = 1; t < T; ++t) block_max = sj[t] > block_max ? sj[t] : block_max;
    const float new_m = m[j] > block_max ? m[j] : block_max;
    // Every score so far is -inf (e.g. keys with -inf entries): nothing to add, and exp(-inf - -inf)
    // would be NaN and poison the sum even after finite scores arrive.
    if (new_m == -std::numeric_limits<float>::infinity()) continue;
    const float alpha = std::exp(m[j] - new_m);  // 0 when m[j] = -inf
    float sum = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      sj[t] = std::exp(sj[t] - new_m);
      sum += sj[t];
    }
    l[j] = l[j] * alpha + sum;
    m[j] = new_m;
    float* aj = acc + j * d;
    for (int64_t i = 0; i < d; ++i) aj[i] *= alpha;
    for (int64_t t = 0; t < T; ++t) {
      const float p = sj[t];
      const float* v = values + t * d;
      for (int64_t i = 0; i < d; ++i) aj[i] += p * v[i];
    }
  }
}

/// Widens `rows` rows of d elements (row stride `stride`) to a contiguous float32 block.
MIXSGA_CPU_CLONES void widen_bf16(const c10::BFloat16* src, int64_t rows, int64_t d, int64_t stride, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* in = reinterpret_cast<const uint16_t*>(src + r * stride);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst + r * d);
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<uint32_t>(in[i]) << 16;  // bf16 is the top half of f32
  }
}

}  // namespace simd

namespace {

// float32 / bfloat16 / float16 pools: widen each block to float32 (a no-op view for contiguous
// float32 rows) and run the vectorised block update.
template <typename scalar_t>
void attend_pool_fast(const float* q, int64_t nh, int64_t d, const scalar_t* keys, const scalar_t* values, int64_t n,
                      int64_t kst, int64_t vst, float* m, float* l, float* acc, std::vector<float>& kbuf,
                      std::vector<float>& vbuf) {
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t T = std::min(kBlock, n - start);
    const scalar_t* kb = keys + start * kst;
    const scalar_t* vb = values + start * vst;
    const float* kf;
    const float* vf;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (kst == d && vst == d) {
        kf = kb;
        vf = vb;
      } else {
        for (int64_t t = 0; t < T; ++t) {
          std::copy(kb + t * kst, kb + t * kst + d, kbuf.data() + t * d);
          std::copy(vb + t * vst, vb + t * vst + d, vbuf.data() + t * d);
        }
        kf = kbuf.data();
        vf = vbuf.data();
      }
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      simd::widen_bf16(kb, T, d, kst, kbuf.data());
      simd::widen_bf16(vb, T, d, vst, vbuf.data());
      kf = kbuf.data();
      vf = vbuf.data();
    } else {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < d; ++i) {
          kbuf[t * d + i] = static_cast<float>(kb[t * kst + i]);
          vbuf[t * d + i] = static_cast<float>(vb[t * vst + i]);
        }
      kf = kbuf.data();
      vf = vbuf.data();
    }
    simd::attend_block_f32(q, nh, d, kf, vf, T, m, l, acc);
  }
}

// float64 pools: the same online softmax in double, plain loops (a reference-grade path).
void attend_pool_f64(const double* q, int64_t nh, int64_t d, const double* keys, const double* values, int64_t n,
                     int64_t kst, int64_t vst, double* m, double* l, double* acc) {
  for (int64_t t = 0; t < n; ++t) {
    const double* k = keys + t * kst;
    const double* v = values + t * vst;
    for (int64_t j = 0; j < nh; ++j) {
      double s = 0;
      for (int64_t i = 0; i < d; ++i) s += q[j * d + i] * k[i];
      const double new_m = std::max(m[j], s);
      if (new_m == -std::numeric_limits<double>::infinity()) continue;  // see attend_block_f32
      const double alpha = std::exp(m[j] - new_m), p = std::exp(s - new_m);
      l[j] = l[j] * alpha + p;
      m[j] = new_m;
      double* aj = acc + j * d;
      for (int64_t i = 0; i < d; ++i) aj[i] = aj[i] * alpha + p * v[i];
    }
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void attend_pool(const acc_t* q, int64_t nh, int64_t d, const scalar_t* keys, const scalar_t* values, int64_t n,
                 int64_t kst, int64_t vst, acc_t* m, acc_t* l, acc_t* acc, std::vector<float>& kbuf,
                 std::vector<float>& vbuf) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    attend_pool_f64(q, nh, d, keys, values, n, kst, vst, m, l, acc);
  } else {
    attend_pool_fast<scalar_t>(q, nh, d, keys, values, n, kst, vst, m, l, acc, kbuf, vbuf);
  }
}

at::Tensor hetero_decode_attention_cpu(const at::Tensor& q, at::TensorList k_pools, at::TensorList v_pools,
                                       const at::Tensor& lengths, int64_t num_kv_heads, std::optional<double> scale) {
  const auto shapes = detail::check_decode_attention_args(q, k_pools, v_pools, lengths, num_kv_heads);
  const int64_t B = shapes.batch, Hq = shapes.query_heads, d = shapes.head_dim, E = shapes.experts;
  const int64_t rep = Hq / num_kv_heads;
  auto out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (B == 0 || Hq == 0) return out;
  const double softmax_scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(d)));
  const auto len = lengths.to(at::kCPU, at::kLong).contiguous();
  const int64_t* lp = len.const_data_ptr<int64_t>();

  // Work items: (b, e, c, head chunk of at most kMaxHeads query heads, token range). A pool's tokens
  // are split into ranges so that every item costs about the same (tokens x query heads): a coarse
  // pool serves more query heads per cached token, so its ranges are shorter. Equal items let the
  // contiguous split of at::parallel_for balance the threads, and a single long sequence still uses
  // every core (split-K, as flash-decoding does); the partials are merged by log-sum-exp below.
  struct Item { int64_t b, e, c, h0, nh, t0, t1, slot; };  // slot: first row of its partial state
  int64_t total_work = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t e = 0; e < E; ++e) total_work += lp[b * E + e] * Hq;  // every query head sees every token
  // About kSplits items in all, whatever the thread count: the split (hence the rounding of the merge)
  // must not depend on it, so results are bitwise the same on 1 or N threads.
  const int64_t target_work = std::max<int64_t>(kMinItemWork, total_work / kSplits);
  std::vector<Item> items;
  // first[(b * E + e) * Hq + h] = (first item covering query head h of (b, e), number of token ranges)
  std::vector<std::pair<int64_t, int64_t>> first(B * E * Hq, {-1, 0});
  int64_t rows = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = lp[b * E + e];
      if (n == 0) continue;
      const int64_t g = num_kv_heads / k_pools[e].size(1), per_head = g * rep;
      for (int64_t c = 0; c < k_pools[e].size(1); ++c) {
        for (int64_t off = 0; off < per_head; off += kMaxHeads) {
          const int64_t nh = std::min<int64_t>(kMaxHeads, per_head - off), h0 = c * per_head + off;
          const int64_t span = std::max<int64_t>(kBlock, (target_work / nh + kBlock - 1) / kBlock * kBlock);
          const int64_t ranges = (n + span - 1) / span;
          for (int64_t j = 0; j < nh; ++j) first[(b * E + e) * Hq + h0 + j] = {static_cast<int64_t>(items.size()), ranges};
          for (int64_t t0 = 0; t0 < n; t0 += span) {
            items.push_back({b, e, c, h0, nh, t0, std::min(n, t0 + span), rows});
            rows += nh;
          }
        }
      }
    }
  }

  // Partial softmax state per (item, query head), in float32 (float64 for float64 inputs).
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto part_m = at::full({rows}, -std::numeric_limits<double>::infinity(), q.options().dtype(acc_dtype));
  auto part_l = at::zeros({rows}, q.options().dtype(acc_dtype));
  auto part_acc = at::zeros({rows, d}, q.options().dtype(acc_dtype));
  const auto qc = q.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "hetero_decode_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = qc.const_data_ptr<scalar_t>();
    acc_t* mp = part_m.mutable_data_ptr<acc_t>();
    acc_t* lsum = part_l.mutable_data_ptr<acc_t>();
    acc_t* ap = part_acc.mutable_data_ptr<acc_t>();
    // Items are pulled from a shared counter, largest first (the longest-processing-time rule): a
    // static contiguous split would give one thread all the cheap items of the fine pools. The order
    // only schedules; every item writes its own partial rows, so results do not depend on it.
    std::vector<int64_t> order(items.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return (items[a].t1 - items[a].t0) * items[a].nh > (items[b].t1 - items[b].t0) * items[b].nh;
    });
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      std::vector<acc_t> qf(kMaxHeads * d);
      std::vector<float> kbuf(kBlock * d), vbuf(kBlock * d);
      for (int64_t w; (w = next.fetch_add(1)) < static_cast<int64_t>(items.size());) {
        const auto& it = items[order[w]];
        const auto& K = k_pools[it.e];
        const auto& V = v_pools[it.e];
        for (int64_t j = 0; j < it.nh; ++j)
          for (int64_t i = 0; i < d; ++i)
            qf[j * d + i] = static_cast<acc_t>(qp[(it.b * Hq + it.h0 + j) * d + i]) * static_cast<acc_t>(softmax_scale);
        const scalar_t* kp = K.const_data_ptr<scalar_t>() + it.b * K.stride(0) + it.c * K.stride(1) + it.t0 * K.stride(2);
        const scalar_t* vp = V.const_data_ptr<scalar_t>() + it.b * V.stride(0) + it.c * V.stride(1) + it.t0 * V.stride(2);
        attend_pool<scalar_t>(qf.data(), it.nh, d, kp, vp, it.t1 - it.t0, K.stride(2), V.stride(2), mp + it.slot,
                              lsum + it.slot, ap + it.slot * d, kbuf, vbuf);
      }
    });
    // Merge the partials of every (b, query head) over experts and token ranges by log-sum-exp.
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * Hq, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      std::vector<int64_t> parts;
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hq, h = bh % Hq;
        parts.clear();
        for (int64_t e = 0; e < E; ++e) {
          const auto [item, ranges] = first[(b * E + e) * Hq + h];
          for (int64_t r = 0; r < ranges; ++r) parts.push_back(items[item + r].slot + (h - items[item + r].h0));
        }
        acc_t M = -std::numeric_limits<acc_t>::infinity();
        for (const int64_t row : parts) M = std::max(M, mp[row]);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t denom = 0;
        if (M != -std::numeric_limits<acc_t>::infinity()) {
          for (const int64_t row : parts) {
            const acc_t w = std::exp(mp[row] - M);
            if (w == 0) continue;
            denom += w * lsum[row];
            const acc_t* a = ap + row * d;
            for (int64_t i = 0; i < d; ++i) acc[i] += w * a[i];
          }
        }
        // A sequence with no cached token attends to nothing: its output is 0.
        const acc_t inv = denom > 0 ? acc_t(1) / denom : acc_t(0);
        for (int64_t i = 0; i < d; ++i) op[bh * d + i] = static_cast<scalar_t>(acc[i] * inv);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixsga, CPU, m) { m.impl("hetero_decode_attention", &hetero_decode_attention_cpu); }

}  // namespace mixsga::cpu
