// Bad-input catalogue: the ops (torch.ops.mixsga.* through their C++ entries) and the sizes no data can have.
// Conventions (exact exception class, message naming the argument and the value): bad_input_helpers.h.
#include "bad_input_helpers.h"

using namespace bad_input;
namespace ops = mixsga::ops;
namespace mnn = mixsga::nn;

// =============================================================================================
// ops::route_expert_choice
// =============================================================================================

// Ratios: wrong sum, negative, > 1, NaN, wrong count, empty.
TEST(BadInput, RouteExpertChoiceRejectsBadRatios) {
  const auto scores = torch::rand({2, 5, 3});
  const auto before = snapshot({scores});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {0.5, 0.25, 0.5}); },
                                {"ratios", "sum to 1", "0.5, 0.25, 0.5", "1.25"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {-0.1, 0.5, 0.6}); },
                                {"ratios", "[0, 1]", "ratios[0] = -0.1"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {1.5, -0.25, -0.25}); },
                                {"ratios", "ratios[0] = 1.5"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {0.5, kNaN, 0.5}); },
                                {"ratios", "ratios[1] = nan"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {0.5, 0.5}); },
                                {"ratios", "expected 3 ratios", "got 2", "0.5, 0.5"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {0.25, 0.25, 0.25, 0.25}); },
                                {"ratios", "expected 3 ratios", "got 4"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, std::vector<double>{}); },
                                {"ratios", "empty"});
  expect_unchanged(before, {scores});
}

// Scores: wrong rank, no expert column, integer dtype.
TEST(BadInput, RouteExpertChoiceRejectsBadScores) {
  expect_error<c10::ValueError>([] { ops::route_expert_choice(torch::rand({5, 3}), kRatios); },
                                {"scores", "[B, L, E]", "[5, 3]"});
  expect_error<c10::ValueError>([] { ops::route_expert_choice(torch::rand({1, 2, 5, 3}), kRatios); },
                                {"scores", "[1, 2, 5, 3]"});
  expect_error<c10::ValueError>([] { ops::route_expert_choice(torch::rand({2, 5, 0}), {1.0}); },
                                {"scores", "at least one expert", "[2, 5, 0]"});
  expect_error<c10::TypeError>([] { ops::route_expert_choice(torch::ones({2, 5, 3}, torch::kLong), kRatios); },
                               {"scores", "float32", "Long"});
  expect_error<c10::TypeError>([] { ops::route_expert_choice(torch::ones({2, 5, 3}, torch::kInt), kRatios); },
                               {"scores", "Int"});
  expect_error<c10::TypeError>([] { ops::route_expert_choice(torch::ones({2, 5, 3}, torch::kBool), kRatios); },
                               {"scores", "Bool"});
}

// valid_mask: wrong shape, and a sequence with no valid token.
TEST(BadInput, RouteExpertChoiceRejectsBadValidMask) {
  const auto scores = torch::rand({2, 5, 3});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, kRatios, torch::ones({2, 4})); },
                                {"valid_mask", "[2, 5]", "got [2, 4]"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, kRatios, torch::ones({5})); },
                                {"valid_mask", "got [5]"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, kRatios, torch::ones({1, 2, 5})); },
                                {"valid_mask", "got [1, 2, 5]"});

  auto mask = torch::ones({2, 5}, torch::kBool);
  mask[1].fill_(false);  // sequence 1 is all padding
  const auto before = snapshot({scores, mask});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, kRatios, mask); },
                                {"valid_mask", "sequence 1", "no valid token", "all padding"});
  expect_unchanged(before, {scores, mask});
  // A float 0/1 mask is accepted; an all-zero float row is the same error.
  expect_error<c10::ValueError>(
      [&] { ops::route_expert_choice(scores, kRatios, torch::tensor({{0.f, 0.f, 0.f, 0.f, 0.f}, {1.f, 1.f, 1.f, 1.f, 1.f}})); },
      {"valid_mask", "sequence 0"});
}

// NaN / Inf scores do not crash: NaN ranks below every number (-inf included), +inf above; ties (and
// NaN among NaN) go to the lower position; every token still gets exactly one expert and the
// per-expert counts follow the capacity rule (3, 1, 6 for ratios 0.3, 0.1, 0.6 and n = 10).
TEST(BadInput, RouteExpertChoiceToleratesNaNAndInfScores) {
  const std::vector<int64_t> want{3, 1, 6};
  for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kHalf}) {
    SCOPED_TRACE(c10::toString(dtype));
    // Expert 0's column: NaN everywhere except two numbers, so its third token is the first NaN (pos 0).
    auto s = torch::rand({1, 10, 3}, torch::kDouble);
    s.index_put_({0, torch::indexing::Slice(), 0}, kNaN);
    s.index_put_({0, 7, 0}, 0.5);
    s.index_put_({0, 8, 0}, 0.25);
    const auto scores = s.to(dtype);
    const auto idx = ops::route_expert_choice(scores, kRatios);
    ASSERT_EQ(idx.sizes(), (std::vector<int64_t>{1, 10}));
    EXPECT_EQ(idx.scalar_type(), torch::kLong);
    EXPECT_EQ(expert_counts(idx, 0, 3), want);
    EXPECT_EQ(idx[0][7].item<int64_t>(), 0);
    EXPECT_EQ(idx[0][8].item<int64_t>(), 0);
    EXPECT_EQ(idx[0][0].item<int64_t>(), 0);  // lowest-position NaN fills the last slot

    // All NaN: pure position order.
    const auto all_nan = torch::full({2, 10, 3}, kNaN, dtype);
    const auto idx_nan = ops::route_expert_choice(all_nan, kRatios);
    const auto expect_nan = torch::tensor({0, 0, 0, 1, 2, 2, 2, 2, 2, 2}, torch::kLong).expand({2, 10});
    EXPECT_TRUE(torch::equal(idx_nan, expect_nan)) << idx_nan;

    // +inf wins, -inf loses to numbers but beats NaN.
    auto t = torch::rand({1, 10, 3}, torch::kDouble);
    t.index_put_({0, 9, 0}, kInf);
    t.index_put_({0, torch::indexing::Slice(0, 8), 0}, -kInf);
    t.index_put_({0, 8, 0}, kNaN);
    // expert 0 takes: 9 (+inf), then the -inf ones at positions 0 and 1 (ties -> lower position); 8 (NaN) never.
    const auto idx_inf = ops::route_expert_choice(t.to(dtype), kRatios);
    EXPECT_EQ(expert_counts(idx_inf, 0, 3), want);
    EXPECT_EQ(idx_inf[0][9].item<int64_t>(), 0);
    EXPECT_EQ(idx_inf[0][0].item<int64_t>(), 0);
    EXPECT_EQ(idx_inf[0][1].item<int64_t>(), 0);
    EXPECT_NE(idx_inf[0][8].item<int64_t>(), 0);
  }
  // NaN scores of padding tokens are ignored; valid tokens still get the capacity counts.
  auto s = torch::rand({1, 12, 3});
  s.index_put_({0, torch::indexing::Slice(10, 12)}, kNaN);
  auto mask = torch::ones({1, 12}, torch::kBool);
  mask.index_put_({0, torch::indexing::Slice(10, 12)}, false);
  const auto idx = ops::route_expert_choice(s, kRatios, mask);
  EXPECT_EQ(idx[0][10].item<int64_t>(), 2);
  EXPECT_EQ(idx[0][11].item<int64_t>(), 2);
  EXPECT_EQ(expert_counts(idx.narrow(1, 0, 10), 0, 3), want);
}

// =============================================================================================
// ops::grouped_kv_pool
// =============================================================================================

// kv: wrong rank, integer dtype.
TEST(BadInput, GroupedKVPoolRejectsBadKV) {
  const auto idx = long_full({2, 5}, 0);
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(torch::rand({8}), torch::scalar_tensor(0, torch::kLong), kGroups); },
                                {"kv", "[*, Hkv, d]", "got [8]"});
  expect_error<c10::TypeError>([&] { ops::grouped_kv_pool(torch::ones({2, 5, 4, 2}, torch::kInt), idx, kGroups); },
                               {"kv", "float32", "Int"});
}

// expert_idx: float / bool dtype, shape mismatch, values out of range (both ends).
TEST(BadInput, GroupedKVPoolRejectsBadExpertIdx) {
  const auto kv = torch::rand({2, 5, 4, 2});
  expect_error<c10::TypeError>([&] { ops::grouped_kv_pool(kv, torch::zeros({2, 5}), kGroups); },
                               {"expert_idx", "integer dtype", "Float"});
  expect_error<c10::TypeError>([&] { ops::grouped_kv_pool(kv, torch::zeros({2, 5}, torch::kBool), kGroups); },
                               {"expert_idx", "integer dtype", "Bool"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, long_full({2, 4}, 0), kGroups); },
                                {"expert_idx", "expected shape [2, 5]", "got [2, 4]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, long_full({10}, 0), kGroups); },
                                {"expert_idx", "[2, 5]", "got [10]"});
  auto too_big = long_full({2, 5}, 1);
  too_big[1][3] = 3;
  const auto before = snapshot({kv, too_big});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, too_big, kGroups); },
                                {"expert_idx", "[0, 3)", "got values in [1, 3]"});
  expect_unchanged(before, {kv, too_big});
  auto negative = torch::zeros({2, 5}, torch::kInt);
  negative[0][0] = -2;
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, negative, kGroups); },
                                {"expert_idx", "[0, 3)", "got values in [-2, 0]"});
}

// group_sizes: not increasing, zero, not dividing Hkv, empty.
TEST(BadInput, GroupedKVPoolRejectsBadGroupSizes) {
  const auto kv = torch::rand({2, 5, 4, 2});
  const auto idx = long_full({2, 5}, 0);
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, {1, 4, 2}); },
                                {"group_sizes", "strictly increasing", "[1, 4, 2]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, {2, 2}); },
                                {"group_sizes", "strictly increasing", "[2, 2]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, {0, 1, 2}); },
                                {"group_sizes", ">= 1", "group_sizes[0] = 0"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, {1, 3}); },
                                {"group_sizes", "divide", "(4)", "group_sizes[1] = 3"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, {1, 2, 8}); },
                                {"group_sizes", "group_sizes[2] = 8"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, std::vector<int64_t>{}); },
                                {"group_sizes", "empty"});
}

// The autograd path validates too, and a failed call records no graph and no gradient.
TEST(BadInput, GroupedKVPoolAutogradPathValidatesAndLeavesInputsAlone) {
  const auto kv = torch::rand({2, 5, 4, 2}).requires_grad_();
  const auto idx = long_full({2, 5}, 7);
  const auto before = snapshot({kv, idx});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, kGroups); }, {"expert_idx", "[7, 7]"});
  expect_unchanged(before, {kv, idx});
  EXPECT_FALSE(kv.grad().defined());
}

// =============================================================================================
// ops::grouped_kv_proj
// =============================================================================================

// x and weight: dtypes, ranks and shapes.
TEST(BadInput, GroupedKVProjRejectsBadXAndWeight) {
  const auto x = torch::rand({2, 5, 8});
  const auto w = torch::rand({8, 8});  // Hkv = 4, d = 2
  const auto idx = long_full({2, 5}, 0);
  expect_error<c10::TypeError>(
      [&] { ops::grouped_kv_proj(torch::ones({2, 5, 8}, torch::kLong), w, std::nullopt, idx, kGroups, 2); },
      {"x", "float32", "Long"});
  expect_error<c10::TypeError>(
      [&] { ops::grouped_kv_proj(x, torch::ones({8, 8}, torch::kInt), std::nullopt, idx, kGroups, 2); },
      {"weight", "float32", "Int"});
  expect_error<c10::TypeError>(
      [&] { ops::grouped_kv_proj(x, w.to(torch::kDouble), std::nullopt, idx, kGroups, 2); },
      {"weight", "dtype of x (Float)", "got Double"});
  expect_error<c10::ValueError>(
      [&] { ops::grouped_kv_proj(torch::tensor(1.f), w, std::nullopt, torch::scalar_tensor(0, torch::kLong), kGroups, 2); },
      {"x", "[*, D]", "got []"});
  // x's last dim does not match weight.size(1) (the message shows both).
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(torch::rand({2, 5, 7}), w, std::nullopt, idx, kGroups, 2); },
                                {"weight", "[Hkv * head_dim, 7]", "got [8, 8]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, torch::rand({64}), std::nullopt, idx, kGroups, 2); },
                                {"weight", "got [64]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, torch::rand({8, 8, 1}), std::nullopt, idx, kGroups, 2); },
                                {"weight", "got [8, 8, 1]"});
}

// head_dim and group_sizes against weight.size(0).
TEST(BadInput, GroupedKVProjRejectsBadHeadDimAndGroupSizes) {
  const auto x = torch::rand({2, 5, 8});
  const auto w = torch::rand({8, 8});
  const auto idx = long_full({2, 5}, 0);
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, 0); },
                                {"head_dim", "weight.size(0) (8)", "got 0"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, 3); },
                                {"head_dim", "got 3"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, -2); },
                                {"head_dim", "got -2"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, torch::rand({0, 8}), std::nullopt, idx, {1}, 2); },
                                {"head_dim", "weight.size(0) (0)"});
  // head_dim 4 -> Hkv 2, so group size 4 does not divide.
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, 4); },
                                {"group_sizes", "(2)", "group_sizes[2] = 4"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, {2, 1}, 2); },
                                {"group_sizes", "strictly increasing", "[2, 1]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, {0, 1}, 2); },
                                {"group_sizes", "group_sizes[0] = 0"});
}

// bias: shape and dtype.
TEST(BadInput, GroupedKVProjRejectsBadBias) {
  const auto x = torch::rand({2, 5, 8});
  const auto w = torch::rand({8, 8});
  const auto idx = long_full({2, 5}, 1);
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, torch::rand({7}), idx, kGroups, 2); },
                                {"bias", "expected shape [8]", "got [7]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, torch::rand({1, 8}), idx, kGroups, 2); },
                                {"bias", "got [1, 8]"});
  expect_error<c10::TypeError>([&] { ops::grouped_kv_proj(x, w, torch::rand({8}, torch::kDouble), idx, kGroups, 2); },
                               {"bias", "dtype of x (Float)", "got Double"});
  expect_error<c10::TypeError>([&] { ops::grouped_kv_proj(x, w, torch::ones({8}, torch::kLong), idx, kGroups, 2); },
                               {"bias", "got Long"});
}

// expert_idx: dtype, shape, range; inputs (with requires_grad) are left alone.
TEST(BadInput, GroupedKVProjRejectsBadExpertIdx) {
  const auto x = torch::rand({2, 5, 8}).requires_grad_();
  const auto w = torch::rand({8, 8}).requires_grad_();
  const auto b = torch::rand({8}).requires_grad_();
  expect_error<c10::TypeError>([&] { ops::grouped_kv_proj(x, w, b, torch::zeros({2, 5}, torch::kDouble), kGroups, 2); },
                               {"expert_idx", "integer dtype", "Double"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, b, long_full({5, 2}, 0), kGroups, 2); },
                                {"expert_idx", "[2, 5]", "got [5, 2]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, b, long_full({2, 5, 1}, 0), kGroups, 2); },
                                {"expert_idx", "got [2, 5, 1]"});
  auto idx = long_full({2, 5}, 2);
  idx[0][1] = 5;
  const auto before = snapshot({x, w, b, idx});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, b, idx, kGroups, 2); },
                                {"expert_idx", "[0, 3)", "[2, 5]"});
  expect_unchanged(before, {x, w, b, idx});
  EXPECT_FALSE(x.grad().defined());
  EXPECT_FALSE(w.grad().defined());
  EXPECT_FALSE(b.grad().defined());
}

// =============================================================================================
// ops::expert_permutation, ops::expert_scatter, ops::expert_gather
// =============================================================================================

TEST(BadInput, ExpertPermutationRejectsBadInput) {
  expect_error<c10::ValueError>([] { ops::expert_permutation(long_full({4}, 0), 0); },
                                {"num_experts", "[1, 1048576]", "got 0"});
  expect_error<c10::ValueError>([] { ops::expert_permutation(long_full({4}, 0), -3); }, {"num_experts", "got -3"});
  expect_error<c10::TypeError>([] { ops::expert_permutation(torch::zeros({4}), 3); },
                               {"expert_idx", "integer dtype", "Float"});
  const auto idx = torch::tensor({0, 2, 3, 1}, torch::kLong);
  const auto before = snapshot({idx});
  expect_error<c10::ValueError>([&] { ops::expert_permutation(idx, 3); },
                                {"expert_idx", "[0, 3)", "got values in [0, 3]"});
  expect_unchanged(before, {idx});
  expect_error<c10::ValueError>([] { ops::expert_permutation(torch::tensor({-1, 0}, torch::kInt), 2); },
                                {"expert_idx", "[-1, 0]"});
}

// Permutation: wrong dtype, repeated values, out of range, wrong length / rank; x without a row dim.
TEST(BadInput, ExpertScatterAndGatherRejectBadPermutation) {
  const auto x = torch::rand({4, 3});
  using Fn = torch::Tensor (*)(const torch::Tensor&, const torch::Tensor&);
  for (Fn fn : {static_cast<Fn>(&ops::expert_scatter), static_cast<Fn>(&ops::expert_gather)}) {
    SCOPED_TRACE(fn == static_cast<Fn>(&ops::expert_scatter) ? "expert_scatter" : "expert_gather");
    expect_error<c10::TypeError>([&] { fn(x, torch::arange(4, torch::kInt)); }, {"permutation", "int64", "Int"});
    expect_error<c10::TypeError>([&] { fn(x, torch::arange(4, torch::kFloat)); }, {"permutation", "int64", "Float"});
    const auto repeated = torch::tensor({0, 1, 1, 3}, torch::kLong);
    const auto before = snapshot({x, repeated});
    expect_error<c10::ValueError>([&] { fn(x, repeated); }, {"permutation", "0..3", "1 appears twice"});
    expect_unchanged(before, {x, repeated});
    expect_error<c10::ValueError>([&] { fn(x, torch::tensor({0, 1, 4, 2}, torch::kLong)); },
                                  {"permutation", "[0, 4)", "permutation[2] = 4"});
    expect_error<c10::ValueError>([&] { fn(x, torch::tensor({0, -1, 2, 3}, torch::kLong)); },
                                  {"permutation", "permutation[1] = -1"});
    expect_error<c10::ValueError>([&] { fn(x, torch::arange(3, torch::kLong)); },
                                  {"permutation", "expected shape [4]", "got [3]"});
    expect_error<c10::ValueError>([&] { fn(x, torch::arange(4, torch::kLong).view({2, 2})); },
                                  {"permutation", "got [2, 2]"});
    expect_error<c10::ValueError>([&] { fn(torch::tensor(1.f), torch::arange(1, torch::kLong)); },
                                  {"x", "[N, *]", "got []"});
    // With requires_grad the autograd path validates the same way.
    const auto xg = torch::rand({4, 3}).requires_grad_();
    expect_error<c10::ValueError>([&] { fn(xg, repeated); }, {"permutation", "appears twice"});
    EXPECT_FALSE(xg.grad().defined());
  }
}

// =============================================================================================
// ops::pool_kv_weight, mixsga::kv_fraction (and its deprecated spelling ops::kv_fraction)
// =============================================================================================

TEST(BadInput, PoolKVWeightRejectsBadInput) {
  const auto w = torch::rand({8, 8});  // 4 heads of 2
  const auto before = snapshot({w});
  expect_error<c10::ValueError>([] { ops::pool_kv_weight(torch::tensor(1.f), 1, 1); }, {"weight", "got shape []"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 1, 0); }, {"head_dim (0)", "weight.size(0) (8)"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 1, 3); }, {"head_dim (3)", "weight.size(0) (8)"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 1, -2); }, {"head_dim (-2)"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 0, 2); }, {"group_size (0)", "KV heads (4)"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 3, 2); }, {"group_size (3)", "KV heads (4)"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 8, 2); }, {"group_size (8)"});
  expect_unchanged(before, {w});
}

TEST(BadInput, KVFractionRejectsBadConfiguration) {
  expect_error<c10::ValueError>([] { mixsga::kv_fraction({1, 2, 4}, {0.5, 0.25, 0.5}); }, {"ratios", "sums to 1.25"});
  expect_error<c10::ValueError>([] { mixsga::kv_fraction({1, 2, 4}, {0.5, 0.5}); },
                                {"ratios", "expected 3 ratios", "got 2"});
  expect_error<c10::ValueError>([] { mixsga::kv_fraction({1, 2}, {1.2, -0.2}); }, {"ratios", "ratios[0] = 1.2"});
  expect_error<c10::ValueError>([] { mixsga::kv_fraction({2, 1}, {0.5, 0.5}); },
                                {"group_sizes", "strictly increasing", "[2, 1]"});
  expect_error<c10::ValueError>([] { mixsga::kv_fraction({0, 1}, {0.5, 0.5}); }, {"group_sizes", "group_sizes[0] = 0"});
  expect_error<c10::ValueError>([] { mixsga::kv_fraction({}, {}); }, {"group_sizes", "empty"});
  // The deprecated spelling validates the same way.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  expect_error<c10::ValueError>([] { ops::kv_fraction({1, 2, 4}, {0.5, 0.25, 0.5}); }, {"ratios", "sums to 1.25"});
  EXPECT_DOUBLE_EQ(ops::kv_fraction({1, 2, 4}, {0.3, 0.1, 0.6}), mixsga::kv_fraction({1, 2, 4}, {0.3, 0.1, 0.6}));
#pragma GCC diagnostic pop
}

// =============================================================================================
// nn::apply_rope
// =============================================================================================

TEST(BadInput, ApplyRopeRejectsBadInput) {
  const auto x = torch::rand({2, 5, 4, 8});
  const auto pos = torch::arange(5);
  const auto before = snapshot({x, pos});
  expect_error<c10::TypeError>([&] { mnn::apply_rope(torch::ones({2, 5, 4, 8}, torch::kInt), pos); },
                               {"x", "float32", "Int"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(torch::rand({5, 4, 8}), pos); },
                                {"x", "[B, L, H, d]", "got [5, 4, 8]"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(torch::rand({2, 5, 4, 7}), pos); },
                                {"x", "even d", "got [2, 5, 4, 7]"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, torch::arange(4)); },
                                {"positions", "[2, 5] or [5]", "got [4]"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, torch::zeros({3, 5}, torch::kLong)); },
                                {"positions", "got [3, 5]"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, torch::zeros({2, 5, 1}, torch::kLong)); },
                                {"positions", "got [2, 5, 1]"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, pos, 0.0); }, {"theta", "> 0", "got 0"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, pos, -10.0); }, {"theta", "got -10"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, pos, kNaN); }, {"theta", "got nan"});
  expect_unchanged(before, {x, pos});
}

TEST(BadInput, RopeRotateRejectsBadInput) {
  const auto x = torch::rand({2, 5, 4, 8});
  const auto c = torch::rand({1, 5, 8}), s = torch::rand({1, 5, 8});
  const auto before = snapshot({x, c, s});
  expect_error<c10::ValueError>([&] { ops::rope_rotate(torch::rand({5, 4, 8}), c, s); }, {"x", "[B, L, H, d]", "got [5, 4, 8]"});
  expect_error<c10::ValueError>([&] { ops::rope_rotate(x, torch::rand({1, 4, 8}), s); }, {"cos", "[1, 5, 8]", "got [1, 4, 8]"});
  expect_error<c10::TypeError>([&] { ops::rope_rotate(x, c, s.to(torch::kDouble)); }, {"sin", "dtype of x", "Double"});
  expect_error<c10::ValueError>([&] { ops::rope_rotate(x, c, torch::Tensor()); }, {"sin", "undefined"});
  expect_error<c10::ValueError>([&] { ops::rope_rotate(x, c.requires_grad_(true), s); }, {"cos", "must not require grad"});
  expect_unchanged(before, {x, c.detach(), s});
}

// =============================================================================================
// ops::hetero_decode_attention
// =============================================================================================

TEST(BadInput, HeteroDecodeAttentionRejectsBadInput) {
  const auto q = torch::randn({2, 4, 8});
  const std::vector<torch::Tensor> k{torch::randn({2, 2, 3, 8}), torch::randn({2, 1, 3, 8})};
  const auto lengths = torch::ones({2, 2}, torch::kLong);
  expect_error<c10::TypeError>([&] { ops::hetero_decode_attention(q.to(torch::kLong), k, k, lengths, 2); },
                               {"q", "Long"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q[0], k, k, lengths, 2); },
                                {"q", "[B, Hq, d]", "got [4, 8]"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, k, lengths, 3); }, {"num_kv_heads", "got 3"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, k, lengths, 0); }, {"num_kv_heads", "got 0"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, {k[0]}, lengths, 2); },
                                {"k_pools / v_pools", "got 2 and 1"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, {}, {}, torch::ones({2, 0}, torch::kLong), 2); },
                                {"k_pools / v_pools", "got 0 and 0"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, k, torch::ones({2, 3}, torch::kLong), 2); },
                                {"lengths", "[2, 2]", "got [2, 3]"});
  expect_error<c10::TypeError>([&] { ops::hetero_decode_attention(q, k, k, lengths.to(torch::kFloat), 2); },
                               {"lengths", "integer", "Float"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, k, lengths * 4, 2); },
                                {"lengths", "[0, 3]", "[4, 4]"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, {k[0], torch::randn({2, 3, 3, 8})}, {k[0], torch::randn({2, 3, 3, 8})}, lengths, 2); },
                                {"k_pools[1]", "got [2, 3, 3, 8]"});
  expect_error<c10::TypeError>([&] { ops::hetero_decode_attention(q, {k[0], k[1].to(torch::kDouble)}, {k[0], k[1]}, lengths, 2); },
                               {"k_pools[1]", "Double"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, {k[0], torch::randn({2, 1, 2, 8})}, lengths, 2); },
                                {"v_pools[1]", "[2, 1, 3, 8]", "got [2, 1, 2, 8]"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, {k[0], torch::randn({2, 1, 8, 3}).transpose(2, 3)}, {k[0], k[1]}, lengths, 2); },
                                {"k_pools[1]", "contiguous", "stride 3"});
}

// =============================================================================================
// _grouped_kv_proj_backward (reachable from C++ through the dispatcher)
// =============================================================================================

TEST(BadInput, GroupedKVProjBackwardRejectsBadGradOut) {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("mixsga::_grouped_kv_proj_backward", "")
                      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                            const at::Tensor&, const at::Tensor&,
                                                                            c10::IntArrayRef, int64_t)>();
  const auto x = torch::randn({2, 5, 8}), w = torch::randn({8, 8}), idx = long_full({2, 5}, 1);
  const auto grad = torch::randn({2, 5, 4, 2});
  expect_error<c10::TypeError>([&] { op.call(grad.to(torch::kHalf), x, w, idx, kGroups, 2); },
                               {"grad_out", "dtype of x", "Float", "Half"});
  expect_error<c10::ValueError>([&] { op.call(grad.narrow(1, 0, 4), x, w, idx, kGroups, 2); },
                                {"grad_out", "[2, 5, 4, 2]", "got [2, 4, 4, 2]"});
}

// =============================================================================================
// Sizes no data can have (found by tests/fuzz): clear errors, not overflow or torch internals
// =============================================================================================

TEST(BadInput, OverflowingSizesAreRejected) {
  constexpr int64_t kHuge = int64_t{1} << 62;
  expect_error<c10::ValueError>([&] { ops::expert_permutation(long_full({3}, 0), kHuge); },
                                {"num_experts", "[1, 1048576]", std::to_string(kHuge)});
  const auto empty_kv = torch::empty({kHuge, 2, 0, 4, 2});  // a valid empty tensor; its sizes' product overflows
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(empty_kv, torch::empty({kHuge, 2, 0}, torch::kLong), {1, 2}); },
                                {"kv", "too large", "overflows int64"});
  const auto x = torch::empty({0, kHuge, 1});
  expect_error<c10::ValueError>(
      [&] { ops::grouped_kv_proj(x, torch::randn({8, 1}), std::nullopt, torch::empty({0, kHuge}, torch::kLong), {1, 2}, 2); },
      {"x", "too large"});
  expect_error<c10::TypeError>([&] { ops::pool_kv_weight(torch::ones({8, 4}, torch::kLong), 2, 2); }, {"weight", "Long"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(torch::empty({0, kHuge}), 2, 4); }, {"weight", "too large"});
}
