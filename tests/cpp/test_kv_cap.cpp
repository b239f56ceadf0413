// The hard per-sequence KV cap (HeteroKVCacheOptions::kv_cap) and exact pool reservation (reserve):
// every prefix of every sequence stays within the cap (read back from the cache's per-sequence lengths),
// a token is demoted only when its expert does not fit and then to the nearest coarser expert that does,
// no cap means the routing and the layer's output are bitwise unchanged, reserved pools never grow and
// stay within the cap, worst_case_bytes bounds bytes_stored tightly, and bad input is a clear error that
// changes nothing.
#include <gtest/gtest.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include "bad_input_helpers.h"

#include <cmath>
#include <vector>

namespace {

namespace mnn = mixsga::nn;
using bad_input::expect_error;

mixsga::HeteroKVCacheOptions cap_options(double cap, std::vector<int64_t> groups = {1, 2, 4}, int64_t layers = 1) {
  mixsga::HeteroKVCacheOptions o;
  o.num_layers = layers;
  o.num_kv_heads = 8;
  o.head_dim = 4;
  o.group_sizes = std::move(groups);
  o.kv_cap = cap;
  return o;
}

// Share of the full K/V that sequence b of `layer` stores: sum_e lengths[b, e] / g_e over its tokens.
double stored_share(const mixsga::HeteroKVCache& cache, int64_t layer, int64_t b) {
  const auto lengths = cache.lengths(layer);
  const auto& groups = cache.options().group_sizes;
  double units = 0.0;
  int64_t tokens = 0;
  for (size_t e = 0; e < groups.size(); ++e) {
    const int64_t n = lengths[b][static_cast<int64_t>(e)].item<int64_t>();
    units += static_cast<double>(n) / static_cast<double>(groups[e]);
    tokens += n;
  }
  return tokens == 0 ? 0.0 : units / static_cast<double>(tokens);
}

// Appends routing [B, L] one token at a time through cap_routing, checking the cap after each token (every
// prefix) and that each demotion was necessary and went to the nearest coarser expert that fits.
void append_checked(mixsga::HeteroKVCache& cache, const torch::Tensor& wanted, double cap) {
  const int64_t B = wanted.size(0), L = wanted.size(1), H = cache.options().num_kv_heads, d = cache.options().head_dim;
  const auto& groups = cache.options().group_sizes;
  const int64_t E = static_cast<int64_t>(groups.size());
  for (int64_t t = 0; t < L; ++t) {
    const auto want = wanted.narrow(1, t, 1);
    const auto before = cache.batch_size() == 0 ? torch::zeros({B, E}, torch::kLong) : cache.lengths(0);
    const auto got = cache.cap_routing(0, want);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t w = want[b][0].item<int64_t>(), g = got[b][0].item<int64_t>();
      // Units in 1/lcm(groups) = 1/g_max here (nested group sizes).
      const int64_t lcm = groups.back();
      int64_t units = 0, tokens = 0;
      for (int64_t e = 0; e < E; ++e) {
        units += before[b][e].item<int64_t>() * (lcm / groups[e]);
        tokens += before[b][e].item<int64_t>();
      }
      auto fits = [&](int64_t e) {
        return static_cast<double>(units + lcm / groups[e]) <= cap * static_cast<double>(lcm * (tokens + 1)) + 1e-9;
      };
      if (fits(w)) {
        EXPECT_EQ(g, w) << "token " << t << " of sequence " << b << " fitted but was moved";
      } else {
        EXPECT_GT(g, w) << "a demotion goes to a coarser expert";
        for (int64_t e = w; e < g; ++e) EXPECT_FALSE(fits(e)) << "expert " << e << " fitted, nearer than " << g;
        EXPECT_TRUE(fits(g));
      }
    }
    cache.append(0, torch::randn({B, 1, H, d}), torch::randn({B, 1, H, d}), got);
    for (int64_t b = 0; b < B; ++b) EXPECT_LE(stored_share(cache, 0, b), cap + 1e-12) << "prefix " << t + 1;
  }
}

TEST(KVCap, EveryPrefixOfEverySequenceStaysWithinTheCap) {
  torch::manual_seed(0);
  for (const double cap : {0.25, 0.3, 0.5, 0.8}) {
    mixsga::HeteroKVCache cache(cap_options(cap));
    // Mostly the finest expert: the routing a cap must hold back.
    const auto wanted = torch::multinomial(torch::tensor({0.7, 0.2, 0.1}), 3 * 60, true).view({3, 60});
    append_checked(cache, wanted, cap);
    // Only demotions: no sequence stores more than its routing asked for. (That the cap is used, not just
    // respected, is WorstCaseBytesIsATightBound's adversarial case.)
    mixsga::HeteroKVCache uncapped(cap_options(0.0));
    uncapped.append(0, torch::randn({3, 60, 8, 4}), torch::randn({3, 60, 8, 4}), wanted);
    for (int64_t b = 0; b < 3; ++b) EXPECT_LE(stored_share(cache, 0, b), stored_share(uncapped, 0, b) + 1e-12);
  }
}

TEST(KVCap, ChunkedAppendsMatchTokenByToken) {
  // cap_routing over a whole chunk continues from what the layer stores, exactly as one token at a time.
  torch::manual_seed(1);
  const auto wanted = torch::randint(0, 3, {2, 48}, torch::kLong);
  mixsga::HeteroKVCache one(cap_options(0.4)), chunked(cap_options(0.4));
  std::vector<torch::Tensor> steps;
  for (int64_t t = 0; t < 48; ++t) {
    steps.push_back(one.cap_routing(0, wanted.narrow(1, t, 1)));
    one.append(0, torch::randn({2, 1, 8, 4}), torch::randn({2, 1, 8, 4}), steps.back());
  }
  const auto first = chunked.cap_routing(0, wanted.narrow(1, 0, 20));
  chunked.append(0, torch::randn({2, 20, 8, 4}), torch::randn({2, 20, 8, 4}), first);
  const auto second = chunked.cap_routing(0, wanted.narrow(1, 20, 28));
  EXPECT_TRUE(torch::equal(torch::cat({first, second}, 1), torch::cat(steps, 1)));
}

TEST(KVCap, PaddingIsNotCounted) {
  // A padded token is not stored, so it neither uses the cap nor is moved.
  mixsga::HeteroKVCache cache(cap_options(0.5));
  const auto wanted = torch::zeros({1, 4}, torch::kLong);
  const auto valid = torch::tensor({{0, 1, 1, 1}}, torch::kLong).to(torch::kBool);
  const auto got = cache.cap_routing(0, wanted, valid);
  // In units of a quarter token, n tokens may take 2n. The first real token wants 4: it goes to g = 2 (2 <=
  // 2); the next two likewise (2 + 4 > 4 but 2 + 2 <= 4; 4 + 2 <= 6).
  EXPECT_TRUE(torch::equal(got, torch::tensor({{0, 1, 1, 1}}, torch::kLong)));
}

TEST(KVCap, NoCapAndFullCapLeaveTheRoutingUnchanged) {
  torch::manual_seed(2);
  const auto wanted = torch::randint(0, 3, {2, 33}, torch::kLong);
  mixsga::HeteroKVCache none(cap_options(0.0)), full(cap_options(1.0));
  const auto same = none.cap_routing(0, wanted);
  EXPECT_TRUE(same.is_same(wanted)) << "no cap: the routing tensor itself";
  EXPECT_TRUE(torch::equal(full.cap_routing(0, wanted), wanted));
}

TEST(KVCap, TheLayerWithoutACapIsBitwiseUnchangedAndWithOneHoldsIt) {
  torch::manual_seed(3);
  mnn::MixSGAAttention layer(mnn::MixSGAAttentionOptions(32, 4, 4).group_sizes({1, 2, 4}).ratios({0.5, 0.3, 0.2}));
  layer->eval();
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 40, 32});
  auto run = [&](double cap) {
    auto o = layer->cache_options(1);
    o.kv_cap = cap;
    mixsga::HeteroKVCache cache(o);
    std::vector<torch::Tensor> outs, idx;
    auto r = layer->forward_with_routing(x.narrow(1, 0, 24), std::nullopt, std::nullopt, &cache, 0);
    outs.push_back(r.output), idx.push_back(r.expert_idx);
    for (int64_t t = 24; t < 40; ++t) {
      r = layer->forward_with_routing(x.narrow(1, t, 1), std::nullopt, std::nullopt, &cache, 0);
      outs.push_back(r.output), idx.push_back(r.expert_idx);
      for (int64_t b = 0; b < 2; ++b) EXPECT_LE(stored_share(cache, 0, b), (cap > 0 ? cap : 1.0) + 1e-12);
    }
    return std::tuple{torch::cat(outs, 1), torch::cat(idx, 1), cache.lengths(0)};
  };
  // Reference: the same layer with a cache built before kv_cap existed (the default options).
  mixsga::HeteroKVCache plain(layer->cache_options(1));
  std::vector<torch::Tensor> ref;
  ref.push_back(std::get<0>(layer->forward(x.narrow(1, 0, 24), std::nullopt, std::nullopt, &plain, 0)));
  for (int64_t t = 24; t < 40; ++t) {
    ref.push_back(std::get<0>(layer->forward(x.narrow(1, t, 1), std::nullopt, std::nullopt, &plain, 0)));
  }
  const auto [out0, idx0, len0] = run(0.0);
  EXPECT_TRUE(torch::equal(out0, torch::cat(ref, 1)));
  // The ratios' budget is 0.5 + 0.15 + 0.05 = 0.7; a 0.4 cap must move tokens and change the output.
  const auto [out4, idx4, len4] = run(0.4);
  EXPECT_FALSE(torch::equal(idx4, idx0));
  EXPECT_TRUE((idx4 >= idx0).all().item<bool>()) << "the cap only ever moves tokens to coarser experts";
}

TEST(KVCap, ReservedPoolsNeverGrowAndStayWithinTheCap) {
  torch::manual_seed(4);
  const int64_t B = 2, N = 50, layers = 2;
  for (const double cap : {0.5, 0.35}) {
    mixsga::HeteroKVCache cache(cap_options(cap, {1, 2, 4}, layers));
    auto ratios = mnn::ratios_for_budget({1, 2, 4}, {0.3, 0.1, 0.6}, cap);
    cache.reserve(B, N, ratios);
    EXPECT_EQ(cache.reserved_length(), N);
    const int64_t allocated = cache.bytes_allocated();
    // K/V of the reserved pools: at most cap times the full K/V of N tokens, per sequence and layer.
    int64_t pool_bytes = 0;
    for (int64_t l = 0; l < layers; ++l) {
      for (const auto& k : cache.keys(l)) EXPECT_EQ(k.size(2), 0);
    }
    const auto full = cache.full_bytes_per_token();  // all layers
    const int64_t worst = cache.worst_case_bytes(N, B);
    // Adversarial routing: every token asks for the finest expert, in both layers.
    const auto wanted = torch::zeros({B, 1}, torch::kLong);
    for (int64_t t = 0; t < N; ++t) {
      for (int64_t l = 0; l < layers; ++l) {
        const auto got = cache.cap_routing(l, wanted);
        cache.append(l, torch::randn({B, 1, 8, 4}), torch::randn({B, 1, 8, 4}), got);
        for (int64_t b = 0; b < B; ++b) EXPECT_LE(stored_share(cache, l, b), cap + 1e-12);
      }
      EXPECT_EQ(cache.bytes_allocated(), allocated) << "a reserved pool grew at token " << t;
    }
    for (int64_t l = 0; l < layers; ++l) {
      for (const auto& k : cache.keys(l)) pool_bytes += 2 * k.nbytes();
    }
    EXPECT_LE(static_cast<double>(pool_bytes), cap * static_cast<double>(full * N * B) + 1e-9);
    EXPECT_LE(cache.bytes_stored(), worst);
    // What is allocated meets the cap too: the worst case plus the fixed bookkeeping (per sequence and
    // layer, the index object and its [E] int64 lengths).
    const int64_t bookkeeping = layers * B * (static_cast<int64_t>(sizeof(mixsga::detail::ExpertStream)) + 3 * 8);
    EXPECT_LE(allocated, worst + bookkeeping);
    // One more token is past the reservation: an error that changes nothing.
    const auto lengths = cache.lengths(0);
    expect_error<c10::ValueError>([&] { cache.append(0, torch::randn({B, 1, 8, 4}), torch::randn({B, 1, 8, 4}), wanted.add(2)); },
                                  {"reserved", "50"});
    EXPECT_TRUE(torch::equal(cache.lengths(0), lengths));
    cache.reset();
    EXPECT_EQ(cache.reserved_length(), 0);
  }
}

TEST(KVCap, WorstCaseBytesIsATightBound) {
  for (const double cap : {0.25, 0.3, 0.5, 1.0}) {
    mixsga::HeteroKVCache cache(cap_options(cap, {1, 2, 4}, 2));
    const int64_t B = 3, N = 40;
    const auto wanted = torch::zeros({B, N}, torch::kLong);  // every token asks for the finest expert
    for (int64_t l = 0; l < 2; ++l) {
      cache.append(l, torch::randn({B, N, 8, 4}), torch::randn({B, N, 8, 4}), cache.cap_routing(l, wanted));
    }
    const int64_t worst = cache.worst_case_bytes(N, B);
    const int64_t one_token = cache.full_bytes_per_token() / 2;  // one full token of one layer
    EXPECT_LE(cache.bytes_stored(), worst) << "cap " << cap;
    EXPECT_GE(cache.bytes_stored(), worst - 2 * B * one_token) << "cap " << cap;
  }
  // Without a cap: the full K/V plus the 2-bit index.
  mixsga::HeteroKVCache none(cap_options(0.0));
  EXPECT_EQ(none.worst_case_bytes(10, 2), 2 * (10 * 2 * 8 * 4 * 4 + 3));
}

TEST(KVCap, BadInputIsAClearErrorThatChangesNothing) {
  expect_error<c10::ValueError>([] { mixsga::HeteroKVCache c(cap_options(0.1)); }, {"kv_cap", "[1/4, 1]", "0.1"});
  expect_error<c10::ValueError>([] { mixsga::HeteroKVCache c(cap_options(1.5)); }, {"kv_cap", "1.5"});
  expect_error<c10::ValueError>([] { mixsga::HeteroKVCache c(cap_options(std::nan(""))); }, {"kv_cap"});
  // Routing that breaks the cap is refused by append (the layers route through cap_routing first).
  mixsga::HeteroKVCache cache(cap_options(0.5));
  cache.append(0, torch::randn({1, 2, 8, 4}), torch::randn({1, 2, 8, 4}), torch::tensor({{2, 2}}, torch::kLong));
  const auto lengths = cache.lengths(0);
  expect_error<c10::ValueError>(
      [&] { cache.append(0, torch::randn({1, 3, 8, 4}), torch::randn({1, 3, 8, 4}), torch::zeros({1, 3}, torch::kLong)); },
      {"expert_idx", "kv_cap = 0.5", "cap_routing"});
  EXPECT_TRUE(torch::equal(cache.lengths(0), lengths));
  // reserve: needs a cap, an empty cache, and ratios within the cap.
  mixsga::HeteroKVCache uncapped(cap_options(0.0));
  expect_error<c10::ValueError>([&] { uncapped.reserve(1, 8, {0.3, 0.1, 0.6}); }, {"reserve", "kv_cap"});
  expect_error<c10::ValueError>([&] { cache.reserve(1, 8, {0.3, 0.1, 0.6}); }, {"reserve", "reset()"});
  mixsga::HeteroKVCache fresh(cap_options(0.4));
  expect_error<c10::ValueError>([&] { fresh.reserve(1, 8, {0.3, 0.1, 0.6}); }, {"ratios", "0.5", "kv_cap = 0.4"});
  expect_error<c10::ValueError>([&] { fresh.reserve(1, 0, {0.2, 0.1, 0.7}); }, {"max_length", "0"});
  expect_error<c10::ValueError>([&] { fresh.reserve(1, 8, {0.2, 0.1}); }, {"ratios", "one per expert"});
  EXPECT_EQ(fresh.reserved_length(), 0);
  EXPECT_EQ(fresh.batch_size(), 0);
}

}  // namespace
