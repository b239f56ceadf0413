// hetero_decode_attention edge cases on the CPU: keys that score -inf (they get no weight, whether
// they fill a whole split range or only start one), and checks that never read device data (decode
// runs once per generated token; a device-to-host read there stalls the GPU pipeline every step).
#include <ATen/record_function.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "ops/decode_attention_checks.h"

namespace ops = mixsga::ops;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Decode attention written out in float64, pool by pool expanded to the query heads: scores by an
// elementwise product and sum (so a -inf key entry times a positive query entry gives a -inf score,
// never NaN), softmax over every cached token of every pool. A query whose every score is -inf
// attends to nothing, like one with an empty cache: zeros.
torch::Tensor reference_decode(const torch::Tensor& q, const std::vector<torch::Tensor>& k,
                               const std::vector<torch::Tensor>& v, const torch::Tensor& lengths, int64_t Hkv) {
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2);
  auto out = torch::zeros({B, Hq, d}, torch::kDouble);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      std::vector<torch::Tensor> scores, values;
      for (size_t e = 0; e < k.size(); ++e) {
        const int64_t n = lengths[b][static_cast<int64_t>(e)].item<int64_t>();
        const int64_t kv_head = h / (Hq / Hkv), c = kv_head / (Hkv / k[e].size(1));  // compact head of h
        const auto keys = k[e][b][c].narrow(0, 0, n).to(torch::kDouble);
        scores.push_back((keys * q[b][h].to(torch::kDouble)).sum(-1) / std::sqrt(static_cast<double>(d)));
        values.push_back(v[e][b][c].narrow(0, 0, n).to(torch::kDouble));
      }
      const auto s = torch::cat(scores), V = torch::cat(values);
      if (s.numel() == 0 || s.max().item<double>() == -kInf) continue;
      out[b][h] = torch::matmul(torch::softmax(s, 0), V);
    }
  }
  return out;
}

}  // namespace

TEST(DecodeAttentionInf, KeysScoredMinusInfinityGetNoWeight) {
  torch::manual_seed(30);
  const int64_t B = 4, Hq = 2, Hkv = 1, d = 16;
  // One pool long enough to be split into token ranges of 2048 (2 query heads per item), and a
  // short second pool.
  const int64_t T0 = 5000, T1 = 200;
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    auto q = torch::randn({B, Hq, d}, torch::kDouble);
    q.select(2, 0).abs_().add_(0.5);  // q[..., 0] > 0: a key with k[0] = -inf scores -inf
    std::vector<torch::Tensor> k{torch::randn({B, 1, T0, d}, torch::kDouble), torch::randn({B, 1, T1, d}, torch::kDouble)};
    std::vector<torch::Tensor> v{torch::randn({B, 1, T0, d}, torch::kDouble), torch::randn({B, 1, T1, d}, torch::kDouble)};
    auto key0 = [&](int64_t e, int64_t b, int64_t t0, int64_t n) { k[e][b][0].narrow(0, t0, n).select(1, 0).fill_(-kInf); };
    // Sequence 0: the whole first token range of pool 0 scores -inf.
    key0(0, 0, 0, 2048);
    // Sequence 1: the first 100 tokens of a range (a whole 64-token block, then part of the next)
    // score -inf, followed by finite scores in the same range, in both pools.
    key0(0, 1, 2048, 100);
    key0(1, 1, 0, 100);
    // Sequence 2: every key of pool 1 scores -inf; pool 0 is finite.
    key0(1, 2, 0, T1);
    // Sequence 3: every key of both pools scores -inf: zeros, as for an empty cache.
    key0(0, 3, 0, T0);
    key0(1, 3, 0, T1);
    const auto lengths = torch::tensor({{T0, T1}, {T0, T1}, {int64_t{4000}, T1}, {T0, int64_t{150}}});
    std::vector<torch::Tensor> kd, vd;
    for (size_t e = 0; e < k.size(); ++e) {
      kd.push_back(k[e].to(dtype));
      vd.push_back(v[e].to(dtype));
    }
    const auto got = ops::hetero_decode_attention(q.to(dtype), kd, vd, lengths, Hkv);
    const auto want = reference_decode(q.to(dtype), kd, vd, lengths, Hkv);
    ASSERT_TRUE(torch::isfinite(want.narrow(0, 0, 3)).all().item<bool>());
    for (int64_t b = 0; b < B; ++b) {
      const auto row = got[b].to(torch::kDouble);
      EXPECT_TRUE(torch::isfinite(row).all().item<bool>()) << "sequence " << b << " dtype " << dtype;
      const double err = (row - want[b]).abs().max().item<double>();
      EXPECT_LE(err, dtype == torch::kDouble ? 1e-12 : 1e-5) << "sequence " << b << " dtype " << dtype;
    }
    EXPECT_EQ(got[3].abs().sum().item<double>(), 0.0);
  }
}

// ---- no device reads in the checks ------------------------------------------------------------------

TEST(DecodeAttentionChecks, ReadNoValuesOfLengthsThatAreNotOnTheHost) {
  // Meta tensors have shapes but no data: any value read (aminmax + item) throws. They stand in for
  // CUDA lengths, whose reading would synchronise the host with the GPU at every decode step.
  const auto meta = torch::TensorOptions().device(torch::kMeta);
  const auto q = torch::empty({2, 8, 16}, meta);
  const std::vector<torch::Tensor> k{torch::empty({2, 4, 10, 16}, meta), torch::empty({2, 1, 7, 16}, meta)};
  const auto lengths = torch::empty({2, 2}, meta.dtype(torch::kLong));
  if (!mixsga::detail::debug_checks_enabled()) {
    EXPECT_FALSE(mixsga::detail::decode_checks_read_lengths(lengths));
    mixsga::detail::DecodeShapes shapes{};
    EXPECT_NO_THROW(shapes = mixsga::detail::check_decode_attention_args(q, k, k, lengths, 4));
    EXPECT_EQ(shapes.batch, 2);
    EXPECT_EQ(shapes.query_heads, 8);
    EXPECT_EQ(shapes.head_dim, 16);
    EXPECT_EQ(shapes.experts, 2);
  }
  EXPECT_TRUE(mixsga::detail::decode_checks_read_lengths(torch::zeros({2, 2}, torch::kLong)));
  // Metadata is still checked without reading anything.
  EXPECT_THROW(mixsga::detail::check_decode_attention_args(q, k, k, torch::empty({2, 3}, meta.dtype(torch::kLong)), 4),
               c10::ValueError);
  EXPECT_THROW(mixsga::detail::check_decode_attention_args(q, k, k, torch::empty({2, 2}, meta), 4), c10::TypeError);
}

namespace {
std::atomic<int> g_scalar_reads{0};
std::atomic<int> g_aminmax_calls{0};

std::unique_ptr<at::ObserverContext> count_reads(const at::RecordFunction& fn) {
  const char* name = fn.name();
  if (std::strcmp(name, "aten::_local_scalar_dense") == 0 || std::strcmp(name, "aten::item") == 0) ++g_scalar_reads;
  if (std::strcmp(name, "aten::aminmax") == 0) ++g_aminmax_calls;
  return nullptr;
}
}  // namespace

TEST(DecodeAttentionChecks, CpuCallReadsLengthsWithoutScalarOpsOrAminmax) {
  // The same code path on CPU tensors: the lengths are read straight from host memory, so the call
  // makes no item() / aminmax calls (each was a device sync, and aminmax a temporary, on CUDA).
  torch::manual_seed(31);
  const auto q = torch::randn({2, 8, 16});
  const std::vector<torch::Tensor> k{torch::randn({2, 4, 10, 16}), torch::randn({2, 2, 7, 16}), torch::randn({2, 1, 5, 16})};
  const auto lengths = torch::tensor({{10, 3, 5}, {4, 7, 0}});
  g_scalar_reads = 0;
  g_aminmax_calls = 0;
  const auto handle = at::addGlobalCallback(at::RecordFunctionCallback(count_reads).needsInputs(false));
  at::Tensor out;
  try {
    out = ops::hetero_decode_attention(q, k, k, lengths, 4);
  } catch (...) {
    at::removeCallback(handle);
    throw;
  }
  at::removeCallback(handle);
  ASSERT_TRUE(out.defined());
  EXPECT_EQ(g_scalar_reads.load(), 0) << "item() / _local_scalar_dense calls in one decode call";
  EXPECT_EQ(g_aminmax_calls.load(), 0) << "aminmax calls in one decode call";
  // The probe does see such calls (a counter that never counts proves nothing).
  const auto probe = at::addGlobalCallback(at::RecordFunctionCallback(count_reads).needsInputs(false));
  (void)lengths.max().item<int64_t>();
  (void)at::aminmax(lengths);
  at::removeCallback(probe);
  EXPECT_GE(g_scalar_reads.load(), 1);
  EXPECT_GE(g_aminmax_calls.load(), 1);
  // Host lengths are still range-checked, naming the column and the values seen.
  try {
    ops::hetero_decode_attention(q, k, k, torch::tensor({{10, 3, 6}, {4, 7, -1}}), 4);
    FAIL() << "lengths out of range were accepted";
  } catch (const c10::ValueError& err) {
    EXPECT_NE(std::string(err.what()).find("lengths: column 2 must be in [0, 5]"), std::string::npos) << err.what();
    EXPECT_NE(std::string(err.what()).find("got values in [-1, 6]"), std::string::npos) << err.what();
  }
}
