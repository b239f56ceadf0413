// KV budgets set at inference: decode offsets (zero offsets are bitwise the plain argmax; fitted ones realise
// the target shares), ratios_for_budget (exact budget, the reachable range, clear errors), set_routing, and
// checkpoints that keep the offsets (and still load checkpoints written before they existed).
#include <gtest/gtest.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include "bad_input_helpers.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

namespace {

namespace mnn = mixsga::nn;
using bad_input::expect_error;

std::vector<double> shares(const torch::Tensor& idx, int64_t E) {
  const auto counts = torch::bincount(idx.reshape({-1}), {}, E).to(torch::kDouble) / static_cast<double>(idx.numel());
  return std::vector<double>(counts.data_ptr<double>(), counts.data_ptr<double>() + E);
}

TEST(DecodeOffsets, ZeroOffsetsAreBitwiseThePlainArgmax) {
  torch::manual_seed(0);
  auto scores = torch::rand({64, 3}, torch::kDouble);
  scores.index_put_({5, 1}, std::numeric_limits<double>::quiet_NaN());  // NaN ranks lowest
  scores.index_put_({7}, 0.5);                                           // a three-way tie: the finer expert wins
  for (const std::vector<double>& ratios : {std::vector<double>{0.3, 0.1, 0.6}, std::vector<double>{0.5, 0.0, 0.5}}) {
    mnn::ExpertChoiceRouter plain(mnn::ExpertChoiceRouterOptions(8, ratios));
    mnn::ExpertChoiceRouter zero(mnn::ExpertChoiceRouterOptions(8, ratios).decode_offsets({0.0, 0.0, 0.0}));
    EXPECT_TRUE(torch::equal(plain->argmax_route(scores), zero->argmax_route(scores)));
  }
}

TEST(DecodeOffsets, FittedOffsetsRealiseTheTargetShares) {
  torch::manual_seed(1);
  // Scores that favour expert 0 strongly, as an untrained or skewed router does.
  const auto scores = torch::sigmoid(torch::randn({4000, 3}, torch::kDouble) + torch::tensor({1.0, 0.0, -0.5}, torch::kDouble));
  for (const std::vector<double>& target : {std::vector<double>{0.3, 0.1, 0.6}, std::vector<double>{0.1, 0.2, 0.7},
                                            std::vector<double>{0.5, 0.0, 0.5}}) {
    const auto offsets = mnn::fit_decode_offsets(scores, target);
    ASSERT_EQ(offsets.size(), 3u);
    const auto got = shares(mnn::argmax_routing(scores, target, torch::tensor(offsets, torch::kDouble)), 3);
    for (size_t e = 0; e < 3; ++e) EXPECT_NEAR(got[e], target[e], 2.0 / 4000) << "expert " << e;
  }
}

TEST(DecodeOffsets, RatiosForBudgetHitTheBudgetAndNameTheRange) {
  const std::vector<int64_t> groups{1, 2, 4};
  const std::vector<double> trained{0.3, 0.1, 0.6};  // budget 0.5
  for (double budget : {0.25, 0.3, 0.5, 0.75, 1.0}) {
    const auto r = mnn::ratios_for_budget(groups, trained, budget);
    EXPECT_NEAR(mixsga::kv_fraction(groups, r), budget, 1e-12) << budget;
    double total = 0;
    for (double v : r) total += v;
    EXPECT_NEAR(total, 1.0, 1e-12);
  }
  EXPECT_EQ(mnn::ratios_for_budget(groups, trained, 0.5), trained);
  expect_error<c10::ValueError>([&] { mnn::ratios_for_budget(groups, trained, 0.2); }, {"budget", "[0.25, 1]", "0.2"});
  expect_error<c10::ValueError>([&] { mnn::ratios_for_budget(groups, trained, 1.5); }, {"budget", "[0.25, 1]", "1.5"});
  expect_error<c10::ValueError>([&] { mnn::fit_decode_offsets(torch::rand({50, 3}), trained); }, {"scores", "50", "300"});
}

TEST(DecodeOffsets, SetRoutingChecksEverythingFirstAndChangesBothModules) {
  mnn::MixSGAAttention layer(mnn::MixSGAAttentionOptions(32, 4, 4));
  expect_error<c10::ValueError>([&] { layer->set_routing({0.5, 0.5}, {}); }, {"ratios"});
  expect_error<c10::ValueError>([&] { layer->set_routing({0.2, 0.2, 0.6}, {0.0, std::nan("")}); }, {"decode_offsets"});
  EXPECT_EQ(layer->options.ratios(), (std::vector<double>{0.3, 0.1, 0.6}));  // unchanged
  layer->set_routing({0.2, 0.2, 0.6}, {0.0, 0.1, -0.2});
  EXPECT_EQ(layer->options.ratios(), (std::vector<double>{0.2, 0.2, 0.6}));
  EXPECT_EQ(layer->router->options.ratios(), (std::vector<double>{0.2, 0.2, 0.6}));
  EXPECT_EQ(layer->router->options.decode_offsets(), (std::vector<double>{0.0, 0.1, -0.2}));
  const auto scores = torch::rand({16, 3});
  EXPECT_TRUE(torch::equal(layer->router->argmax_route(scores),
                           mnn::argmax_routing(scores, {0.2, 0.2, 0.6}, torch::tensor({0.0, 0.1, -0.2}))));
}

TEST(DecodeOffsets, CheckpointsKeepThemAndOlderCheckpointsStillLoad) {
  const auto dir = std::filesystem::temp_directory_path();
  const auto with = (dir / fmt::format("mixsga_offsets_{}.pt", ::getpid())).string();
  const auto without = (dir / fmt::format("mixsga_no_offsets_{}.pt", ::getpid())).string();
  const auto options = mnn::MixSGAAttentionOptions(32, 4, 4);
  mnn::MixSGAAttention plain(options);
  torch::save(plain, without);  // as written before decode offsets existed: no such record
  mnn::MixSGAAttention plain2(options);
  torch::load(plain2, without);
  mnn::MixSGAAttention fitted(mnn::MixSGAAttentionOptions(options).decode_offsets({0.0, 0.25, -0.125}));
  torch::save(fitted, with);
  mnn::MixSGAAttention same(mnn::MixSGAAttentionOptions(options).decode_offsets({0.0, 0.25, -0.125}));
  torch::load(same, with);
  EXPECT_EQ(same->router->options.decode_offsets(), (std::vector<double>{0.0, 0.25, -0.125}));
  mnn::MixSGAAttention other(options);
  expect_error<c10::ValueError>([&] { torch::load(other, with); }, {"decode_offsets", "0.25"});
  std::filesystem::remove(with);
  std::filesystem::remove(without);
}

}  // namespace
