// Bad-input catalogue: the C++ modules (ExpertChoiceRouter, SharedGroupKV, MixSGAAttention).
// Conventions (exact exception class, message naming the argument and the value): bad_input_helpers.h.
#include "bad_input_helpers.h"

using namespace bad_input;
namespace ops = mixsga::ops;
namespace mnn = mixsga::nn;

// =============================================================================================
// nn::ExpertChoiceRouter
// =============================================================================================

TEST(BadInput, RouterOptionsAreValidated) {
  using Opt = mnn::ExpertChoiceRouterOptions;
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(0)); }, {"hidden_size", "> 0", "got 0"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(-4)); }, {"hidden_size", "got -4"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8, {0.4, 0.4, 0.4})); },
                                {"ratios", "sum to 1", "0.4, 0.4, 0.4"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8, {-0.5, 1.5})); }, {"ratios", "ratios[0] = -0.5"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8, {0.5, kNaN, 0.5})); }, {"ratios", "ratios[1] = nan"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8, {})); }, {"ratios", "empty"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8).aux_loss("mse")); },
                                {"aux_loss", "'sigmoid_ce', 'logit_ce', 'bce'", "got 'mse'"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8).aux_loss("")); }, {"aux_loss", "got ''"});
}

// forward / scores: x's last dim.
TEST(BadInput, RouterForwardRejectsBadX) {
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8));
  const auto before = params_of(*router);
  expect_error<c10::ValueError>([&] { router->forward(torch::rand({2, 5, 7})); },
                                {"x", "last dim 8 (hidden_size)", "[2, 5, 7]"});
  expect_error<c10::ValueError>([&] { router->forward(torch::tensor(1.f)); }, {"x", "got shape []"});
  expect_error<c10::ValueError>([&] { router->scores(torch::rand({3, 9})); }, {"x", "[3, 9]"});
  expect_params_unchanged(before, *router);
}

// forward: x must be floating and in the parameters' dtype.
TEST(BadInput, RouterForwardRejectsWrongDtype) {
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8));
  expect_error<c10::TypeError>([&] { router->forward(torch::rand({2, 5, 8}, torch::kDouble)); },
                               {"x", "parameters' dtype Float", "got Double"});
  expect_error<c10::TypeError>([&] { router->forward(torch::ones({2, 5, 8}, torch::kLong)); }, {"x", "Long"});
}

// route: the op's checks (scores rank / dtype, valid_mask shape / all padding).
TEST(BadInput, RouterRouteRejectsBadInput) {
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8));
  const auto scores = torch::rand({2, 5, 3});
  expect_error<c10::ValueError>([&] { router->route(torch::rand({5, 3})); }, {"scores", "[5, 3]"});
  expect_error<c10::TypeError>([&] { router->route(torch::ones({2, 5, 3}, torch::kLong)); }, {"scores", "Long"});
  expect_error<c10::ValueError>([&] { router->route(scores, torch::ones({2, 6})); }, {"valid_mask", "got [2, 6]"});
  expect_error<c10::ValueError>([&] { router->route(scores, torch::zeros({2, 5})); }, {"valid_mask", "sequence 0"});
  expect_error<c10::ValueError>([&] { router->route(torch::rand({2, 5, 4})); },
                                {"scores", "last dim 3 (experts)", "[2, 5, 4]"});
}

// argmax_route: last dim must be the number of experts; NaN ranks lowest, as in route().
TEST(BadInput, RouterArgmaxRouteRejectsBadScores) {
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8));
  expect_error<c10::ValueError>([&] { router->argmax_route(torch::rand({2, 5, 4})); },
                                {"scores", "last dim 3 (experts)", "[2, 5, 4]"});
  expect_error<c10::ValueError>([&] { router->argmax_route(torch::tensor(0.5f)); }, {"scores", "got shape []"});
  expect_error<c10::TypeError>([&] { router->argmax_route(long_full({2, 3}, 1)); }, {"scores", "Long"});
  // NaN / Inf: no crash, indices stay in range, NaN never wins (torch.argmax alone would pick it).
  const auto s = torch::tensor({{0.1f, std::nanf(""), 0.9f}, {0.2f, 0.3f, static_cast<float>(kInf)}});
  const auto idx = router->argmax_route(s);
  EXPECT_TRUE(((idx >= 0) & (idx < 3)).all().item<bool>());
  EXPECT_EQ(idx[0].item<int64_t>(), 2);
  EXPECT_EQ(idx[1].item<int64_t>(), 2);
}

// aux_loss: logits last dim, target shape, valid_mask shape.
TEST(BadInput, RouterAuxLossRejectsBadShapes) {
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8));
  const auto logits = torch::randn({2, 5, 3});
  const auto target = long_full({2, 5}, 1);
  expect_error<c10::ValueError>([&] { router->aux_loss(torch::randn({2, 5, 2}), target); },
                                {"logits", "last dim 3 (experts)", "[2, 5, 2]"});
  expect_error<c10::ValueError>([&] { router->aux_loss(logits, long_full({2, 4}, 1)); },
                                {"target", "expected shape [2, 5]", "got [2, 4]"});
  expect_error<c10::ValueError>([&] { router->aux_loss(logits, long_full({10}, 1)); }, {"target", "got [10]"});
  expect_error<c10::ValueError>([&] { router->aux_loss(logits, target, torch::ones({2, 4})); },
                                {"valid_mask", "expected shape [2, 5]", "got [2, 4]"});
}

// aux_loss: target values must be expert indices of an integer dtype, for every loss kind.
TEST(BadInput, RouterAuxLossRejectsBadTargets) {
  const auto logits = torch::randn({2, 5, 3});
  for (const std::string kind : {"sigmoid_ce", "logit_ce", "bce"}) {
    SCOPED_TRACE(kind);
    mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8).aux_loss(kind));
    expect_error<c10::ValueError>([&] { router->aux_loss(logits, long_full({2, 5}, 5)); },
                                  {"target", "[0, 3)", "[5, 5]"});
    expect_error<c10::ValueError>([&] { router->aux_loss(logits, long_full({2, 5}, -1)); }, {"target", "[-1, -1]"});
    expect_error<c10::TypeError>([&] { router->aux_loss(logits, torch::full({2, 5}, 1.7)); }, {"target", "Float"});
    expect_error<c10::TypeError>([&] { router->aux_loss(long_full({2, 5, 3}, 1), long_full({2, 5}, 1)); },
                                 {"logits", "Long"});
  }
}

// =============================================================================================
// nn::SharedGroupKV
// =============================================================================================

TEST(BadInput, SharedGroupKVOptionsAreValidated) {
  using Opt = mnn::SharedGroupKVOptions;
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(0, 4, 2)); }, {"hidden_size", "got 0"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 0, 2)); }, {"num_kv_heads", "got 0"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 4, -2)); }, {"head_dim", "got -2"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 4, 2).group_sizes({1, 4, 2})); },
                                {"group_sizes", "strictly increasing", "[1, 4, 2]"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 4, 2).group_sizes({0, 2})); },
                                {"group_sizes", "group_sizes[0] = 0"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 6, 2)); },
                                {"group_sizes", "KV heads (6)", "group_sizes[2] = 4"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 4, 2).group_sizes({})); }, {"group_sizes", "empty"});
}

// forward: x and expert_idx go through grouped_kv_proj's checks; parameters stay untouched.
TEST(BadInput, SharedGroupKVForwardRejectsBadInput) {
  mnn::SharedGroupKV kv(mnn::SharedGroupKVOptions(8, 4, 2).bias(true));
  const auto before = params_of(*kv);
  const auto x = torch::rand({2, 5, 8});
  expect_error<c10::TypeError>([&] { kv->forward(x, torch::zeros({2, 5})); }, {"expert_idx", "integer dtype", "Float"});
  expect_error<c10::ValueError>([&] { kv->forward(x, long_full({2, 6}, 0)); }, {"expert_idx", "[2, 5]", "got [2, 6]"});
  expect_error<c10::ValueError>([&] { kv->forward(x, long_full({2, 5}, 3)); }, {"expert_idx", "[0, 3)", "[3, 3]"});
  expect_error<c10::TypeError>([&] { kv->forward(torch::ones({2, 5, 8}, torch::kInt), long_full({2, 5}, 0)); },
                               {"x", "Int"});
  expect_error<c10::TypeError>([&] { kv->forward(x.to(torch::kDouble), long_full({2, 5}, 0)); },
                               {"x", "parameters' dtype Float", "got Double"});
  expect_error<c10::ValueError>([&] { kv->forward(torch::rand({2, 5, 7}), long_full({2, 5}, 0)); },
                                {"x", "last dim 8 (hidden_size)", "[2, 5, 7]"});
  expect_params_unchanged(before, *kv);
}

// expert_weights: expert out of range is an IndexError.
TEST(BadInput, SharedGroupKVExpertWeightsRejectsBadExpert) {
  mnn::SharedGroupKV kv(mnn::SharedGroupKVOptions(8, 4, 2));
  expect_error<c10::IndexError>([&] { kv->expert_weights(3, true); }, {"expert", "[0, 3)", "got 3"});
  expect_error<c10::IndexError>([&] { kv->expert_weights(-1, false); }, {"expert", "got -1"});
  expect_error<c10::IndexError>([&] { kv->expert_weights(100, false); }, {"expert", "got 100"});
}

// =============================================================================================
// nn::MixSGAAttention: option validation
// =============================================================================================

TEST(BadInput, AttentionOptionsRejectBadSizes) {
  using Opt = mnn::MixSGAAttentionOptions;
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(0, 4, 4)); }, {"hidden_size", "got 0"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, -4, 4)); }, {"num_heads", "got -4"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 0)); }, {"num_kv_heads", "got 0"});
  // num_kv_heads must divide num_heads.
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 3)); },
                                {"num_kv_heads", "divide num_heads (4)", "got 3"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 8)); }, {"num_kv_heads", "got 8"});
  // num_heads must divide hidden_size when head_dim is left 0.
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(30, 4, 4)); },
                                {"num_heads", "hidden_size (30)", "got 4"});
  // Odd head_dim, derived (12 / 4 = 3) or given.
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(12, 4, 4)); }, {"head_dim", "even", "got 3"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).head_dim(5)); }, {"head_dim", "got 5"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).head_dim(-2)); }, {"head_dim", "> 0", "got -2"});
}

TEST(BadInput, AttentionOptionsRejectBadGroupSizesAndRatios) {
  using Opt = mnn::MixSGAAttentionOptions;
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).group_sizes({1, 4, 2})); },
                                {"group_sizes", "strictly increasing", "[1, 4, 2]"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).group_sizes({0, 2, 4})); },
                                {"group_sizes", "group_sizes[0] = 0"});
  // Default group sizes (1, 2, 4) with 2 KV heads: 4 does not divide 2.
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 2)); },
                                {"group_sizes", "KV heads (2)", "group_sizes[2] = 4"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).group_sizes({1, 3})); },
                                {"group_sizes", "group_sizes[1] = 3"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).ratios({0.5, 0.25, 0.5})); },
                                {"ratios", "sum to 1", "1.25"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).ratios({-0.1, 0.5, 0.6})); },
                                {"ratios", "ratios[0] = -0.1"});
  // Ratios must match the number of experts (= group sizes).
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).ratios({0.5, 0.5})); },
                                {"ratios", "expected 3 ratios", "got 2 (0.5, 0.5)"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).group_sizes({1, 2})); },
                                {"ratios", "expected 2 ratios", "got 3 (0.3, 0.1, 0.6)"});
}

TEST(BadInput, AttentionOptionsRejectBadStringsAndScalars) {
  using Opt = mnn::MixSGAAttentionOptions;
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).aux_loss("cross_entropy")); },
                                {"aux_loss", "got 'cross_entropy'"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).aux_loss("Sigmoid_CE")); },
                                {"aux_loss", "got 'Sigmoid_CE'"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).prefill_routing("greedy")); },
                                {"prefill_routing", "'expert_choice' or 'argmax'", "got 'greedy'"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).aux_alpha(-0.5)); },
                                {"aux_alpha", ">= 0", "got -0.5"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).aux_alpha(kNaN)); }, {"aux_alpha", "got nan"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).aux_alpha(kInf)); }, {"aux_alpha", "got inf"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).attention_dropout(1.0)); },
                                {"attention_dropout", "[0, 1)", "got 1"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).attention_dropout(-0.1)); },
                                {"attention_dropout", "got -0.1"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).rope_theta(0.0)); }, {"rope_theta", "got 0"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).rope_theta(kNaN)); }, {"rope_theta", "got nan"});
}

// =============================================================================================
// nn::MixSGAAttention: forward
// =============================================================================================

// hidden_states: dtype, rank, width; a failed forward leaves the input and the parameters alone.
TEST(BadInput, AttentionForwardRejectsBadHiddenStates) {
  mnn::MixSGAAttention attn(mnn::MixSGAAttentionOptions(32, 4, 4));
  const auto params = params_of(*attn);
  expect_error<c10::TypeError>([&] { attn->forward(torch::ones({2, 5, 32}, torch::kLong)); },
                               {"hidden_states", "float32", "Long"});
  const auto x64 = torch::rand({2, 5, 32}, torch::kDouble).requires_grad_();
  const auto before = snapshot({x64});
  expect_error<c10::TypeError>([&] { attn->forward(x64); },
                               {"hidden_states", "parameters' dtype Float", "got Double"});
  expect_unchanged(before, {x64});
  EXPECT_FALSE(x64.grad().defined());
  expect_error<c10::TypeError>([&] { attn->forward(torch::rand({2, 5, 32}, torch::kBFloat16)); },
                               {"hidden_states", "got BFloat16"});
  expect_error<c10::ValueError>([&] { attn->forward(torch::rand({5, 32})); },
                                {"hidden_states", "[B, L, 32] (hidden_size)", "got [5, 32]"});
  expect_error<c10::ValueError>([&] { attn->forward(torch::rand({2, 5, 31})); }, {"hidden_states", "got [2, 5, 31]"});
  expect_error<c10::ValueError>([&] { attn->forward_with_routing(torch::rand({1, 2, 5, 32})); },
                                {"hidden_states", "got [1, 2, 5, 32]"});
  expect_params_unchanged(params, *attn);
}

// attention_mask and position_ids of the wrong shape.
TEST(BadInput, AttentionForwardRejectsBadMaskAndPositions) {
  mnn::MixSGAAttention attn(mnn::MixSGAAttentionOptions(32, 4, 4));
  const auto x = torch::rand({2, 5, 32});
  expect_error<c10::ValueError>([&] { attn->forward(x, torch::ones({2, 4})); },
                                {"attention_mask", "[B, L] = [2, 5]", "got shape [2, 4]"});
  expect_error<c10::ValueError>([&] { attn->forward(x, torch::ones({5})); }, {"attention_mask", "got shape [5]"});
  expect_error<c10::ValueError>([&] { attn->forward(x, torch::ones({2, 1, 1, 5})); },
                                {"attention_mask", "got shape [2, 1, 1, 5]"});
  expect_error<c10::ValueError>([&] { attn->forward(x, std::nullopt, torch::arange(4)); },
                                {"position_ids", "[2, 5] or [5]", "got [4]"});
  expect_error<c10::ValueError>([&] { attn->forward(x, std::nullopt, torch::arange(5).view({1, 5})); },
                                {"position_ids", "got [1, 5]"});
  expect_error<c10::ValueError>(
      [&] { attn->forward_with_routing(x, torch::ones({2, 5}, torch::kLong), torch::zeros({3, 5}, torch::kLong)); },
      {"position_ids", "got [3, 5]"});
  // Masks are 0/1 and of an integer (or bool) dtype; positions are integers.
  expect_error<c10::TypeError>([&] { attn->forward(x, torch::ones({2, 5})); },
                               {"attention_mask", "bool or integer 0/1 mask", "torch.float32"});
  expect_error<c10::ValueError>([&] { attn->forward(x, torch::full({2, 5}, 2, torch::kLong)); },
                                {"attention_mask", "only 0 and 1", "got 2 at [0, 0]"});
  expect_error<c10::TypeError>([&] { attn->forward(x, std::nullopt, torch::arange(5.0)); },
                               {"position_ids", "integer dtype", "torch.float32"});
}

// An all-padding sequence in attention_mask is rejected (by the routing op, hence the name).
// An all-padding sequence is named against attention_mask, the argument the caller passed.
TEST(BadInput, AttentionForwardRejectsAllPaddingSequence) {
  for (const std::string mode : {"expert_choice", "argmax"}) {
    SCOPED_TRACE(mode);
    mnn::MixSGAAttention attn(mnn::MixSGAAttentionOptions(32, 4, 4).prefill_routing(mode));
    const auto params = params_of(*attn);
    const auto x = torch::rand({3, 5, 32}).requires_grad_();
    auto mask = torch::ones({3, 5}, torch::kLong);
    mask[2].zero_();
    const auto before = snapshot({x, mask});
    expect_error<c10::ValueError>([&] { attn->forward(x, mask); }, {"sequence 2", "no valid token", "all padding"});
    expect_error<c10::ValueError>([&] { attn->forward(x, mask); }, {"attention_mask"});
    expect_unchanged(before, {x, mask});
    expect_params_unchanged(params, *attn);
  }
}

// Devices: Meta tensors stand in for "another device"; the module checks them before any dispatch.
TEST(BadInput, AttentionForwardRejectsMismatchedDevices) {
  mnn::MixSGAAttention attn(mnn::MixSGAAttentionOptions(32, 4, 4));
  expect_error<c10::ValueError>([&] { attn->forward(torch::rand({2, 5, 32}), torch::ones({2, 5}, torch::kMeta)); },
                                {"attention_mask", "expected device cpu", "got meta"});
  expect_error<c10::ValueError>([&] { attn->forward(torch::empty({2, 5, 32}, torch::kMeta)); },
                                {"hidden_states", "parameters' device cpu", "got meta"});
}

// NaN hidden states: routing still assigns every token one expert with the capacity counts, no crash.
TEST(BadInput, AttentionForwardToleratesNaNRouterInput) {
  mnn::MixSGAAttention attn(mnn::MixSGAAttentionOptions(32, 4, 4));
  auto x = torch::rand({2, 10, 32});
  x[0][3].fill_(kNaN);
  x[1].fill_(kNaN);
  const auto r = attn->forward_with_routing(x);
  ASSERT_EQ(r.target_idx.sizes(), (std::vector<int64_t>{2, 10}));
  for (int64_t b = 0; b < 2; ++b) EXPECT_EQ(expert_counts(r.target_idx, b, 3), (std::vector<int64_t>{3, 1, 6}));
  EXPECT_TRUE(torch::equal(r.expert_idx, r.target_idx));
}
