// route_expert_choice against the slow reference: counts, exclusivity, padding, ties, NaN.
#include <gtest/gtest.h>
#include <mixsga/ops.h>
#include <torch/torch.h>

#include "reference.h"

using mixsga::testing::reference_route;

namespace {

// Counts of valid tokens per expert for one sequence.
std::vector<int64_t> counts(const torch::Tensor& idx, const torch::Tensor& valid, int64_t b, int64_t E) {
  std::vector<int64_t> c(E, 0);
  for (int64_t t = 0; t < idx.size(1); ++t)
    if (valid[b][t].item<bool>()) ++c[idx[b][t].item<int64_t>()];
  return c;
}

}  // namespace

TEST(Routing, MatchesReferenceOnRandomScoresAndMasks) {
  torch::manual_seed(0);
  const std::vector<std::vector<double>> ratio_sets = {{0.3, 0.1, 0.6}, {0.25, 0.25, 0.5}, {1, 0, 0}, {0, 0, 1},
                                                       {0.5, 0.5}, {0.1, 0.2, 0.3, 0.4}};
  for (const auto& ratios : ratio_sets) {
    const int64_t E = ratios.size();
    for (int trial = 0; trial < 5; ++trial) {
      const int64_t B = 3, L = 7 + 11 * trial;
      const auto scores = torch::rand({B, L, E});
      auto valid = torch::rand({B, L}) > 0.3;
      valid.index_put_({torch::indexing::Slice(), 0}, true);  // at least one valid token per sequence
      const auto got = mixsga::ops::route_expert_choice(scores, ratios, valid);
      EXPECT_TRUE(torch::equal(got, reference_route(scores, ratios, valid))) << "E=" << E << " L=" << L;
    }
  }
}

TEST(Routing, CountsFollowCeilCapacityAndEveryTokenHasOneExpert) {
  torch::manual_seed(1);
  const std::vector<double> ratios{0.3, 0.1, 0.6};
  for (int64_t n : {1, 2, 3, 9, 10, 11, 37, 100}) {
    const auto scores = torch::randn({1, n, 3});
    const auto idx = mixsga::ops::route_expert_choice(scores, ratios);
    ASSERT_EQ(idx.sizes(), (std::vector<int64_t>{1, n}));
    EXPECT_TRUE(((idx >= 0) & (idx < 3)).all().item<bool>());
    const auto c = counts(idx, torch::ones({1, n}, torch::kBool), 0, 3);
    // 0.3 * 10 must give 3, not 4 (float rounding), hence the tolerance in the capacity rule.
    const int64_t c0 = std::min<int64_t>(n, static_cast<int64_t>(std::ceil(0.3 * n - 1e-6)));
    const int64_t c1 = std::min<int64_t>(n - c0, static_cast<int64_t>(std::ceil(0.1 * n - 1e-6)));
    EXPECT_EQ(c[0], c0) << "n=" << n;
    EXPECT_EQ(c[1], c1) << "n=" << n;
    EXPECT_EQ(c[0] + c[1] + c[2], n);
  }
  const auto idx10 = mixsga::ops::route_expert_choice(torch::randn({1, 10, 3}), ratios);
  EXPECT_EQ(counts(idx10, torch::ones({1, 10}, torch::kBool), 0, 3), (std::vector<int64_t>{3, 1, 6}));
}

TEST(Routing, ExpertsPickTheirTopScoresExclusively) {
  // Expert 0 wants tokens 5 and 2; expert 1 also ranks token 5 first, but it is taken, so it gets 7.
  auto scores = torch::zeros({1, 10, 3});
  scores.index_put_({0, 5, 0}, 0.9);
  scores.index_put_({0, 2, 0}, 0.8);
  scores.index_put_({0, 5, 1}, 0.99);
  scores.index_put_({0, 7, 1}, 0.7);
  const auto idx = mixsga::ops::route_expert_choice(scores, {0.2, 0.1, 0.7});
  std::vector<int64_t> expected(10, 2);
  expected[5] = 0;
  expected[2] = 0;
  expected[7] = 1;
  EXPECT_TRUE(torch::equal(idx[0], torch::tensor(expected)));
}

TEST(Routing, TiesGoToTheLowerPosition) {
  const auto scores = torch::full({2, 8, 3}, 0.5);
  const auto idx = mixsga::ops::route_expert_choice(scores, {0.25, 0.25, 0.5});
  const auto expected = torch::tensor({0, 0, 1, 1, 2, 2, 2, 2});
  EXPECT_TRUE(torch::equal(idx[0], expected));
  EXPECT_TRUE(torch::equal(idx[1], expected));
}

TEST(Routing, PaddingTakesNoCapacityAndGetsTheCoarsestExpert) {
  torch::manual_seed(2);
  // Left padding of 6 on a sequence of 16: n = 10 valid tokens -> 3 / 1 / 6.
  auto valid = torch::ones({1, 16}, torch::kBool);
  valid.index_put_({0, torch::indexing::Slice(0, 6)}, false);
  auto scores = torch::rand({1, 16, 3});
  scores.index_put_({0, torch::indexing::Slice(0, 6)}, 10.0);  // padding has the best scores; must not matter
  const auto idx = mixsga::ops::route_expert_choice(scores, {0.3, 0.1, 0.6}, valid);
  EXPECT_TRUE((idx[0].narrow(0, 0, 6) == 2).all().item<bool>());
  EXPECT_EQ(counts(idx, valid, 0, 3), (std::vector<int64_t>{3, 1, 6}));
  // The valid part routes exactly as the same tokens without padding.
  const auto alone = mixsga::ops::route_expert_choice(scores.narrow(1, 6, 10), {0.3, 0.1, 0.6});
  EXPECT_TRUE(torch::equal(idx.narrow(1, 6, 10), alone));
}

TEST(Routing, EachSequenceIsRoutedOnItsOwn) {
  torch::manual_seed(3);
  const auto scores = torch::randn({4, 20, 3});
  const auto batched = mixsga::ops::route_expert_choice(scores, {0.3, 0.1, 0.6});
  for (int64_t b = 0; b < 4; ++b) {
    EXPECT_TRUE(torch::equal(batched[b], mixsga::ops::route_expert_choice(scores.narrow(0, b, 1), {0.3, 0.1, 0.6})[0]));
  }
}

TEST(Routing, NaNScoresRankLowest) {
  auto scores = torch::rand({1, 10, 3});
  scores.index_put_({0, 0, 0}, std::numeric_limits<float>::quiet_NaN());
  scores.index_put_({0, 1, 0}, std::numeric_limits<float>::infinity());
  const auto idx = mixsga::ops::route_expert_choice(scores, {0.3, 0.1, 0.6});
  EXPECT_EQ(idx[0][1].item<int64_t>(), 0);  // +inf is the best score
  EXPECT_NE(idx[0][0].item<int64_t>(), 0);  // NaN never wins
  EXPECT_TRUE(torch::equal(idx, reference_route(scores, {0.3, 0.1, 0.6}, torch::ones({1, 10}, torch::kBool))));
}

TEST(Routing, AllDtypesNonContiguousAndEmpty) {
  torch::manual_seed(4);
  const auto base = torch::rand({3, 2, 25});  // [E, B, L] to make a non-contiguous [B, L, E] view
  const auto scores = base.permute({1, 2, 0});
  ASSERT_FALSE(scores.is_contiguous());
  const auto expected = reference_route(scores, {0.3, 0.1, 0.6}, torch::ones({2, 25}, torch::kBool));
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    EXPECT_TRUE(torch::equal(mixsga::ops::route_expert_choice(scores.to(dtype), {0.3, 0.1, 0.6}), expected));
  }
  // bfloat16 rounding can create ties; compare with the reference on the rounded scores.
  const auto bf = scores.to(torch::kBFloat16);
  EXPECT_TRUE(torch::equal(mixsga::ops::route_expert_choice(bf, {0.3, 0.1, 0.6}),
                           reference_route(bf, {0.3, 0.1, 0.6}, torch::ones({2, 25}, torch::kBool))));
  // An integer 0/1 mask works like a bool one.
  auto int_mask = torch::ones({2, 25}, torch::kLong);
  int_mask.index_put_({1, torch::indexing::Slice(20, 25)}, 0);
  EXPECT_TRUE(torch::equal(mixsga::ops::route_expert_choice(scores, {0.3, 0.1, 0.6}, int_mask),
                           reference_route(scores, {0.3, 0.1, 0.6}, int_mask.ne(0))));
  EXPECT_EQ(mixsga::ops::route_expert_choice(torch::rand({0, 5, 3}), {0.3, 0.1, 0.6}).sizes(),
            (std::vector<int64_t>{0, 5}));
  EXPECT_EQ(mixsga::ops::route_expert_choice(torch::rand({2, 0, 3}), {0.3, 0.1, 0.6}).sizes(),
            (std::vector<int64_t>{2, 0}));
}

TEST(Routing, DeterministicAcrossThreadCounts) {
  torch::manual_seed(5);
  const auto scores = torch::rand({16, 64, 3});
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const auto one = mixsga::ops::route_expert_choice(scores, {0.3, 0.1, 0.6});
  at::set_num_threads(std::max(2, threads));
  const auto many = mixsga::ops::route_expert_choice(scores, {0.3, 0.1, 0.6});
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(one, many));
}
