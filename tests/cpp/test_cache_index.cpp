// HeteroKVCache's compact index and compact append: positions owned by the caller and rebuilt from one
// start per sequence plus packed expert ids, append_compact equal to append of the expanded K/V, the
// index bytes in the accounting, and a layer's decode / chunk path that never expands K/V.
#include <gtest/gtest.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include "bad_input_helpers.h"

using bad_input::expect_error;
using mixsga::HeteroKVCache;
using mixsga::HeteroKVCacheOptions;
using mixsga::detail::ExpertStream;

namespace {

HeteroKVCacheOptions options(int64_t layers = 1, std::vector<int64_t> groups = {1, 2, 4}) {
  HeteroKVCacheOptions o;
  o.num_layers = layers;
  o.num_kv_heads = 4;
  o.head_dim = 8;
  o.group_sizes = std::move(groups);
  o.dtype = torch::kDouble;
  return o;
}

// K/V whose groups of heads are equal (as grouped_kv_proj gives them): [B, L, 4, 8], expert per token.
torch::Tensor pooled_like(const torch::Tensor& idx, const std::vector<int64_t>& groups) {
  const int64_t B = idx.size(0), L = idx.size(1);
  auto kv = torch::randn({B, L, 4, 8}, torch::kDouble);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < L; ++t) {
      const int64_t g = groups[idx[b][t].item<int64_t>()];
      kv[b][t] = kv[b][t].view({4 / g, g, 8}).mean(1, true).expand({4 / g, g, 8}).reshape({4, 8});
    }
  return kv;
}

// The compact rows append_compact takes: expert e's valid tokens, batch-major, first head of each group.
std::vector<torch::Tensor> compact_of(const torch::Tensor& kv, const torch::Tensor& idx, const torch::Tensor& valid,
                                      const std::vector<int64_t>& groups) {
  std::vector<torch::Tensor> out;
  for (size_t e = 0; e < groups.size(); ++e) {
    const int64_t g = groups[e];
    const auto mine = idx.eq(static_cast<int64_t>(e)) & valid;
    out.push_back(kv.index({mine}).view({-1, 4 / g, g, 8}).select(2, 0).contiguous());
  }
  return out;
}

}  // namespace

TEST(ExpertStream, PacksIdsInCeilLog2BitsAndTruncates) {
  EXPECT_EQ(mixsga::detail::expert_id_bits(1), 0);
  EXPECT_EQ(mixsga::detail::expert_id_bits(2), 1);
  EXPECT_EQ(mixsga::detail::expert_id_bits(3), 2);
  EXPECT_EQ(mixsga::detail::expert_id_bits(5), 3);
  for (const int64_t E : {1, 3, 5, 300}) {
    ExpertStream s(mixsga::detail::expert_id_bits(E));
    std::vector<int64_t> ids;
    for (int64_t i = 0; i < 101; ++i) ids.push_back((i * 7 + i / 3) % E);
    for (const auto id : ids) s.push(id);
    ASSERT_EQ(s.size(), 101);
    EXPECT_EQ(s.bytes_stored(), (101 * mixsga::detail::expert_id_bits(E) + 7) / 8);
    for (int64_t i = 0; i < 101; ++i) ASSERT_EQ(s.get(i), ids[i]) << "E " << E << " i " << i;
    s.truncate(37);  // then push again: the bits past the end must have been cleared
    for (int64_t i = 37; i < 101; ++i) s.push(E - 1 - ids[i]);
    for (int64_t i = 0; i < 101; ++i) ASSERT_EQ(s.get(i), i < 37 ? ids[i] : E - 1 - ids[i]) << "E " << E;
  }
}

TEST(CacheIndex, AppendCompactStoresExactlyWhatAppendOfTheExpandedKVStores) {
  torch::manual_seed(0);
  const std::vector<int64_t> groups{1, 2, 4};
  const auto idx = torch::tensor({0, 2, 1, 2, 0, 2, 1, 1, 0, 2}, torch::kLong).view({2, 5});
  const auto valid = torch::tensor({1, 1, 1, 1, 1, 0, 0, 1, 1, 1}, torch::kBool).view({2, 5});
  const auto k = pooled_like(idx, groups), v = pooled_like(idx, groups);
  for (const bool portable : {false, true}) {
    auto o = options();
    o.portable_append = portable;
    HeteroKVCache expanded(o), compact(o);
    expanded.append(0, k, v, idx, valid);
    compact.append_compact(0, compact_of(k, idx, valid, groups), compact_of(v, idx, valid, groups), idx, valid);
    EXPECT_TRUE(torch::equal(expanded.lengths(0), compact.lengths(0)));
    for (int64_t e = 0; e < 3; ++e) {
      EXPECT_TRUE(torch::equal(expanded.keys(0)[e], compact.keys(0)[e])) << "expert " << e << " portable " << portable;
      EXPECT_TRUE(torch::equal(expanded.values(0)[e], compact.values(0)[e]));
      EXPECT_TRUE(torch::equal(expanded.positions(0)[e], compact.positions(0)[e]));
    }
    // Sequence 1 starts at its first valid token: positions 0, 1, 2 for tokens 2, 3, 4.
    EXPECT_EQ(compact.positions(0)[1][1][0].item<int64_t>(), 0);  // token 2 of sequence 1 (expert 1)
    EXPECT_TRUE(torch::equal(compact.next_positions(0), torch::tensor({5, 3}, torch::kLong)));
  }
}

TEST(CacheIndex, StoresTheCallersPositionsAndRefusesPositionsThatDoNotContinue) {
  torch::manual_seed(1);
  const std::vector<int64_t> groups{1, 2, 4};
  HeteroKVCache cache(options());
  auto idx = torch::tensor({{2, 0, 1, 2}}, torch::kLong);
  auto kv = pooled_like(idx, groups);
  cache.append(0, kv, kv, idx, std::nullopt, std::nullopt, torch::tensor({100, 101, 102, 103}));
  EXPECT_TRUE(torch::equal(cache.next_positions(0), torch::tensor({104}, torch::kLong)));
  EXPECT_EQ(cache.positions(0)[2][0][1].item<int64_t>(), 103);
  const auto before = cache.positions(0);
  auto step = torch::tensor({{1}}, torch::kLong);
  auto one = pooled_like(step, groups);
  expect_error<c10::ValueError>(
      [&] { cache.append(0, one, one, step, std::nullopt, std::nullopt, torch::tensor({{106}})); },
      {"positions: sequence 0's tokens must continue its stored positions one by one (the cache keeps one start "
       "position per sequence), expected 104 at [0, 0], got 106"});
  EXPECT_THROW(cache.append(0, one, one, step, std::nullopt, std::nullopt, torch::tensor({{1.5}})), c10::TypeError);
  EXPECT_THROW(cache.append(0, one, one, step, std::nullopt, std::nullopt, torch::tensor({{104, 105}})), c10::ValueError);
  ASSERT_EQ(cache.seq_lengths(0).item<int64_t>(), 4);  // unchanged
  for (int64_t e = 0; e < 3; ++e) EXPECT_TRUE(torch::equal(cache.positions(0)[e], before[e]));
  cache.append(0, one, one, step);  // the default continues
  EXPECT_EQ(cache.positions(0)[1][0][1].item<int64_t>(), 104);
  // crop keeps the tokens at positions < 102 (two of them: experts 2 and 0).
  cache.crop(102);
  EXPECT_TRUE(torch::equal(cache.lengths(0), torch::tensor({{1, 0, 1}}, torch::kLong)));
  EXPECT_TRUE(torch::equal(cache.next_positions(0), torch::tensor({102}, torch::kLong)));
  cache.crop(50);  // before the start: empty, and the next append may start anywhere
  EXPECT_EQ(cache.seq_lengths(0).item<int64_t>(), 0);
  cache.append(0, one, one, step, std::nullopt, std::nullopt, torch::tensor({{7}}));
  EXPECT_EQ(cache.positions(0)[1][0][0].item<int64_t>(), 7);
  EXPECT_THROW(cache.append(0, one, one, step, std::nullopt, std::nullopt, torch::tensor({{-1}})), c10::ValueError);
}

TEST(CacheIndex, ReorderCarriesEachSequencesIndex) {
  torch::manual_seed(2);
  const std::vector<int64_t> groups{1, 2, 4};
  HeteroKVCache cache(options(2));
  const auto idx = torch::tensor({{0, 1, 2}, {2, 2, 0}}, torch::kLong);
  const auto kv = pooled_like(idx, groups);
  for (int64_t l = 0; l < 2; ++l) cache.append(l, kv, kv, idx, std::nullopt, std::nullopt, torch::tensor({{5, 6, 7}, {0, 1, 2}}));
  cache.reorder(torch::tensor({1, 1, 0}));
  EXPECT_TRUE(torch::equal(cache.next_positions(1), torch::tensor({3, 3, 8}, torch::kLong)));
  EXPECT_EQ(cache.positions(1)[0][2][0].item<int64_t>(), 5);  // old sequence 0's expert-0 token
  EXPECT_EQ(cache.positions(1)[2][0][1].item<int64_t>(), 1);  // old sequence 1's second expert-2 token
}

TEST(CacheIndex, AppendCompactRejectsRowsThatDoNotMatchTheRoutingAndLeavesTheCacheUnchanged) {
  HeteroKVCache cache(options());
  const auto idx = torch::tensor({{0, 2, 2}}, torch::kLong);
  auto rows = [](int64_t n0, int64_t n1, int64_t n2) {
    return std::vector<torch::Tensor>{torch::zeros({n0, 4, 8}, torch::kDouble), torch::zeros({n1, 2, 8}, torch::kDouble),
                                      torch::zeros({n2, 1, 8}, torch::kDouble)};
  };
  expect_error<c10::ValueError>([&] { cache.append_compact(0, rows(1, 0, 1), rows(1, 0, 2), idx); },
                                {"keys[2]: expected shape [2, 1, 8], got [1, 1, 8]"});
  EXPECT_THROW(cache.append_compact(0, {rows(1, 0, 2)[0]}, rows(1, 0, 2), idx), c10::ValueError);
  auto floats = rows(1, 0, 2);
  floats[0] = floats[0].to(torch::kFloat);
  EXPECT_THROW(cache.append_compact(0, floats, rows(1, 0, 2), idx), c10::TypeError);
  EXPECT_EQ(cache.batch_size(), 0);
  cache.append_compact(0, rows(1, 0, 2), rows(1, 0, 2), idx);
  EXPECT_TRUE(torch::equal(cache.lengths(0), torch::tensor({{1, 0, 2}}, torch::kLong)));
}

TEST(CacheIndex, IndexCostsCeilLog2BitsPerTokenAndLayerInTheAccounting) {
  // Llama-3.2-1B's attention: 16 layers, 8 KV heads of 64, fp32; 3 experts (1, 2, 4) at 3:1:6 keep 50 %
  // of the K/V, and the index adds 16 x 2 bits = 4 bytes a token (the paper's 32,772 against 32,768).
  HeteroKVCacheOptions o;
  o.num_layers = 16;
  o.num_kv_heads = 8;
  o.head_dim = 64;
  o.group_sizes = {1, 2, 4};
  HeteroKVCache cache(o);
  EXPECT_EQ(cache.index_bits_per_token(), 32);
  const auto idx = torch::tensor({0, 0, 0, 1, 2, 2, 2, 2, 2, 2}, torch::kLong).view({1, 10}).repeat({1, 4});  // 40 tokens
  const auto kv = torch::zeros({1, 40, 8, 64});
  for (int64_t l = 0; l < 16; ++l) cache.append(l, kv, kv, idx);
  EXPECT_EQ(cache.full_bytes_per_token(), 65536);
  EXPECT_DOUBLE_EQ(cache.stored_bytes_per_token(), 32768.0 + 4.0);
  // One expert needs no index at all; two need one bit.
  EXPECT_EQ(HeteroKVCache(options(3, {2})).index_bits_per_token(), 0);
  EXPECT_EQ(HeteroKVCache(options(3, {1, 4})).index_bits_per_token(), 3);
}

TEST(CacheIndex, LayerDecodeAndChunkStoreTheSameAsTheExpandedPath) {
  // The layer projects decode steps and chunks at the compact size; the pools must hold what appending
  // the expanded K/V of the same tokens (the prefill path) stores, and the outputs must be unchanged.
  torch::manual_seed(3);
  using namespace mixsga::nn;
  MixSGAAttention layer(MixSGAAttentionOptions(32, 8, 4).ratios({0.3, 0.1, 0.6}).key_scale("group"));
  layer->to(torch::kDouble);
  layer->eval();
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 9, 32}, torch::kDouble);
  HeteroKVCache cache(layer->cache_options(1));
  auto first = layer->forward_with_routing(x.narrow(1, 0, 4), std::nullopt, std::nullopt, &cache, 0);
  auto chunk = layer->forward_with_routing(x.narrow(1, 4, 3), std::nullopt, std::nullopt, &cache, 0);
  auto step = layer->forward_with_routing(x.narrow(1, 7, 1), std::nullopt, std::nullopt, &cache, 0);
  auto last = layer->forward_with_routing(x.narrow(1, 8, 1), std::nullopt, std::nullopt, &cache, 0);
  const auto idx = torch::cat({first.expert_idx, chunk.expert_idx, step.expert_idx, last.expert_idx}, 1);
  // Reference: the whole sequence through forward_routed's expanded K/V, appended in one go.
  const auto [k_full, v_full] = layer->kv->forward(x, idx);
  const auto k = mixsga::nn::apply_rope(k_full * layer->key_scales().index({idx}).view({2, 9, 1, 1}),
                                        torch::arange(9), layer->options.rope_theta());
  HeteroKVCache reference(layer->cache_options(1));
  reference.append(0, k, v_full.contiguous(), idx);
  for (int64_t e = 0; e < 3; ++e) {
    EXPECT_TRUE(torch::allclose(cache.keys(0)[e], reference.keys(0)[e], 1e-12, 1e-12)) << "expert " << e;
    EXPECT_TRUE(torch::allclose(cache.values(0)[e], reference.values(0)[e], 1e-12, 1e-12)) << "expert " << e;
    EXPECT_TRUE(torch::equal(cache.positions(0)[e], reference.positions(0)[e]));
  }
  const auto out = torch::cat({first.output, chunk.output, step.output, last.output}, 1);
  EXPECT_TRUE(torch::allclose(out, layer->forward_routed(x, idx), 1e-10, 1e-10));
}

TEST(CacheIndex, ForwardCompactOfOneTokenIsItsExpertsGroupMeansAndNothingForPadding) {
  torch::manual_seed(4);
  mixsga::nn::SharedGroupKV kv(mixsga::nn::SharedGroupKVOptions(16, 4, 8).bias(true));
  kv->to(torch::kDouble);
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({1, 1, 16}, torch::kDouble);
  const auto idx = torch::full({1, 1}, 2, torch::kLong);
  const auto one = kv->forward_compact(x, idx);
  ASSERT_EQ(one.keys.size(), 3u);
  EXPECT_EQ(one.keys[0].size(0), 0);
  EXPECT_EQ(one.keys[1].size(0), 0);
  ASSERT_EQ(one.keys[2].size(0), 1);
  const auto [k, v] = kv->forward(x, idx);  // [1, 1, 4, 8]: the one compact head repeated 4 times
  EXPECT_TRUE(torch::allclose(one.keys[2], k.reshape({1, 4, 8}).narrow(1, 0, 1), 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(one.values[2], v.reshape({1, 4, 8}).narrow(1, 0, 1), 1e-12, 1e-12));
  const auto padded = kv->forward_compact(x, idx, torch::zeros({1, 1}, torch::kBool));
  for (int64_t e = 0; e < 3; ++e) EXPECT_EQ(padded.keys[e].size(0), 0) << "expert " << e;
}
