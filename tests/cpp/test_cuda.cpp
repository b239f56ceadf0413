// CUDA kernels against the CPU kernels: every op, every dtype (float64 where the op takes it),
// non-contiguous and empty inputs, gradients in float64, and the cached decode path of the layer.
// Each *_CUDA test skips itself, with the reason, when no GPU is visible; the registration test runs
// everywhere.
#include <ATen/core/dispatch/Dispatcher.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <mixsga/cache.h>
#include <mixsga/mixsga.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "reference.h"

namespace ops = mixsga::ops;
using namespace mixsga::testing;

namespace {

#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible"

const std::vector<int64_t> kGroups{1, 2, 4};
const std::vector<torch::Dtype> kAllDtypes{torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kHalf};

torch::Tensor on_gpu(const torch::Tensor& t) { return t.to(torch::kCUDA); }

// Largest |a - b| after both go to float64 on the CPU.
double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.numel() == 0) return 0.0;
  return (a.cpu().to(torch::kDouble) - b.cpu().to(torch::kDouble)).abs().max().item<double>();
}

// Absolute tolerance of a CPU-vs-CUDA comparison of values of magnitude ~`scale` in `dtype`: a few
// roundings in that dtype (bf16 keeps 8 bits, fp16 11, float32 24).
double tolerance(torch::Dtype dtype, double scale = 1.0) {
  switch (dtype) {
    case torch::kDouble:
      return 1e-10 * scale;
    case torch::kFloat:
      return 2e-5 * scale;
    case torch::kHalf:
      return 4e-3 * scale;
    default:
      return 3e-2 * scale;
  }
}

// Gradient of sum(f(input) * weights) with respect to input, on input's device.
torch::Tensor gradient_of(const std::function<torch::Tensor(const torch::Tensor&)>& f, const torch::Tensor& input,
                          const torch::Tensor& weights) {
  auto x = input.detach().clone().requires_grad_(true);
  (f(x) * weights).sum().backward();
  return x.grad();
}

}  // namespace

// ---- registration (runs without a GPU) ------------------------------------------------------------

TEST(CudaRegistration, EveryOpHasACudaKernelOrNoneHas) {
  const char* names[] = {"mixsga::route_expert_choice", "mixsga::grouped_kv_pool",   "mixsga::grouped_kv_proj",
                         "mixsga::_grouped_kv_proj_backward", "mixsga::expert_permutation", "mixsga::expert_scatter",
                         "mixsga::expert_gather",     "mixsga::hetero_decode_attention", "mixsga::rope_rotate"};
  int with_cuda = 0;
  for (const char* name : names) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    ASSERT_TRUE(op.has_value()) << name;
    with_cuda += op->hasKernelForDispatchKey(c10::DispatchKey::CUDA) ? 1 : 0;
  }
  const int total = static_cast<int>(std::size(names));
  EXPECT_TRUE(with_cuda == 0 || with_cuda == total) << with_cuda << " of " << total << " ops have a CUDA kernel";
  // A GPU run needs the library built with its CUDA kernels (MIXSGA_WITH_CUDA=ON).
  if (torch::cuda::is_available()) EXPECT_EQ(with_cuda, total);
}

// ---- route_expert_choice ------------------------------------------------------------------------

TEST(CudaParity, RouteExpertChoice_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(10);
  const std::vector<std::vector<double>> ratio_sets{
      {0.3, 0.1, 0.6}, {0.25, 0.25, 0.5}, {1.0, 0.0, 0.0}, {0.0, 0.0, 1.0}, {0.5, 0.5}, {1.0}, {0.1, 0.2, 0.3, 0.4}};
  for (const auto& ratios : ratio_sets) {
    const int64_t E = static_cast<int64_t>(ratios.size());
    for (int64_t L : {1, 10, 37, 3001}) {
      const int64_t B = 3;
      // Quantised scores make many ties; NaN, +-inf and +-0 exercise the ordering rules.
      auto scores = (torch::randn({B, L, E}, torch::kDouble) * 4).round() / 4;
      auto flat = scores.view({-1});
      const int64_t n = flat.numel();
      for (int64_t i = 0; i < n; i += 7) flat[i] = std::numeric_limits<double>::quiet_NaN();
      for (int64_t i = 3; i < n; i += 11) flat[i] = -0.0;
      for (int64_t i = 5; i < n; i += 13) flat[i] = 0.0;
      for (int64_t i = 2; i < n; i += 29) flat[i] = -std::numeric_limits<double>::infinity();
      for (int64_t i = 4; i < n; i += 31) flat[i] = std::numeric_limits<double>::infinity();
      auto mask = torch::rand({B, L}) > 0.25;
      mask.select(1, 0).fill_(true);  // every sequence keeps a valid token
      for (auto dtype : kAllDtypes) {
        const auto s = scores.to(dtype);
        for (bool masked : {false, true}) {
          const std::optional<torch::Tensor> m = masked ? std::optional(mask) : std::nullopt;
          const std::optional<torch::Tensor> m_gpu = masked ? std::optional(on_gpu(mask)) : std::nullopt;
          const auto want = ops::route_expert_choice(s, ratios, m);
          const auto got = ops::route_expert_choice(on_gpu(s), ratios, m_gpu);
          ASSERT_EQ(got.device().type(), torch::kCUDA);
          EXPECT_TRUE(torch::equal(got.cpu(), want))
              << "E=" << E << " L=" << L << " dtype=" << dtype << " masked=" << masked;
        }
      }
    }
  }
  // Non-contiguous scores, an integer mask, the reference, empty inputs, bad input.
  const auto base = torch::randn({3, 2, 50});
  const auto scores = base.permute({1, 2, 0});  // [2, 50, 3]
  ASSERT_FALSE(scores.is_contiguous());
  const auto mask = (torch::rand({2, 50}) > 0.5).to(torch::kInt).index_put_({torch::indexing::Slice(), 0}, 1);
  const auto got = ops::route_expert_choice(on_gpu(scores), {0.3, 0.1, 0.6}, on_gpu(mask));
  EXPECT_TRUE(torch::equal(got.cpu(), reference_route(scores, {0.3, 0.1, 0.6}, mask.ne(0))));
  EXPECT_EQ(ops::route_expert_choice(on_gpu(torch::randn({0, 5, 3})), {0.3, 0.1, 0.6}).sizes(),
            (std::vector<int64_t>{0, 5}));
  EXPECT_EQ(ops::route_expert_choice(on_gpu(torch::randn({2, 0, 3})), {0.3, 0.1, 0.6}).sizes(),
            (std::vector<int64_t>{2, 0}));
  EXPECT_THROW(ops::route_expert_choice(on_gpu(torch::randn({2, 4, 3})), {0.3, 0.1, 0.6},
                                        on_gpu(torch::tensor({{1, 1, 0, 0}, {0, 0, 0, 0}}))),
               c10::ValueError);
  EXPECT_THROW(ops::route_expert_choice(on_gpu(torch::randn({1, 4, 17})), std::vector<double>(17, 1.0 / 17)),
               c10::ValueError);
}

// ---- grouped_kv_pool ----------------------------------------------------------------------------

TEST(CudaParity, GroupedKVPool_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(11);
  for (int64_t d : {5, 16, 64}) {
    const auto kv = torch::randn({3, 7, 8, d}, torch::kDouble);
    const auto idx = torch::randint(0, 3, {3, 7});
    for (auto dtype : kAllDtypes) {
      const auto x = kv.to(dtype);
      const auto want = ops::grouped_kv_pool(x, idx, kGroups);
      const auto got = ops::grouped_kv_pool(on_gpu(x), on_gpu(idx), kGroups);
      ASSERT_EQ(got.scalar_type(), dtype);
      EXPECT_LE(max_diff(got, want), tolerance(dtype, 4.0)) << "d=" << d << " dtype=" << dtype;
    }
  }
  // Non-contiguous kv and int32 indices; empty token dims.
  const auto kv = torch::randn({8, 7, 3, 16}).permute({2, 1, 0, 3});  // [3, 7, 8, 16]
  const auto idx = torch::randint(0, 3, {7, 3}).t();
  ASSERT_FALSE(kv.is_contiguous());
  EXPECT_LE(max_diff(ops::grouped_kv_pool(on_gpu(kv), on_gpu(idx.to(torch::kInt)), kGroups),
                     ops::grouped_kv_pool(kv.contiguous(), idx.contiguous(), kGroups)),
            1e-6);
  EXPECT_EQ(ops::grouped_kv_pool(on_gpu(torch::randn({2, 0, 4, 8})), on_gpu(torch::zeros({2, 0}, torch::kLong)), kGroups)
                .sizes(),
            (std::vector<int64_t>{2, 0, 4, 8}));
  EXPECT_THROW(ops::grouped_kv_pool(on_gpu(torch::randn({2, 4, 8})), torch::zeros({2}, torch::kLong), kGroups),
               c10::ValueError);
}

TEST(CudaGrad, GroupedKVPool_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(12);
  const auto idx = torch::randint(0, 3, {3, 4});
  const auto kv = torch::randn({3, 4, 4, 3}, torch::kDouble);
  const auto weights = torch::randn({3, 4, 4, 3}, torch::kDouble);
  const auto want = gradient_of([&](const torch::Tensor& t) { return ops::grouped_kv_pool(t, idx, kGroups); }, kv, weights);
  const auto got = gradient_of([&](const torch::Tensor& t) { return ops::grouped_kv_pool(t, on_gpu(idx), kGroups); },
                               on_gpu(kv), on_gpu(weights));
  EXPECT_LE(max_diff(got, want), 1e-12);
  const double err = max_gradient_error(
      [&](const std::vector<torch::Tensor>& in) { return ops::grouped_kv_pool(in[0], on_gpu(idx), kGroups); },
      {on_gpu(torch::randn({3, 4, 4, 3}))});
  EXPECT_LT(err, 1e-7);
}

// ---- grouped_kv_proj ----------------------------------------------------------------------------

TEST(CudaParity, GroupedKVProj_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(13);
  const int64_t Hkv = 4, d = 16, D = 32;
  const auto x = torch::randn({3, 17, D}, torch::kDouble);
  const auto w = torch::randn({Hkv * d, D}, torch::kDouble) / 6;
  const auto b = torch::randn({Hkv * d}, torch::kDouble);
  const auto idx = torch::randint(0, 3, {3, 17});
  const auto exact = ops::grouped_kv_proj(x, w, b, idx, kGroups, d);
  for (auto dtype : kAllDtypes) {
    for (bool with_bias : {true, false}) {
      const auto bias = with_bias ? std::optional(b.to(dtype)) : std::nullopt;
      const auto bias_gpu = with_bias ? std::optional(on_gpu(b.to(dtype))) : std::nullopt;
      const auto cpu = ops::grouped_kv_proj(x.to(dtype), w.to(dtype), bias, idx, kGroups, d);
      const auto gpu = ops::grouped_kv_proj(on_gpu(x.to(dtype)), on_gpu(w.to(dtype)), bias_gpu, on_gpu(idx), kGroups, d);
      ASSERT_EQ(gpu.scalar_type(), dtype);
      ASSERT_EQ(gpu.sizes(), cpu.sizes());
      EXPECT_LE(max_diff(gpu, cpu), tolerance(dtype, 4.0)) << "dtype=" << dtype << " bias=" << with_bias;
      if (with_bias && (dtype == torch::kBFloat16 || dtype == torch::kHalf)) {
        // flash-attention's rule: within 2x of the CPU low-precision result's error against float64.
        EXPECT_LE(max_diff(gpu, exact), 2 * max_diff(cpu, exact) + 1e-6) << dtype;
      }
    }
  }
  // One expert owning every token (no row movement), unused experts.
  for (int64_t e = 0; e < 3; ++e) {
    const auto all = torch::full({3, 17}, e, torch::kLong);
    EXPECT_LE(max_diff(ops::grouped_kv_proj(on_gpu(x), on_gpu(w), on_gpu(b), on_gpu(all), kGroups, d),
                       ops::grouped_kv_proj(x, w, b, all, kGroups, d)),
              1e-10);
  }
  // Non-contiguous x / weight, int32 indices, odd head dim (unpacked kernels), empty tokens.
  const auto xn = torch::randn({D, 3, 5}).permute({1, 2, 0});
  const auto wn = torch::randn({D, 4 * 3}).t();
  const auto idxn = torch::randint(0, 3, {5, 3}).t();
  EXPECT_LE(max_diff(ops::grouped_kv_proj(on_gpu(xn), on_gpu(wn), std::nullopt, on_gpu(idxn.to(torch::kInt)), kGroups, 3),
                     ops::grouped_kv_proj(xn, wn, std::nullopt, idxn, kGroups, 3)),
            1e-4);
  const auto empty = ops::grouped_kv_proj(on_gpu(torch::randn({0, 5, D})), on_gpu(w.to(torch::kFloat)), std::nullopt,
                                          on_gpu(torch::zeros({0, 5}, torch::kLong)), kGroups, d);
  EXPECT_EQ(empty.sizes(), (std::vector<int64_t>{0, 5, Hkv, d}));
}

TEST(CudaGrad, GroupedKVProj_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(14);
  const int64_t Hkv = 4, d = 6, D = 10;
  const auto x = torch::randn({2, 9, D}, torch::kDouble);
  const auto w = torch::randn({Hkv * d, D}, torch::kDouble);
  const auto b = torch::randn({Hkv * d}, torch::kDouble);
  const auto upstream = torch::randn({2, 9, Hkv, d}, torch::kDouble);
  std::vector<torch::Tensor> idx_cases{torch::randint(0, 3, {2, 9}), torch::full({2, 9}, 2, torch::kLong)};
  for (const auto& idx : idx_cases) {
    auto run = [&](const torch::Device& device) {
      // Fresh leaves on both devices: to(kCPU) of a CPU tensor returns that very tensor, so
      // requires_grad_ on it would mark x itself, and the CUDA copies would then be non-leaves
      // without a .grad() (an empty comparison that passes).
      auto leaf = [&](const torch::Tensor& t) { return t.to(device).detach().clone().requires_grad_(true); };
      auto xs = leaf(x), ws = leaf(w), bs = leaf(b);
      (ops::grouped_kv_proj(xs, ws, bs, idx.to(device), kGroups, d) * upstream.to(device)).sum().backward();
      return std::vector<torch::Tensor>{xs.grad(), ws.grad(), bs.grad()};
    };
    const auto want = run(torch::kCPU);
    const auto got = run(torch::kCUDA);
    ASSERT_FALSE(x.requires_grad() || w.requires_grad() || b.requires_grad());
    for (size_t i = 0; i < 3; ++i) {
      ASSERT_TRUE(want[i].defined() && got[i].defined()) << "gradient " << i << " was not computed";
      ASSERT_EQ(got[i].device().type(), torch::kCUDA) << "gradient " << i;
      EXPECT_LE(max_diff(got[i], want[i]), 1e-10) << "gradient " << i;
    }
  }
  // Finite differences on the device, with and without bias.
  const auto idx = on_gpu(torch::randint(0, 3, {2, 5}));
  for (bool with_bias : {true, false}) {
    std::vector<torch::Tensor> inputs{on_gpu(torch::randn({2, 5, 3})), on_gpu(torch::randn({4 * 2, 3}))};
    if (with_bias) inputs.push_back(on_gpu(torch::randn({4 * 2})));
    const double err = max_gradient_error(
        [&](const std::vector<torch::Tensor>& in) {
          return ops::grouped_kv_proj(in[0], in[1], with_bias ? std::optional(in[2]) : std::nullopt, idx, kGroups, 2);
        },
        inputs);
    EXPECT_LT(err, 1e-7) << "bias=" << with_bias;
  }
  // Low precision and empty inputs: the backward op itself, CUDA against CPU.
  static auto backward = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mixsga::_grouped_kv_proj_backward", "")
                             .typed<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>(
                                 const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                 const torch::Tensor&, c10::IntArrayRef, int64_t)>();
  const auto idx2 = torch::randint(0, 3, {2, 9});
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    const auto [gx, gw, gb] = backward.call(upstream.to(dtype), x.to(dtype), w.to(dtype), idx2, kGroups, d);
    const auto [cx, cw, cb] = backward.call(on_gpu(upstream.to(dtype)), on_gpu(x.to(dtype)), on_gpu(w.to(dtype)),
                                            on_gpu(idx2), kGroups, d);
    for (const auto& [got, want] : {std::pair{cx, gx}, std::pair{cw, gw}, std::pair{cb, gb}}) {
      const double scale = std::max(1.0, want.abs().max().item<double>());
      EXPECT_LE(max_diff(got, want), tolerance(dtype, scale)) << dtype;
    }
  }
  const auto [ex, ew, eb] = backward.call(on_gpu(torch::randn({0, Hkv, d})), on_gpu(torch::randn({0, D})),
                                          on_gpu(w.to(torch::kFloat)), on_gpu(torch::zeros({0}, torch::kLong)), kGroups, d);
  EXPECT_EQ(ex.sizes(), (std::vector<int64_t>{0, D}));
  EXPECT_EQ(ew.abs().sum().item<double>(), 0.0);
  EXPECT_EQ(eb.abs().sum().item<double>(), 0.0);
}

TEST(CudaGrad, GroupedKVProjDoubleBackward_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(20);
  const int64_t Hkv = 4, d = 3, D = 5;
  const auto x = torch::randn({2, 7, D}, torch::kDouble), w = torch::randn({Hkv * d, D}, torch::kDouble);
  const auto b = torch::randn({Hkv * d}, torch::kDouble), u = torch::randn({2, 7, Hkv, d}, torch::kDouble);
  const auto px = torch::randn_like(x), pw = torch::randn_like(w), pb = torch::randn_like(b);
  const auto idx = torch::randint(0, 3, {2, 7});
  // A gradient penalty: <d<f, u>/d(x, w, b), probes>, differentiated again with respect to x, w and u.
  auto run = [&](const torch::Device& device) {
    auto leaf = [&](const torch::Tensor& t) { return t.to(device).detach().clone().requires_grad_(true); };
    auto xs = leaf(x), ws = leaf(w), bs = leaf(b), us = leaf(u);
    const auto first = torch::autograd::grad({(ops::grouped_kv_proj(xs, ws, bs, idx.to(device), kGroups, d) * us).sum()},
                                             {xs, ws, bs}, {}, true, true);
    const auto penalty =
        (first[0] * px.to(device)).sum() + (first[1] * pw.to(device)).sum() + (first[2] * pb.to(device)).sum();
    return torch::autograd::grad({penalty}, {xs, ws, us});
  };
  const auto want = run(torch::kCPU);
  const auto got = run(torch::kCUDA);
  for (size_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(want[i].defined() && got[i].defined()) << "second-order gradient " << i;
    EXPECT_LE(max_diff(got[i], want[i]), 1e-10) << "second-order gradient " << i;
  }
}

// ---- expert_permutation / expert_scatter / expert_gather ----------------------------------------

TEST(CudaParity, ExpertPermutation_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(15);
  for (int64_t n : {0, 1, 5, 2048, 2049, 100003}) {
    for (int64_t E : {1, 3, 8, 256}) {
      const auto idx = torch::randint(0, E, {n});
      const auto [perm, offsets] = ops::expert_permutation(idx, E);
      const auto [gperm, goffsets] = ops::expert_permutation(on_gpu(idx), E);
      EXPECT_TRUE(torch::equal(gperm.cpu(), perm)) << "n=" << n << " E=" << E;
      EXPECT_TRUE(torch::equal(goffsets.cpu(), offsets)) << "n=" << n << " E=" << E;
    }
  }
  // Multi-dim int32 indices, skewed to one expert.
  const auto idx = (torch::rand({4, 13}) > 0.8).to(torch::kInt) * 2;
  const auto [perm, offsets] = ops::expert_permutation(idx, 3);
  const auto [gperm, goffsets] = ops::expert_permutation(on_gpu(idx), 3);
  EXPECT_TRUE(torch::equal(gperm.cpu(), perm));
  EXPECT_TRUE(torch::equal(goffsets.cpu(), offsets));
  EXPECT_THROW(ops::expert_permutation(on_gpu(torch::zeros({4}, torch::kLong)), 257), c10::ValueError);
  EXPECT_THROW(ops::expert_permutation(on_gpu(torch::full({4}, 3, torch::kLong)), 3), c10::ValueError);
}

TEST(CudaParity, ExpertScatterGather_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(16);
  const int64_t n = 301;
  const auto perm = std::get<0>(ops::expert_permutation(torch::randint(0, 3, {n}), 3));
  // Rows of 128, 8, 4, 6, 10, 2 and 3 bytes take each access width of the row copy.
  const std::vector<std::pair<std::vector<int64_t>, torch::Dtype>> cases{
      {{n, 8, 4}, torch::kFloat}, {{n}, torch::kDouble},     {{n, 2}, torch::kHalf}, {{n, 3}, torch::kHalf},
      {{n, 5}, torch::kBFloat16}, {{n}, torch::kHalf},       {{n, 3}, torch::kChar}};
  for (const auto& [shape, dtype] : cases) {
    const auto x = (torch::randn(shape) * 50).to(dtype);
    const auto scattered = ops::expert_scatter(on_gpu(x), on_gpu(perm));
    EXPECT_TRUE(torch::equal(scattered.cpu(), ops::expert_scatter(x, perm))) << dtype;
    EXPECT_TRUE(torch::equal(ops::expert_gather(scattered, on_gpu(perm)).cpu(), x)) << dtype;
  }
  // Non-contiguous rows; empty.
  const auto xt = torch::randn({4, n}).t();
  EXPECT_TRUE(torch::equal(ops::expert_scatter(on_gpu(xt), on_gpu(perm)).cpu(), xt.index_select(0, perm)));
  const auto p0 = on_gpu(torch::zeros({0}, torch::kLong));
  EXPECT_EQ(ops::expert_scatter(on_gpu(torch::randn({0, 4})), p0).sizes(), (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(ops::expert_gather(on_gpu(torch::randn({0, 4})), p0).sizes(), (std::vector<int64_t>{0, 4}));
  // Not a permutation: a repeated value, a value out of range, a wrong dtype.
  const auto x = on_gpu(torch::randn({4, 2}));
  EXPECT_THROW(ops::expert_scatter(x, on_gpu(torch::tensor({0, 1, 1, 3}))), c10::ValueError);
  EXPECT_THROW(ops::expert_gather(x, on_gpu(torch::tensor({0, 1, 2, 4}))), c10::ValueError);
  EXPECT_THROW(ops::expert_gather(x, on_gpu(torch::tensor({0, -1, 2, 3}))), c10::ValueError);
  EXPECT_THROW(ops::expert_scatter(x, on_gpu(torch::tensor({0, 1, 2, 3}, torch::kInt))), c10::TypeError);
}

TEST(CudaGrad, ExpertScatterGather_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(17);
  const auto perm = std::get<0>(ops::expert_permutation(torch::randint(0, 3, {40}), 3));
  const auto x = torch::randn({40, 3}, torch::kDouble), weights = torch::randn({40, 3}, torch::kDouble);
  auto f = [](const torch::Tensor& p) {
    return [p](const torch::Tensor& t) { return ops::expert_gather(ops::expert_scatter(t, p) * t.index_select(0, p), p); };
  };
  EXPECT_LE(max_diff(gradient_of(f(on_gpu(perm)), on_gpu(x), on_gpu(weights)), gradient_of(f(perm), x, weights)), 1e-12);
  const auto small = on_gpu(std::get<0>(ops::expert_permutation(torch::randint(0, 3, {12}), 3)));
  const double err = max_gradient_error(
      [&](const std::vector<torch::Tensor>& in) { return ops::expert_gather(ops::expert_scatter(in[0], small) * in[0], small); },
      {on_gpu(torch::randn({12, 2}))});
  EXPECT_LT(err, 1e-7);
}

// ---- hetero_decode_attention --------------------------------------------------------------------

namespace {

// Decode attention written out: every pool expanded to Hq heads, plain softmax, computed in `dtype`
// on the device of q (float64 for the exact answer, a low dtype for PyTorch's own error).
torch::Tensor expanded_decode(const torch::Tensor& q, const std::vector<torch::Tensor>& k,
                              const std::vector<torch::Tensor>& v, const torch::Tensor& lengths, int64_t Hkv,
                              torch::Dtype dtype) {
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2);
  const auto len = lengths.cpu().to(torch::kLong);
  std::vector<torch::Tensor> rows;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<torch::Tensor> ks, vs;
    for (size_t e = 0; e < k.size(); ++e) {
      const int64_t n = len[b][static_cast<int64_t>(e)].item<int64_t>(), g = Hkv / k[e].size(1);
      ks.push_back(k[e][b].narrow(1, 0, n).to(dtype).repeat_interleave(g * (Hq / Hkv), 0));
      vs.push_back(v[e][b].narrow(1, 0, n).to(dtype).repeat_interleave(g * (Hq / Hkv), 0));
    }
    const auto K = torch::cat(ks, 1), V = torch::cat(vs, 1);  // [Hq, n, d]
    if (K.size(1) == 0) {
      rows.push_back(torch::zeros({Hq, d}, q.options().dtype(dtype)));
      continue;
    }
    const auto s = torch::matmul(K, q[b].to(dtype).unsqueeze(-1)).squeeze(-1) / std::sqrt(static_cast<double>(d));
    rows.push_back(torch::matmul(torch::softmax(s, -1).unsqueeze(1), V).squeeze(1));
  }
  return torch::stack(rows);
}

struct DecodeCase {
  int64_t B, Hq, Hkv, d;
  std::vector<int64_t> groups, capacities;
  bool unaligned_rows;  // pools whose token stride is odd: the generic kernel even for bf16/fp16
};

}  // namespace

TEST(CudaParity, HeteroDecodeAttention_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(18);
  const std::vector<DecodeCase> cases{
      {3, 8, 4, 64, {1, 2, 4}, {40, 7, 300}, false},    // tensor cores (16-bit), several chunks
      {2, 8, 4, 128, {1, 2, 4}, {129, 1, 64}, false},   // partial tiles
      {2, 4, 4, 256, {1, 2, 4}, {33, 70, 5}, false},    // the 32-token tiles of d = 256
      {3, 8, 4, 40, {1, 2, 4}, {50, 20, 90}, false},    // a head dim only the generic kernel takes
      {2, 32, 4, 128, {1, 2, 4}, {100, 50, 600}, false},  // 8, 16 and 32 query heads per compact head
      {2, 8, 4, 64, {1, 2, 4}, {60, 30, 90}, true},     // unaligned rows
      {2, 8, 2, 128, {1, 2}, {3000, 2500}, false},      // long context
      {1, 4, 1, 64, {1}, {700}, false},                 // one pool, MQA
  };
  for (const auto& c : cases) {
    for (auto dtype : kAllDtypes) {
      std::vector<torch::Tensor> k, v;
      const auto gpu = torch::TensorOptions().device(torch::kCUDA).dtype(dtype);
      for (size_t e = 0; e < c.groups.size(); ++e) {
        const int64_t pitch = c.d + (c.unaligned_rows ? 1 : 0);
        // Spare capacity (and for unaligned rows, a spare column), viewed narrower, as a cache hands them out.
        k.push_back(torch::randn({c.B, c.Hkv / c.groups[e], c.capacities[e] + 5, pitch}, gpu)
                        .narrow(2, 0, c.capacities[e])
                        .narrow(3, 0, c.d));
        v.push_back(torch::randn({c.B, c.Hkv / c.groups[e], c.capacities[e] + 5, pitch}, gpu)
                        .narrow(2, 0, c.capacities[e])
                        .narrow(3, 0, c.d));
      }
      // Sequence 0 fills every pool; the others take random lengths, with zeros (last: nothing cached).
      auto lengths = torch::zeros({c.B, static_cast<int64_t>(c.groups.size())}, torch::kLong);
      for (size_t e = 0; e < c.groups.size(); ++e) {
        const int64_t cap = c.capacities[e], col = static_cast<int64_t>(e);
        lengths[0][col] = cap;
        for (int64_t b = 1; b < c.B; ++b) lengths[b][col] = torch::randint(0, cap + 1, {1}).item<int64_t>();
      }
      if (c.B >= 3) lengths[c.B - 1].zero_();
      const auto q = torch::randn({c.B, c.Hq, c.d}, gpu);
      // Lengths on the CPU (as HeteroKVCache hands them out) or on the GPU as int32.
      const auto lengths_arg = dtype == torch::kFloat ? on_gpu(lengths.to(torch::kInt)) : lengths;
      const auto got = ops::hetero_decode_attention(q, k, v, lengths_arg, c.Hkv);
      ASSERT_EQ(got.scalar_type(), dtype);
      std::vector<torch::Tensor> k_cpu, v_cpu;
      for (size_t e = 0; e < k.size(); ++e) {
        k_cpu.push_back(k[e].cpu());
        v_cpu.push_back(v[e].cpu());
      }
      const auto cpu = ops::hetero_decode_attention(q.cpu(), k_cpu, v_cpu, lengths, c.Hkv);
      const auto exact = expanded_decode(q.cpu(), k_cpu, v_cpu, lengths, c.Hkv, torch::kDouble);
      const std::string what = fmt::format("d={} Hq={} Hkv={} unaligned={} dtype={}", c.d, c.Hq, c.Hkv,
                                           c.unaligned_rows, c10::toString(dtype));
      if (dtype == torch::kFloat || dtype == torch::kDouble) {
        EXPECT_LE(max_diff(got, cpu), tolerance(dtype, 4.0)) << what;
        EXPECT_LE(max_diff(got, exact), tolerance(dtype, 4.0)) << what;
      } else {
        const double err_ours = max_diff(got, exact);
        const double err_torch = max_diff(expanded_decode(q, k, v, lengths, c.Hkv, dtype), exact);
        EXPECT_LE(err_ours, 2 * err_torch + 1e-4) << what << " (PyTorch's own error " << err_torch << ")";
        EXPECT_LE(max_diff(got, cpu), tolerance(dtype, 2.0)) << what;
      }
      if (c.B >= 3) EXPECT_EQ(got[c.B - 1].abs().sum().item<double>(), 0.0) << what;
    }
  }
  // Empty batch, a custom scale, bad shapes.
  std::vector<torch::Tensor> k{on_gpu(torch::randn({0, 2, 3, 8}))}, v{on_gpu(torch::randn({0, 2, 3, 8}))};
  EXPECT_EQ(ops::hetero_decode_attention(on_gpu(torch::randn({0, 4, 8})), k, v, torch::zeros({0, 1}, torch::kLong), 2).sizes(),
            (std::vector<int64_t>{0, 4, 8}));
  std::vector<torch::Tensor> k1{on_gpu(torch::randn({1, 2, 3, 8}))}, v1{on_gpu(torch::randn({1, 2, 3, 8}))};
  const auto q1 = on_gpu(torch::randn({1, 4, 8}));
  EXPECT_LE(max_diff(ops::hetero_decode_attention(q1, k1, v1, torch::tensor({{3}}), 2, 0.7),
                     ops::hetero_decode_attention(q1.cpu(), {k1[0].cpu()}, {v1[0].cpu()}, torch::tensor({{3}}), 2, 0.7)),
            1e-5);
  EXPECT_THROW(ops::hetero_decode_attention(q1, k1, v1, torch::tensor({{4}}), 2), c10::ValueError);
  EXPECT_THROW(ops::hetero_decode_attention(on_gpu(torch::randn({1, 4, 300})), {on_gpu(torch::randn({1, 2, 3, 300}))},
                                            {on_gpu(torch::randn({1, 2, 3, 300}))}, torch::tensor({{3}}), 2),
               c10::ValueError);
}

TEST(CudaParity, HeteroDecodeAttentionKeysScoredMinusInfinity_CUDA) {
  // Chunks whose every score is -inf (keys with a -inf entry against a positive query entry) carry
  // no probability mass: the merge must skip them (0 * NaN partials gave NaN), as the CPU kernel does.
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(21);
  const int64_t B = 2, Hq = 8, Hkv = 4, d = 64;
  const std::vector<int64_t> groups{1, 4}, capacities{600, 300};
  const double inf = std::numeric_limits<double>::infinity();
  for (auto dtype : kAllDtypes) {
    std::vector<torch::Tensor> k, v;
    for (size_t e = 0; e < groups.size(); ++e) {
      k.push_back(torch::randn({B, Hkv / groups[e], capacities[e], d}, torch::kDouble));
      v.push_back(torch::randn({B, Hkv / groups[e], capacities[e], d}, torch::kDouble));
    }
    auto q = torch::randn({B, Hq, d}, torch::kDouble);
    q.select(2, 0).abs_().add_(0.5);  // q[..., 0] > 0: a key with k[0] = -inf scores -inf
    // Sequence 0: the first 256 tokens of pool 0 (whole chunks) and a run inside pool 1 score -inf.
    k[0][0].narrow(1, 0, 256).select(2, 0).fill_(-inf);
    k[1][0].narrow(1, 40, 30).select(2, 0).fill_(-inf);
    // Sequence 1: every key of pool 1 scores -inf (the whole pool is skipped).
    k[1][1].select(2, 0).fill_(-inf);
    const auto lengths = torch::tensor({{600, 300}, {500, 300}});
    std::vector<torch::Tensor> kc, vc, kg, vg;
    for (size_t e = 0; e < k.size(); ++e) {
      kc.push_back(k[e].to(dtype));
      vc.push_back(v[e].to(dtype));
      kg.push_back(on_gpu(kc.back()));
      vg.push_back(on_gpu(vc.back()));
    }
    const auto cpu = ops::hetero_decode_attention(q.to(dtype), kc, vc, lengths, Hkv);
    const auto got = ops::hetero_decode_attention(on_gpu(q.to(dtype)), kg, vg, lengths, Hkv);
    ASSERT_TRUE(torch::isfinite(got).all().item<bool>()) << dtype;
    ASSERT_TRUE(torch::isfinite(cpu).all().item<bool>()) << dtype;
    EXPECT_LE(max_diff(got, cpu), tolerance(dtype, 2.0)) << dtype;
  }
}

// ---- rope_rotate ----------------------------------------------------------------------------------

TEST(CudaParity, RopeRotate_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(22);
  for (int64_t d : {2, 8, 64, 130}) {
    for (bool per_batch : {false, true}) {
      const int64_t B = 3, L = 7, H = 5;
      const auto x = torch::randn({B, L, H, d}, torch::kDouble);
      const auto angles = torch::randn({per_batch ? B : 1, L, d}, torch::kDouble) * 3;
      const auto cos = angles.cos(), sin = angles.sin() * 1.3;  // not a rotation: the transpose is exercised
      for (bool transpose : {false, true}) {
        for (auto dtype : kAllDtypes) {
          const auto want = ops::rope_rotate(x.to(dtype), cos.to(dtype), sin.to(dtype), transpose);
          const auto got = ops::rope_rotate(on_gpu(x.to(dtype)), on_gpu(cos.to(dtype)), on_gpu(sin.to(dtype)), transpose);
          ASSERT_EQ(got.device().type(), torch::kCUDA);
          ASSERT_EQ(got.scalar_type(), dtype);
          ASSERT_TRUE(got.is_contiguous());
          const auto what = fmt::format("d={} per_batch={} transpose={} dtype={}", d, per_batch, transpose,
                                        c10::toString(dtype));
          // Products are rounded alone on both sides (no FMA): one rounding of the result apart at most.
          EXPECT_LE(max_diff(got, want), tolerance(dtype, 4.0)) << what;
          if (dtype == torch::kDouble) {
            // And against the composite form, written out independently of both kernels.
            const auto half = d / 2;
            const auto rot = torch::cat({-x.narrow(3, half, half), x.narrow(3, 0, half)}, 3);
            const auto composite = transpose
                                       ? x * cos.unsqueeze(2) +
                                             torch::cat({(x * sin.unsqueeze(2)).narrow(3, half, half),
                                                         -(x * sin.unsqueeze(2)).narrow(3, 0, half)},
                                                        3)
                                       : x * cos.unsqueeze(2) + rot * sin.unsqueeze(2);
            EXPECT_LE(max_diff(got, composite), 1e-12) << what;
          }
        }
      }
    }
  }
  // Strided heads (k and v views of one tensor), a non-contiguous head dim, empty inputs, bad input.
  const auto kv = torch::randn({2, 4, 6, 8}, torch::kDouble);
  const auto cos = torch::randn({1, 4, 8}, torch::kDouble), sin = torch::randn({1, 4, 8}, torch::kDouble);
  const auto k = kv.narrow(2, 3, 3);
  ASSERT_FALSE(k.is_contiguous());
  EXPECT_LE(max_diff(ops::rope_rotate(on_gpu(kv).narrow(2, 3, 3), on_gpu(cos), on_gpu(sin)), ops::rope_rotate(k, cos, sin)),
            1e-12);
  const auto xt = torch::randn({2, 4, 8, 3}, torch::kDouble).transpose(2, 3);  // head dim stride 3
  EXPECT_LE(max_diff(ops::rope_rotate(on_gpu(xt), on_gpu(cos), on_gpu(sin)), ops::rope_rotate(xt, cos, sin)), 1e-12);
  EXPECT_EQ(ops::rope_rotate(on_gpu(torch::randn({0, 4, 3, 8})), on_gpu(cos.to(torch::kFloat)),
                             on_gpu(sin.to(torch::kFloat)))
                .sizes(),
            (std::vector<int64_t>{0, 4, 3, 8}));
  EXPECT_THROW(ops::rope_rotate(on_gpu(torch::randn({2, 4, 3, 8})), cos.to(torch::kFloat), sin.to(torch::kFloat)),
               c10::ValueError);
}

TEST(CudaGrad, RopeRotate_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(23);
  const auto x = torch::randn({2, 5, 3, 6}, torch::kDouble), weights = torch::randn({2, 5, 3, 6}, torch::kDouble);
  const auto cos = torch::randn({2, 5, 6}, torch::kDouble), sin = torch::randn({2, 5, 6}, torch::kDouble);
  const auto want = gradient_of([&](const torch::Tensor& t) { return ops::rope_rotate(t, cos, sin); }, x, weights);
  const auto got = gradient_of([&](const torch::Tensor& t) { return ops::rope_rotate(t, on_gpu(cos), on_gpu(sin)); },
                               on_gpu(x), on_gpu(weights));
  ASSERT_TRUE(want.defined() && got.defined());
  EXPECT_LE(max_diff(got, want), 1e-12);
  const double err = max_gradient_error(
      [&](const std::vector<torch::Tensor>& in) { return ops::rope_rotate(in[0], on_gpu(cos), on_gpu(sin)); },
      {on_gpu(torch::randn({2, 5, 3, 6}))});
  EXPECT_LT(err, 1e-7);
}

// ---- the layer on the GPU -----------------------------------------------------------------------

TEST(CudaModule, ForwardBackwardAndCachedDecodeMatchTheCPU_CUDA) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(19);
  using mixsga::nn::MixSGAAttention;
  using mixsga::nn::MixSGAAttentionImpl;
  MixSGAAttention cpu_layer(mixsga::nn::MixSGAAttentionOptions(128, 4, 4).head_dim(64).ratios({0.3, 0.1, 0.6}));
  cpu_layer->to(torch::kDouble);
  MixSGAAttention gpu_layer(std::dynamic_pointer_cast<MixSGAAttentionImpl>(cpu_layer->clone()));
  gpu_layer->to(torch::kCUDA);

  // Training step: expert-choice routing, grouped projection, aux loss, gradients of every parameter.
  const auto x = torch::randn({2, 24, 128}, torch::kDouble);
  const auto [out_cpu, aux_cpu] = cpu_layer->forward(x);
  const auto [out_gpu, aux_gpu] = gpu_layer->forward(on_gpu(x));
  EXPECT_LE(max_diff(out_gpu, out_cpu), 1e-9);
  EXPECT_LE(max_diff(aux_gpu, aux_cpu), 1e-9);
  (out_cpu.square().mean() + aux_cpu).backward();
  (out_gpu.square().mean() + aux_gpu).backward();
  const auto cpu_params = cpu_layer->named_parameters(), gpu_params = gpu_layer->named_parameters();
  for (const auto& item : cpu_params) {
    EXPECT_LE(max_diff(gpu_params[item.key()].grad(), item.value().grad()), 1e-9) << item.key();
  }

  // Inference: prefill 12 tokens into the cache, then decode 8 one at a time, in float32 on both sides.
  cpu_layer->to(torch::kFloat);
  gpu_layer->to(torch::kFloat);
  cpu_layer->eval();
  gpu_layer->eval();
  torch::NoGradGuard no_grad;
  const auto xf = x.to(torch::kFloat);
  mixsga::HeteroKVCache cpu_cache(cpu_layer->cache_options()), gpu_cache(gpu_layer->cache_options());
  for (int64_t t = 0; t < 20; t = t == 0 ? 12 : t + 1) {
    const int64_t L = t == 0 ? 12 : 1;
    const auto step = xf.narrow(1, t, L);
    const auto a = cpu_layer->forward_with_routing(step, std::nullopt, std::nullopt, &cpu_cache, 0);
    const auto b = gpu_layer->forward_with_routing(on_gpu(step), std::nullopt, std::nullopt, &gpu_cache, 0);
    EXPECT_TRUE(torch::equal(b.expert_idx.cpu(), a.expert_idx)) << "step " << t;
    EXPECT_LE(max_diff(b.output, a.output), 1e-4) << "step " << t;
  }
  EXPECT_TRUE(torch::equal(gpu_cache.lengths(0).cpu(), cpu_cache.lengths(0)));
}
