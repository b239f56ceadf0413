// grouped_kv_pool, grouped_kv_proj, expert_permutation / scatter / gather: references, identities,
// gradients (finite differences, float64), dtypes, non-contiguous and empty inputs.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include "reference.h"

namespace ops = mixsga::ops;
using namespace mixsga::testing;

namespace {
const std::vector<int64_t> kGroups{1, 2, 4};

torch::Tensor random_experts(std::vector<int64_t> shape, int64_t E) { return torch::randint(0, E, shape, torch::kLong); }
}  // namespace

TEST(GroupedKVPool, MatchesReference) {
  torch::manual_seed(0);
  const auto kv = torch::randn({2, 9, 8, 5}, torch::kDouble);
  const auto idx = random_experts({2, 9}, 3);
  const auto got = ops::grouped_kv_pool(kv, idx, {1, 2, 4});
  const auto want = reference_pool(kv.view({18, 8, 5}), idx.view({18}), {1, 2, 4}).view({2, 9, 8, 5});
  EXPECT_TRUE(torch::allclose(got, want, 1e-12, 1e-12));
  // Expert 0 (group 1) is the identity; a projection is idempotent.
  const auto zeros = torch::zeros({2, 9}, torch::kLong);
  EXPECT_TRUE(torch::equal(ops::grouped_kv_pool(kv, zeros, {1, 2, 4}), kv));
  EXPECT_TRUE(torch::allclose(ops::grouped_kv_pool(got, idx, {1, 2, 4}), got, 1e-12, 1e-12));
}

TEST(GroupedKVPool, GradientIsTheSameOpAndMatchesFiniteDifferences) {
  torch::manual_seed(1);
  const auto idx = random_experts({3, 4}, 3);
  const double err = max_gradient_error(
      [&](const std::vector<torch::Tensor>& in) { return ops::grouped_kv_pool(in[0], idx, {1, 2, 4}); },
      {torch::randn({3, 4, 4, 3})});
  EXPECT_LT(err, 1e-7);
}

TEST(GroupedKVProj, EqualsProjectThenPoolWithBias) {
  // Identity: pooling the weights then projecting == projecting then pooling (biases included).
  // 3 x 7 tokens put a handful per expert (the CPU kernel's few-token path, which projects first);
  // 4 x 60 put ~80 per expert (the path that pools the weight first).
  torch::manual_seed(2);
  const int64_t Hkv = 4, d = 6, D = 10;
  for (const auto [B, L] : {std::pair<int64_t, int64_t>{3, 7}, {4, 60}}) {
    SCOPED_TRACE(fmt::format("B={} L={}", B, L));
    const int64_t n = B * L;
    const auto x = torch::randn({B, L, D}, torch::kDouble);
    const auto w = torch::randn({Hkv * d, D}, torch::kDouble);
    const auto b = torch::randn({Hkv * d}, torch::kDouble);
    const auto idx = random_experts({B, L}, 3);
    const auto fused = ops::grouped_kv_proj(x, w, b, idx, kGroups, d);
    const auto pooled_after =
        ops::grouped_kv_pool(torch::nn::functional::linear(x, w, b).view({B, L, Hkv, d}), idx, kGroups);
    const auto reference =
        reference_pool(torch::nn::functional::linear(x, w, b).view({n, Hkv, d}), idx.view({n}), kGroups);
    EXPECT_TRUE(torch::allclose(fused, pooled_after, 1e-10, 1e-12));
    EXPECT_TRUE(torch::allclose(fused.view({n, Hkv, d}), reference, 1e-10, 1e-12));
    // Without bias too.
    EXPECT_TRUE(torch::allclose(ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, d),
                                ops::grouped_kv_pool(torch::matmul(x, w.t()).view({B, L, Hkv, d}), idx, kGroups),
                                1e-10, 1e-12));
    // The pooled weight of an expert is the group mean of the weight rows.
    for (int64_t e = 0; e < 3; ++e) {
      EXPECT_TRUE(torch::allclose(ops::pool_kv_weight(w, kGroups[e], d), reference_pool_weight(w, kGroups[e], d)));
    }
  }
}

TEST(GroupedKVProj, GradientsMatchFiniteDifferences) {
  torch::manual_seed(3);
  const int64_t Hkv = 4, d = 2, D = 3;
  const auto idx = random_experts({2, 5}, 3);
  for (bool with_bias : {true, false}) {
    std::vector<torch::Tensor> inputs{torch::randn({2, 5, D}), torch::randn({Hkv * d, D})};
    if (with_bias) inputs.push_back(torch::randn({Hkv * d}));
    const double err = max_gradient_error(
        [&](const std::vector<torch::Tensor>& in) {
          return ops::grouped_kv_proj(in[0], in[1], with_bias ? std::optional(in[2]) : std::nullopt, idx, kGroups, d);
        },
        inputs);
    EXPECT_LT(err, 1e-7) << "bias=" << with_bias;
  }
}

TEST(GroupedKVProj, OneExpertOwningAllTokensAndUnusedExperts) {
  torch::manual_seed(4);
  const auto x = torch::randn({2, 6, 8}, torch::kDouble);
  const auto w = torch::randn({16, 8}, torch::kDouble);
  for (int64_t e = 0; e < 3; ++e) {
    const auto idx = torch::full({2, 6}, e, torch::kLong);
    const auto expected = torch::matmul(x, reference_pool_weight(w, kGroups[e], 4).t())
                              .view({2, 6, 4 / kGroups[e], 1, 4})
                              .expand({2, 6, 4 / kGroups[e], kGroups[e], 4})
                              .reshape({2, 6, 4, 4});
    EXPECT_TRUE(torch::allclose(ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, 4), expected, 1e-10, 1e-12));
  }
}

TEST(GroupedKVProj, NonContiguousEmptyAndDtypes) {
  torch::manual_seed(5);
  const int64_t d = 4, D = 8;
  const auto x = torch::randn({D, 3, 5}).permute({1, 2, 0});  // [3, 5, D], non-contiguous
  const auto w = torch::randn({D, 4 * d}).t();                 // non-contiguous weight
  const auto idx = random_experts({5, 3}, 3).t();              // non-contiguous idx
  ASSERT_FALSE(x.is_contiguous());
  const auto expected = ops::grouped_kv_proj(x.contiguous(), w.contiguous(), std::nullopt, idx.contiguous(), kGroups, d);
  EXPECT_TRUE(torch::allclose(ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, d), expected));
  EXPECT_TRUE(torch::allclose(ops::grouped_kv_pool(expected.transpose(0, 1), idx.t(), kGroups),
                              ops::grouped_kv_pool(expected.transpose(0, 1).contiguous(), idx.t().contiguous(), kGroups)));
  // int32 expert indices work like int64.
  EXPECT_TRUE(torch::equal(ops::grouped_kv_proj(x, w, std::nullopt, idx.to(torch::kInt), kGroups, d),
                           ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, d)));
  // Empty token dims.
  const auto empty = ops::grouped_kv_proj(torch::randn({0, 5, D}), w, std::nullopt, torch::zeros({0, 5}, torch::kLong), kGroups, d);
  EXPECT_EQ(empty.sizes(), (std::vector<int64_t>{0, 5, 4, d}));
  EXPECT_EQ(ops::grouped_kv_pool(torch::randn({2, 0, 4, d}), torch::zeros({2, 0}, torch::kLong), kGroups).sizes(),
            (std::vector<int64_t>{2, 0, 4, d}));
  // Backward through empty inputs gives empty / zero gradients.
  auto xe = torch::randn({0, 5, D}, torch::requires_grad());
  auto we = w.detach().clone().requires_grad_(true);
  ops::grouped_kv_proj(xe, we, std::nullopt, torch::zeros({0, 5}, torch::kLong), kGroups, d).sum().backward();
  EXPECT_EQ(xe.grad().sizes(), xe.sizes());
  EXPECT_EQ(we.grad().abs().sum().item<double>(), 0.0);
}

TEST(GroupedKVProj, LowPrecisionErrorWithinTwiceTheTorchReference) {
  // flash-attention's rule: our bf16/fp16 error vs float64 is within 2x of a plain PyTorch
  // low-precision implementation's error vs float64.
  torch::manual_seed(6);
  const int64_t d = 16, D = 64;
  const auto x = torch::randn({4, 33, D}, torch::kDouble);
  const auto w = torch::randn({4 * d, D}, torch::kDouble) / 8;
  const auto b = torch::randn({4 * d}, torch::kDouble);
  const auto idx = random_experts({4, 33}, 3);
  const auto exact = ops::grouped_kv_proj(x, w, b, idx, kGroups, d);
  for (auto dtype : {torch::kBFloat16, torch::kHalf}) {
    const auto ours = ops::grouped_kv_proj(x.to(dtype), w.to(dtype), b.to(dtype), idx, kGroups, d);
    ASSERT_EQ(ours.scalar_type(), dtype);
    const auto torch_ref = reference_pool(
        torch::nn::functional::linear(x.to(dtype), w.to(dtype), b.to(dtype)).view({132, 4, d}), idx.view({132}), kGroups);
    const double err_ours = (ours.to(torch::kDouble) - exact).abs().max().item<double>();
    const double err_torch = (torch_ref.to(torch::kDouble).view({4, 33, 4, d}) - exact).abs().max().item<double>();
    EXPECT_LE(err_ours, 2 * err_torch + 1e-6) << "dtype " << dtype;
    const auto pool_ours = ops::grouped_kv_pool(exact.to(dtype), idx, kGroups).to(torch::kDouble);
    const auto pool_torch = reference_pool(exact.to(dtype).view({132, 4, d}), idx.view({132}), kGroups).to(torch::kDouble);
    const auto pool_exact = ops::grouped_kv_pool(exact, idx, kGroups);
    EXPECT_LE((pool_ours - pool_exact).abs().max().item<double>(),
              2 * (pool_torch.view({4, 33, 4, d}) - pool_exact).abs().max().item<double>() + 1e-6);
  }
}

TEST(GroupedKV, PoolingCommutesWithRoPE) {
  // Identity: pooling before RoPE == pooling after RoPE (every head of a position rotates the same way).
  torch::manual_seed(7);
  const auto k = torch::randn({2, 11, 4, 8}, torch::kDouble);
  const auto idx = random_experts({2, 11}, 3);
  const auto pos = torch::arange(11, torch::kLong) * 3 + 5;
  const auto before = mixsga::nn::apply_rope(ops::grouped_kv_pool(k, idx, kGroups), pos);
  const auto after = ops::grouped_kv_pool(mixsga::nn::apply_rope(k, pos), idx, kGroups);
  EXPECT_TRUE(torch::allclose(before, after, 1e-12, 1e-12));
}

TEST(RoPE, MatchesTheLlamaConventionWrittenOut) {
  torch::manual_seed(8);
  const auto x = torch::randn({2, 6, 3, 8}, torch::kDouble);
  const std::vector<int64_t> pos{0, 1, 2, 7, 100, 4095};
  for (double theta : {10000.0, 500000.0}) {
    const auto got = mixsga::nn::apply_rope(x, torch::tensor(pos), theta);
    EXPECT_TRUE(torch::allclose(got, reference_rope(x, pos, theta), 1e-10, 1e-12)) << "theta " << theta;
  }
  // Per-sequence [B, L] positions equal the per-sequence application.
  const auto pos2 = torch::stack({torch::tensor(pos), torch::tensor(pos) + 3});
  const auto got2 = mixsga::nn::apply_rope(x, pos2);
  EXPECT_TRUE(torch::allclose(got2[1], mixsga::nn::apply_rope(x.narrow(0, 1, 1), torch::tensor(pos) + 3)[0]));
}

TEST(ExpertPermutation, StableGroupingAndScatterGatherRoundTrip) {
  torch::manual_seed(9);
  const auto idx = random_experts({4, 13}, 3);
  const auto [perm, offsets] = ops::expert_permutation(idx, 3);
  const auto flat = idx.view({-1});
  ASSERT_EQ(offsets.size(0), 4);
  EXPECT_EQ(offsets[0].item<int64_t>(), 0);
  EXPECT_EQ(offsets[3].item<int64_t>(), 52);
  for (int64_t e = 0; e < 3; ++e) {
    const auto block = perm.narrow(0, offsets[e].item<int64_t>(), (offsets[e + 1] - offsets[e]).item<int64_t>());
    EXPECT_TRUE((flat.index_select(0, block) == e).all().item<bool>());
    EXPECT_TRUE(torch::equal(block, std::get<0>(torch::sort(block))));  // stable: ascending token order
    EXPECT_EQ(block.numel(), (flat == e).sum().item<int64_t>());
  }
  const auto x = torch::randn({52, 3, 2});
  const auto scattered = ops::expert_scatter(x, perm);
  EXPECT_TRUE(torch::equal(scattered, x.index_select(0, perm)));
  EXPECT_TRUE(torch::equal(ops::expert_gather(scattered, perm), x));
  // Gradients: scatter and gather are each other's adjoint.
  const double err = max_gradient_error(
      [&](const std::vector<torch::Tensor>& in) { return ops::expert_gather(ops::expert_scatter(in[0], perm) * in[0], perm); },
      {torch::randn({52, 2})});
  EXPECT_LT(err, 1e-7);
  // Empty.
  const auto [p0, o0] = ops::expert_permutation(torch::zeros({0}, torch::kLong), 3);
  EXPECT_EQ(p0.numel(), 0);
  EXPECT_TRUE(torch::equal(o0, torch::zeros({4}, torch::kLong)));
  EXPECT_EQ(ops::expert_scatter(torch::randn({0, 4}), p0).sizes(), (std::vector<int64_t>{0, 4}));
}

TEST(KVFraction, PaperConfigurations) {
  EXPECT_DOUBLE_EQ(mixsga::kv_fraction({1, 2, 4}, {0.3, 0.1, 0.6}), 0.5);
  EXPECT_DOUBLE_EQ(mixsga::kv_fraction({1, 2, 4}, {0.25, 0.25, 0.5}), 0.5);
  EXPECT_DOUBLE_EQ(mixsga::kv_fraction({1, 2, 4}, {0, 1, 0}), 0.5);
  EXPECT_DOUBLE_EQ(mixsga::kv_fraction({1, 2, 4}, {0, 0, 1}), 0.25);
  EXPECT_DOUBLE_EQ(mixsga::kv_fraction({1, 2, 4}, {1, 0, 0}), 1.0);
  EXPECT_NEAR(mixsga::kv_fraction({1, 2, 4}, {0.1, 0.1, 0.8}), 0.35, 1e-12);
}
