// The quality extensions of docs/METHOD.md (E1 key_scale, E2 routing_signal) and the zero-capacity rule
// of decode routing, in the C++ layer: identities in float64, capacities, option checks, checkpoints.
#include <gtest/gtest.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include <filesystem>
#include <sstream>

using namespace mixsga::nn;

namespace {

MixSGAAttentionOptions options(std::vector<double> ratios = {0.3, 0.1, 0.6}) {
  return MixSGAAttentionOptions(32, 8, 4).ratios(std::move(ratios)).bias(true);
}

MixSGAAttention make(MixSGAAttentionOptions o) {
  torch::manual_seed(0);
  MixSGAAttention layer(std::move(o));
  layer->to(torch::kDouble);
  return layer;
}

// K/V of every head of x [B, L, D] -> [B, L, 2*Hkv, d], then each token's pooling error at group g.
torch::Tensor pooling_error_reference(MixSGAAttention& m, const torch::Tensor& x, int64_t g) {
  const int64_t B = x.size(0), L = x.size(1), d = m->head_dim();
  auto err = torch::zeros({B, L}, torch::kDouble);
  for (auto* proj : {&m->k_proj, &m->v_proj}) {
    const auto heads = (*proj)->forward(x).view({B, L, -1, d});
    for (int64_t j = 0; j < heads.size(2) / g; ++j) {
      const auto group = heads.narrow(2, j * g, g);
      const auto mean = group.mean(2);
      for (int64_t h = 0; h < g; ++h) err += (group.select(2, h) - mean).pow(2).sum(-1);
    }
  }
  return err;
}

}  // namespace

TEST(Extensions, LearnedKeyScaleAtZeroIsBitwiseThePaper) {
  auto paper = make(options());
  auto learned = make(options().key_scale("learned"));
  ASSERT_TRUE(learned->key_log_scale.defined());
  EXPECT_EQ(learned->key_log_scale.sizes(), torch::IntArrayRef({3}));
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 9, 32}, torch::kDouble);
  const auto a = paper->forward_with_routing(x), b = learned->forward_with_routing(x);
  EXPECT_TRUE(torch::equal(a.expert_idx, b.expert_idx));
  EXPECT_TRUE(torch::equal(a.output, b.output));
}

TEST(Extensions, GroupKeyScaleEqualsScalingThePooledKeysByHand) {
  // "group" multiplies expert e's keys by g_e: the same as a "learned" layer with log(g_e).
  auto group = make(options().key_scale("group"));
  auto learned = make(options().key_scale("learned"));
  {
    torch::NoGradGuard no_grad;
    learned->key_log_scale.copy_(torch::tensor({1.0, 2.0, 4.0}, torch::kDouble).log());
  }
  const auto x = torch::randn({2, 7, 32}, torch::kDouble);
  const auto idx = torch::randint(0, 3, {2, 7}, torch::kLong);
  EXPECT_TRUE(torch::allclose(group->forward_routed(x, idx), learned->forward_routed(x, idx), 1e-12, 1e-12));
  // ... and differs from the paper whenever a coarse token is attended to.
  auto paper = make(options());
  EXPECT_FALSE(torch::allclose(group->forward_routed(x, idx), paper->forward_routed(x, idx), 1e-6, 1e-6));
}

TEST(Extensions, LearnedKeyScaleGetsAGradientFromTheOutput) {
  auto m = make(options().key_scale("learned"));
  const auto x = torch::randn({2, 8, 32}, torch::kDouble);
  std::get<0>(m->forward(x)).square().sum().backward();
  ASSERT_TRUE(m->key_log_scale.grad().defined());
  EXPECT_GT(m->key_log_scale.grad().abs().sum().item<double>(), 0.0);
}

TEST(Extensions, RoutingByPoolingErrorRespectsCapacitiesAndRanksByError) {
  auto m = make(options().routing_signal("pooling_error"));
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({3, 20, 32}, torch::kDouble);
  const auto r = m->forward_with_routing(x);
  const auto err = pooling_error_reference(m, x, 4);
  for (int64_t b = 0; b < 3; ++b) {
    const auto idx = r.target_idx[b];
    const auto counts = torch::bincount(idx, {}, 3);
    EXPECT_EQ(counts[0].item<int64_t>(), 6);  // ceil(0.3 * 20)
    EXPECT_EQ(counts[1].item<int64_t>(), 2);  // ceil(0.1 * 20)
    EXPECT_EQ(counts[2].item<int64_t>(), 12);
    for (int64_t e = 0; e < 2; ++e) {
      const auto finer = err[b].masked_select(idx <= e), coarser = err[b].masked_select(idx > e);
      EXPECT_GE(finer.min().item<double>(), coarser.max().item<double>());
    }
  }
  EXPECT_TRUE(torch::equal(r.expert_idx, r.target_idx));
}

TEST(Extensions, ArgmaxNeverChoosesAZeroCapacityExpert) {
  ExpertChoiceRouter router(ExpertChoiceRouterOptions(8, {0.5, 0.0, 0.5}));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto scores = torch::tensor({0.1, 0.9, 0.2, 0.9, 0.95, 0.1, nan, 0.5, 0.4, nan, 0.9, nan}, torch::kDouble).view({4, 3});
  const auto idx = router->argmax_route(scores);
  EXPECT_EQ(idx[0].item<int64_t>(), 2);
  EXPECT_EQ(idx[1].item<int64_t>(), 0);
  EXPECT_EQ(idx[2].item<int64_t>(), 2);
  EXPECT_EQ(idx[3].item<int64_t>(), 0);  // every open score NaN: the finest open expert
}

TEST(Extensions, DecodeWithRatioZeroExpertsKeepsTheOriginalLayer) {
  auto m = make(options({1.0, 0.0, 0.0}));
  {
    torch::NoGradGuard no_grad;
    m->router->proj->bias.copy_(torch::tensor({-5.0, 5.0, 5.0}));  // prefers the closed experts
  }
  m->eval();
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({1, 9, 32}, torch::kDouble);
  mixsga::HeteroKVCache cache(m->cache_options(1));
  std::vector<torch::Tensor> outs{std::get<0>(m->forward(x.narrow(1, 0, 5), std::nullopt, std::nullopt, &cache))};
  for (int64_t t = 5; t < 9; ++t) {
    const auto step = m->forward_with_routing(x.narrow(1, t, 1), std::nullopt, std::nullopt, &cache);
    EXPECT_EQ(step.expert_idx.item<int64_t>(), 0);
    outs.push_back(step.output);
  }
  const auto full = m->forward_routed(x, torch::zeros({1, 9}, torch::kLong));
  EXPECT_TRUE(torch::allclose(torch::cat(outs, 1), full, 1e-10, 1e-10));
}

TEST(Extensions, BadOptionValuesAreRejectedByName) {
  auto expect = [](MixSGAAttentionOptions o, const std::string& what) {
    try {
      MixSGAAttention m(o);
      ADD_FAILURE() << "no error for " << what;
    } catch (const c10::ValueError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  expect(options().key_scale("norm"), "key_scale: must be one of 'none', 'group', 'learned', got 'norm'");
  expect(options().routing_signal("oracle"), "routing_signal: must be one of 'router', 'pooling_error', got 'oracle'");
}

TEST(Extensions, MasksMustBeIntegerZeroOne) {
  auto m = make(options());
  const auto x = torch::randn({1, 4, 32}, torch::kDouble);
  try {
    m->forward(x, torch::tensor({{1, 2, 1, 1}}));
    ADD_FAILURE() << "mask value 2 accepted";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("attention_mask: must hold only 0 and 1, got 2 at [0, 1]"), std::string::npos);
  }
  try {
    m->forward(x, torch::ones({1, 4}));
    ADD_FAILURE() << "float mask accepted";
  } catch (const c10::TypeError& e) {
    EXPECT_NE(std::string(e.what()).find("attention_mask: expected a bool or integer 0/1 mask, got torch.float32"),
              std::string::npos);
  }
}

TEST(Extensions, CheckpointsKeepTheNewOptionsAndRefuseAMismatch) {
  auto m = make(options().key_scale("learned").routing_signal("pooling_error"));
  {
    torch::NoGradGuard no_grad;
    m->key_log_scale.copy_(torch::tensor({0.0, 0.3, 0.9}));
  }
  std::stringstream buffer;
  torch::save(m, buffer);
  auto same = make(options().key_scale("learned").routing_signal("pooling_error"));
  buffer.seekg(0);
  torch::load(same, buffer);
  EXPECT_TRUE(torch::equal(same->key_log_scale, m->key_log_scale));
  auto other = make(options().key_scale("learned"));
  buffer.seekg(0);
  try {
    torch::load(other, buffer);
    ADD_FAILURE() << "a checkpoint with routing_signal=pooling_error loaded into a router-signal layer";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("routing_signal"), std::string::npos) << e.what();
  }
}

TEST(Extensions, ForwardDefaultsWorkThroughAnyModule) {
  // FORWARD_HAS_DEFAULT_ARGS: a container can call forward(hidden_states) alone.
  auto m = make(options());
  torch::nn::AnyModule any(m);
  const auto x = torch::randn({1, 6, 32}, torch::kDouble);
  const auto [out, aux] = any.forward<std::tuple<torch::Tensor, torch::Tensor>>(x);
  EXPECT_TRUE(torch::allclose(out, std::get<0>(m->forward(x)), 0, 0));
}
