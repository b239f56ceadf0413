// MixSGAAttention and ExpertChoiceRouter: the METHOD.md identities against plain attention written in
// the test, the aux loss, gradient flow, causality, padding, dtypes and the module idiom
// (clone / pretty_print / save / load).
#include <gtest/gtest.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include <filesystem>
#include <sstream>

#include "reference.h"

using namespace mixsga::nn;
using namespace mixsga::testing;

namespace {

MixSGAAttention make_layer(std::vector<double> ratios, torch::Dtype dtype = torch::kDouble,
                           const std::string& prefill = "expert_choice") {
  // D = 32, Hq = 8, Hkv = 4, d = 4: experts keep 4, 2 or 1 KV heads.
  MixSGAAttention layer(MixSGAAttentionOptions(32, 8, 4).ratios(std::move(ratios)).prefill_routing(prefill));
  layer->to(dtype);
  return layer;
}

torch::Tensor agreement(ExpertChoiceRouter& router, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  const auto scores = router->scores(x);
  return (router->argmax_route(scores) == router->route(scores)).to(torch::kDouble).mean();
}

}  // namespace

// ---- METHOD.md identities -----------------------------------------------------------------------

// The fused CPU RoPE (ops::rope_rotate) against the composite form, with angles whose halves differ,
// on a strided view; its transpose is the adjoint; apply_rope matches the per-element reference.
TEST(Rope, FusedRotationMatchesTheCompositeAndItsTransposeIsTheAdjoint) {
  torch::manual_seed(0);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const auto x = torch::randn({2, 6, 10, 8}, opts).split(5, 2)[1];  // a head-axis view, like k and v
  const auto c = torch::randn({2, 6, 8}, opts), s = torch::randn({2, 6, 8}, opts);
  const auto fused = mixsga::ops::rope_rotate(x, c, s);
  EXPECT_TRUE(torch::allclose(fused, rotate_half_reference(x, c.unsqueeze(2), s.unsqueeze(2)), 0.0, 1e-14));
  const auto y = torch::randn_like(fused);
  const auto lhs = (fused * y).sum().item<double>();
  const auto rhs = (x * mixsga::ops::rope_rotate(y, c, s, /*transpose=*/true)).sum().item<double>();
  EXPECT_NEAR(lhs, rhs, 1e-12);
  const std::vector<int64_t> positions{0, 3, 4, 9, 10, 200};
  EXPECT_TRUE(torch::allclose(apply_rope(x, torch::tensor(positions), 1e4), reference_rope(x, positions, 1e4), 0.0, 1e-12));
}

TEST(MixSGAIdentities, RatiosOneZeroZeroIsTheOriginalAttention) {
  torch::manual_seed(0);
  auto layer = make_layer({1, 0, 0});
  const auto x = torch::randn({2, 12, 32}, torch::kDouble);
  const auto [out, aux] = layer->forward(x);
  const auto want = reference_gqa_attention(x, layer->q_proj->weight, layer->k_proj->weight, layer->v_proj->weight,
                                            layer->o_proj->weight, 8, 4, 10000.0);
  EXPECT_TRUE(torch::allclose(out, want, 1e-10, 1e-12)) << (out - want).abs().max();
}

TEST(MixSGAIdentities, RatiosZeroOneZeroIsMeanPooledGQAOfPairs) {
  torch::manual_seed(1);
  auto layer = make_layer({0, 1, 0});
  const auto x = torch::randn({2, 12, 32}, torch::kDouble);
  const auto out = std::get<0>(layer->forward(x));
  const auto want = reference_gqa_attention(x, layer->q_proj->weight, reference_pool_weight(layer->k_proj->weight, 2, 4),
                                            reference_pool_weight(layer->v_proj->weight, 2, 4), layer->o_proj->weight, 8,
                                            4, 10000.0);
  EXPECT_TRUE(torch::allclose(out, want, 1e-10, 1e-12)) << (out - want).abs().max();
}

TEST(MixSGAIdentities, RatiosZeroZeroOneIsGQAWithGroupFour) {
  torch::manual_seed(2);
  auto layer = make_layer({0, 0, 1});
  const auto x = torch::randn({2, 12, 32}, torch::kDouble);
  const auto out = std::get<0>(layer->forward(x));
  const auto want = reference_gqa_attention(x, layer->q_proj->weight, reference_pool_weight(layer->k_proj->weight, 4, 4),
                                            reference_pool_weight(layer->v_proj->weight, 4, 4), layer->o_proj->weight, 8,
                                            4, 10000.0);
  EXPECT_TRUE(torch::allclose(out, want, 1e-10, 1e-12)) << (out - want).abs().max();
}

TEST(MixSGAIdentities, MixedRoutingMatchesPerTokenExpandedReference) {
  // Row t of K_eff / V_eff is token t's own expert's pooled K / V (METHOD.md step 6).
  torch::manual_seed(3);
  auto layer = make_layer({0.3, 0.1, 0.6});
  const auto x = torch::randn({2, 20, 32}, torch::kDouble);
  const auto r = layer->forward_with_routing(x);
  const int64_t B = 2, L = 20, d = 4;
  const auto idx = r.expert_idx.view({-1});
  const auto k = reference_pool(torch::matmul(x, layer->k_proj->weight.t()).view({B * L, 4, d}), idx, {1, 2, 4});
  const auto v = reference_pool(torch::matmul(x, layer->v_proj->weight.t()).view({B * L, 4, d}), idx, {1, 2, 4});
  std::vector<int64_t> pos(L);
  std::iota(pos.begin(), pos.end(), 0);
  auto q = reference_rope(torch::matmul(x, layer->q_proj->weight.t()).view({B, L, 8, d}), pos, 1e4).permute({0, 2, 1, 3});
  auto kr = reference_rope(k.view({B, L, 4, d}), pos, 1e4).permute({0, 2, 1, 3}).repeat_interleave(2, 1);
  auto vr = v.view({B, L, 4, d}).permute({0, 2, 1, 3}).repeat_interleave(2, 1);
  auto s = torch::matmul(q, kr.transpose(-1, -2)) / 2.0;
  s = s.masked_fill(torch::ones({L, L}, torch::kBool).triu(1), -INFINITY);
  const auto want = torch::matmul(torch::matmul(torch::softmax(s, -1), vr).permute({0, 2, 1, 3}).reshape({B, L, 32}),
                                  layer->o_proj->weight.t());
  EXPECT_TRUE(torch::allclose(r.output, want, 1e-10, 1e-12));
  // Every token has exactly one expert, 3 / 1 / 6 per 10 tokens.
  for (int64_t b = 0; b < B; ++b) {
    EXPECT_EQ((r.expert_idx[b] == 0).sum().item<int64_t>(), 6);
    EXPECT_EQ((r.expert_idx[b] == 1).sum().item<int64_t>(), 2);
    EXPECT_EQ((r.expert_idx[b] == 2).sum().item<int64_t>(), 12);
  }
  EXPECT_DOUBLE_EQ(layer->kv_fraction(), 0.5);
}

// ---- router and aux loss ------------------------------------------------------------------------

TEST(ExpertChoiceRouter, AuxLossTeachesArgmaxToReproduceExpertChoiceOnHeldOutData) {
  for (const std::string kind : {"sigmoid_ce", "logit_ce", "bce"}) {
    torch::manual_seed(4);
    ExpertChoiceRouter router(ExpertChoiceRouterOptions(16, {0.3, 0.1, 0.6}).aux_loss(kind));
    const auto train = torch::randn({16, 64, 16});
    const auto held_out = torch::randn({16, 64, 16});
    const double before = agreement(router, held_out).item<double>();
    torch::optim::Adam opt(router->parameters(), torch::optim::AdamOptions(0.05));
    for (int step = 0; step < 150; ++step) {
      const auto logits = router->forward(train);
      const auto target = router->route(torch::sigmoid(logits));
      opt.zero_grad();
      router->aux_loss(logits, target).backward();
      opt.step();
    }
    const double after = agreement(router, held_out).item<double>();
    // Chance for independent argmax with 3:1:6 capacities is 0.3^2 + 0.1^2 + 0.6^2 = 0.46.
    EXPECT_GT(after, 0.85) << kind << " before " << before;
    EXPECT_GT(after, before + 0.1) << kind;
  }
}

TEST(ExpertChoiceRouter, AuxLossKindsAgainstFormulas) {
  torch::manual_seed(5);
  ExpertChoiceRouter sig(ExpertChoiceRouterOptions(4, {0.5, 0.5}));
  ExpertChoiceRouter logit(ExpertChoiceRouterOptions(4, {0.5, 0.5}).aux_loss("logit_ce"));
  ExpertChoiceRouter bce(ExpertChoiceRouterOptions(4, {0.5, 0.5}).aux_loss("bce"));
  const auto z = torch::randn({1, 3, 2}, torch::kDouble);
  const auto t = torch::tensor({{0, 1, 1}});
  const auto mask = torch::tensor({{1, 1, 0}});
  double want_sig = 0, want_logit = 0, want_bce = 0;
  for (int64_t i = 0; i < 2; ++i) {  // the masked third token must not count
    const auto zi = z[0][i];
    const int64_t ti = t[0][i].item<int64_t>();
    const auto s = torch::sigmoid(zi);
    want_sig += -(s[ti] - torch::logsumexp(s, 0)).item<double>();
    want_logit += -(zi[ti] - torch::logsumexp(zi, 0)).item<double>();
    for (int64_t e = 0; e < 2; ++e) {
      const double p = s[e].item<double>();
      want_bce += -(e == ti ? std::log(p) : std::log(1 - p)) / 2;
    }
  }
  EXPECT_NEAR(sig->aux_loss(z, t, mask).item<double>(), want_sig / 2, 1e-12);
  EXPECT_NEAR(logit->aux_loss(z, t, mask).item<double>(), want_logit / 2, 1e-12);
  EXPECT_NEAR(bce->aux_loss(z, t, mask).item<double>(), want_bce / 2, 1e-12);
}

TEST(MixSGAAttention, LMLossSendsNoGradientToTheRouterOnlyAuxDoes) {
  torch::manual_seed(6);
  auto layer = make_layer({0.3, 0.1, 0.6});
  auto x = torch::randn({2, 10, 32}, torch::kDouble).requires_grad_(true);
  auto [out, aux] = layer->forward(x);
  out.pow(2).sum().backward();
  const auto& gw = layer->router->proj->weight.grad();
  EXPECT_TRUE(!gw.defined() || gw.abs().sum().item<double>() == 0.0);

  // The aux loss reaches the router and, unless detach_router_input, the backbone input.
  for (bool detach : {false, true}) {
    auto l = make_layer({0.3, 0.1, 0.6});
    l->options.detach_router_input(detach);
    auto xi = torch::randn({2, 10, 32}, torch::kDouble).requires_grad_(true);
    std::get<1>(l->forward(xi)).backward();
    EXPECT_GT(l->router->proj->weight.grad().abs().sum().item<double>(), 0.0);
    const bool reached_x = xi.grad().defined() && xi.grad().abs().sum().item<double>() > 0.0;
    EXPECT_EQ(reached_x, !detach) << "detach_router_input=" << detach;
    EXPECT_NEAR(std::get<1>(l->forward(xi)).item<double>(),
                0.1 * l->router->aux_loss(l->router->forward(xi), l->forward_with_routing(xi).target_idx).item<double>(),
                1e-12);
  }
}

TEST(MixSGAAttention, GradientsMatchFiniteDifferences) {
  torch::manual_seed(7);
  MixSGAAttention layer(MixSGAAttentionOptions(8, 4, 4).head_dim(2).bias(true).ratios({0.4, 0.2, 0.4}));
  layer->to(torch::kDouble);
  const auto x = torch::randn({2, 5, 8}, torch::kDouble);
  // Hold routing fixed (it is a hard, non-differentiable decision) by routing once up front.
  const auto idx = layer->forward_with_routing(x).expert_idx;
  const double err = max_gradient_error(
      [&](const std::vector<torch::Tensor>& in) {
        const auto [k, v] = layer->kv->forward(in[0], idx);
        return k * 2 + v;
      },
      {x});
  EXPECT_LT(err, 1e-7);
  const double err_layer = max_gradient_error(
      [&](const std::vector<torch::Tensor>& in) { return std::get<0>(layer->forward(in[0])); }, {x});
  EXPECT_LT(err_layer, 1e-6);
}

// ---- causality and padding ------------------------------------------------------------------------

TEST(MixSGAAttention, ArgmaxPrefillIsCausal) {
  torch::manual_seed(8);
  auto layer = make_layer({0.3, 0.1, 0.6}, torch::kDouble, "argmax");
  const auto x = torch::randn({2, 24, 32}, torch::kDouble);
  auto changed = x.clone();
  changed.narrow(1, 12, 12).normal_();
  const auto a = std::get<0>(layer->forward(x)), b = std::get<0>(layer->forward(changed));
  EXPECT_TRUE(torch::allclose(a.narrow(1, 0, 12), b.narrow(1, 0, 12), 1e-12, 1e-12));
  EXPECT_FALSE(torch::allclose(a.narrow(1, 12, 12), b.narrow(1, 12, 12)));
  // Expert choice is not causal: the same change moves some earlier tokens to other experts.
  auto ec = make_layer({0.3, 0.1, 0.6});
  const auto ra = ec->forward_with_routing(x), rb = ec->forward_with_routing(changed);
  EXPECT_FALSE(torch::equal(ra.expert_idx.narrow(1, 0, 12), rb.expert_idx.narrow(1, 0, 12)));
}

TEST(MixSGAAttention, LeftAndRightPaddingDoNotChangeRealTokens) {
  torch::manual_seed(9);
  for (const std::string prefill : {"expert_choice", "argmax"}) {
    auto layer = make_layer({0.3, 0.1, 0.6}, torch::kDouble, prefill);
    const auto x = torch::randn({1, 10, 32}, torch::kDouble);
    const auto alone = std::get<0>(layer->forward(x));
    // Sequence 0: 5 pads on the left; sequence 1: 5 pads on the right.
    auto batch = torch::randn({2, 15, 32}, torch::kDouble) * 100;
    batch[0].narrow(0, 5, 10).copy_(x[0]);
    batch[1].narrow(0, 0, 10).copy_(x[0]);
    auto mask = torch::ones({2, 15}, torch::kLong);
    mask[0].narrow(0, 0, 5).zero_();
    mask[1].narrow(0, 10, 5).zero_();
    const auto out = std::get<0>(layer->forward(batch, mask));
    EXPECT_TRUE(torch::allclose(out[0].narrow(0, 5, 10), alone[0], 1e-10, 1e-12)) << prefill;
    EXPECT_TRUE(torch::allclose(out[1].narrow(0, 0, 10), alone[0], 1e-10, 1e-12)) << prefill;
    EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  }
}

TEST(MixSGAAttention, SequencesOfABatchAreIndependent) {
  torch::manual_seed(10);
  auto layer = make_layer({0.25, 0.25, 0.5});
  const auto x = torch::randn({3, 16, 32}, torch::kDouble);
  const auto out = std::get<0>(layer->forward(x));
  for (int64_t b = 0; b < 3; ++b) {
    EXPECT_TRUE(torch::allclose(out[b], std::get<0>(layer->forward(x.narrow(0, b, 1)))[0], 1e-12, 1e-12));
  }
}

// ---- dtypes, empty, module idiom --------------------------------------------------------------------

TEST(MixSGAAttention, Float32AndBFloat16CloseToFloat64) {
  torch::manual_seed(11);
  auto ref = make_layer({1, 0, 0});  // fixed routing, so low precision cannot flip an expert
  const auto x = torch::randn({2, 16, 32}, torch::kDouble);
  const auto exact = std::get<0>(ref->forward(x));
  for (auto [dtype, tol] : {std::pair{torch::kFloat, 1e-5}, std::pair{torch::kBFloat16, 5e-2}}) {
    auto low = std::dynamic_pointer_cast<MixSGAAttentionImpl>(ref->clone());
    low->to(dtype);
    const auto out = std::get<0>(low->forward(x.to(dtype)));
    EXPECT_EQ(out.scalar_type(), dtype);
    const double err = (out.to(torch::kDouble) - exact).abs().max().item<double>();
    EXPECT_LT(err, tol * exact.abs().max().item<double>()) << dtype;
  }
}

TEST(MixSGAAttention, EmptyBatchAndNonContiguousInput) {
  auto layer = make_layer({0.3, 0.1, 0.6});
  const auto [out, aux] = layer->forward(torch::randn({0, 7, 32}, torch::kDouble));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{0, 7, 32}));
  EXPECT_EQ(aux.item<double>(), 0.0);
  torch::manual_seed(12);
  const auto x = torch::randn({9, 2, 32}, torch::kDouble).transpose(0, 1);
  ASSERT_FALSE(x.is_contiguous());
  EXPECT_TRUE(torch::allclose(std::get<0>(layer->forward(x)), std::get<0>(layer->forward(x.contiguous())), 1e-12, 1e-12));
}

TEST(MixSGAAttention, CloneIsDeepAndKeepsSharedKV) {
  torch::manual_seed(13);
  auto layer = make_layer({0.3, 0.1, 0.6});
  auto copy = std::dynamic_pointer_cast<MixSGAAttentionImpl>(layer->clone());
  ASSERT_TRUE(copy);
  // k_proj / v_proj are the very modules SharedGroupKV projects with, in the clone too.
  EXPECT_EQ(copy->k_proj.ptr().get(), copy->kv->k_proj.ptr().get());
  EXPECT_EQ(copy->v_proj.ptr().get(), copy->kv->v_proj.ptr().get());
  const auto x = torch::randn({1, 8, 32}, torch::kDouble);
  EXPECT_TRUE(torch::equal(std::get<0>(copy->forward(x)), std::get<0>(layer->forward(x))));
  {
    torch::NoGradGuard no_grad;
    copy->k_proj->weight.add_(1.0);
  }
  EXPECT_FALSE(torch::equal(std::get<0>(copy->forward(x)), std::get<0>(layer->forward(x))));
  EXPECT_FALSE(torch::equal(copy->k_proj->weight, layer->k_proj->weight));
}

TEST(MixSGAAttention, ParameterNamesAndPrettyPrint) {
  auto layer = make_layer({0.3, 0.1, 0.6});
  std::vector<std::string> names;
  for (const auto& p : layer->named_parameters()) names.push_back(p.key());
  EXPECT_EQ(names, (std::vector<std::string>{"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                             "router.proj.weight", "router.proj.bias"}));
  EXPECT_EQ(layer->router->proj->weight.sizes(), (std::vector<int64_t>{3, 32}));
  std::ostringstream s;
  s << *layer;
  EXPECT_NE(s.str().find("group_sizes=(1, 2, 4)"), std::string::npos) << s.str();
  EXPECT_NE(s.str().find("kv_fraction=0.5"), std::string::npos) << s.str();
}

TEST(MixSGAAttention, SaveLoadRoundTrip) {
  torch::manual_seed(14);
  MixSGAAttention layer(MixSGAAttentionOptions(32, 8, 4).bias(true));
  const auto path = (std::filesystem::temp_directory_path() / "mixsga_attention_roundtrip.pt").string();
  torch::save(layer, path);
  torch::manual_seed(99);
  MixSGAAttention loaded(MixSGAAttentionOptions(32, 8, 4).bias(true));
  torch::load(loaded, path);
  std::filesystem::remove(path);
  const auto a = layer->named_parameters(), b = loaded->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (const auto& p : a) EXPECT_TRUE(torch::equal(p.value(), b[p.key()])) << p.key();
  const auto x = torch::randn({2, 8, 32});
  EXPECT_TRUE(torch::equal(std::get<0>(layer->forward(x)), std::get<0>(loaded->forward(x))));
}
