// Bad-input catalogue: HeteroKVCache and the attention over it.
// Conventions (exact exception class, message naming the argument and the value): bad_input_helpers.h.
#include "bad_input_helpers.h"

using namespace bad_input;
namespace ops = mixsga::ops;
namespace mnn = mixsga::nn;

// =============================================================================================
// HeteroKVCache options (the calls are covered in test_cache.cpp's BadInputIsRejectedAndTheCacheStaysUsable)
// =============================================================================================

TEST(BadInput, HeteroKVCacheOptionsAreValidated) {
  const auto with = [](auto change) {
    mixsga::HeteroKVCacheOptions o;
    o.num_kv_heads = 4;
    o.head_dim = 8;
    change(o);
    return o;
  };
  expect_error<c10::ValueError>([&] { mixsga::HeteroKVCache(with([](auto& o) { o.num_layers = 0; })); },
                                {"num_layers", "got 0"});
  expect_error<c10::ValueError>([&] { mixsga::HeteroKVCache(with([](auto& o) { o.num_layers = int64_t{1} << 40; })); },
                                {"num_layers", "[1, 1048576]", "got 1099511627776"});
  expect_error<c10::ValueError>([&] { mixsga::HeteroKVCache(with([](auto& o) { o.head_dim = int64_t{1} << 62; })); },
                                {"num_kv_heads, head_dim", "head_dim = 4611686018427387904"});
  expect_error<c10::ValueError>([&] { mixsga::HeteroKVCache(with([](auto& o) { o.num_kv_heads = -4; })); },
                                {"num_kv_heads", "got -4"});
  expect_error<c10::ValueError>([&] { mixsga::HeteroKVCache(with([](auto& o) { o.group_sizes = {1, 3}; })); },
                                {"group_sizes", "group_sizes[1] = 3"});
  expect_error<c10::ValueError>([&] { mixsga::HeteroKVCache(with([](auto& o) { o.max_tokens = -1; })); },
                                {"max_tokens", "got -1"});
  expect_error<c10::ValueError>([&] { mixsga::HeteroKVCache(with([](auto& o) { o.growth = kNaN; })); },
                                {"growth", "got nan"});
  expect_error<c10::TypeError>([&] { mixsga::HeteroKVCache(with([](auto& o) { o.dtype = torch::kLong; })); },
                               {"dtype", "Long"});
}

// =============================================================================================
// HeteroKVCache: appends the cache was not built for (test_cache.cpp covers the cache staying usable)
// =============================================================================================

TEST(BadInput, HeteroKVCacheAppendNamesWhatTheCacheWasBuiltFor) {
  mixsga::HeteroKVCacheOptions o;
  o.num_kv_heads = 4;
  o.head_dim = 8;
  mixsga::HeteroKVCache cache(o);
  const auto kv = torch::randn({1, 2, 4, 8}, torch::kDouble);
  const auto idx = long_full({1, 2}, 0);
  expect_error<c10::TypeError>([&] { cache.append(0, kv, kv, idx); },
                               {"cache: built for dtype float32", "the layer's K/V (keys) are float64"});
  expect_error<c10::TypeError>([&] { cache.append(0, kv.to(torch::kFloat), kv.to(torch::kHalf), idx); },
                               {"cache: built for dtype float32", "(values) are float16"});
  expect_error<c10::IndexError>([&] { cache.append(1, kv.to(torch::kFloat), kv.to(torch::kFloat), idx); },
                                {"layer: must be in [0, 1), got 1", "the cache was built for 1 layer (num_layers = 1)"});
  expect_error<c10::IndexError>([&] { cache.keys(-1); }, {"layer", "got -1"});
  EXPECT_EQ(cache.batch_size(), 0);
}

// =============================================================================================
// ops::hetero_cache_attention (test_cache.cpp and tests/python/test_cache_attention.py hold its
// value tests)
// =============================================================================================

TEST(BadInput, HeteroCacheAttentionRejectsBadInput) {
  const auto q = torch::randn({2, 3, 8, 4});
  const auto qpos = long_full({2, 3}, 5);
  const std::vector<torch::Tensor> k{torch::randn({2, 4, 6, 4}), torch::randn({2, 2, 5, 4})};
  const std::vector<torch::Tensor> pos{torch::zeros({2, 6}, torch::kInt), torch::zeros({2, 5}, torch::kInt)};
  const auto lengths = long_full({2, 2}, 3);
  const auto call = [&](const torch::Tensor& q_, const torch::Tensor& qpos_, const std::vector<torch::Tensor>& k_,
                        const std::vector<torch::Tensor>& v_, const std::vector<torch::Tensor>& pos_,
                        const torch::Tensor& lengths_, int64_t Hkv) {
    return [=] { ops::hetero_cache_attention(q_, qpos_, k_, v_, pos_, lengths_, Hkv); };
  };
  expect_error<c10::ValueError>(call(q[0], qpos, k, k, pos, lengths, 4), {"q", "[B, L, Hq, d]", "got [3, 8, 4]"});
  expect_error<c10::TypeError>(call(q.to(torch::kLong), qpos, k, k, pos, lengths, 4), {"q", "Long"});
  expect_error<c10::ValueError>(call(q, qpos, k, k, pos, lengths, 3), {"num_kv_heads", "query heads (8)", "got 3"});
  expect_error<c10::TypeError>(call(q, qpos.to(torch::kFloat), k, k, pos, lengths, 4),
                               {"query_positions", "integer dtype", "Float"});
  expect_error<c10::ValueError>(call(q, long_full({2, 4}, 5), k, k, pos, lengths, 4),
                                {"query_positions", "[2, 3]", "got [2, 4]"});
  expect_error<c10::ValueError>(call(q, qpos, k, k, {pos[0]}, lengths, 4),
                                {"k_pools / v_pools / key_positions", "got 2, 2 and 1"});
  expect_error<c10::ValueError>(call(q, qpos, k, k, pos, long_full({2, 3}, 0), 4), {"lengths", "[2, 2]", "got [2, 3]"});
  expect_error<c10::TypeError>(call(q, qpos, k, k, pos, lengths.to(torch::kFloat), 4), {"lengths", "Float"});
  expect_error<c10::ValueError>(call(q, qpos, k, k, pos, torch::tensor({{7, 0}, {0, 0}}), 4),
                                {"lengths", "column 0", "[0, 6]", "got values in [0, 7]"});
  expect_error<c10::ValueError>(call(q, qpos, {k[0], torch::randn({2, 3, 5, 4})}, k, pos, lengths, 4),
                                {"k_pools[1]", "dividing num_kv_heads (4)", "got [2, 3, 5, 4]"});
  expect_error<c10::TypeError>(call(q, qpos, k, {k[0], k[1].to(torch::kDouble)}, pos, lengths, 4),
                               {"v_pools[1]", "dtype of q", "Double"});
  expect_error<c10::ValueError>(call(q, qpos, k, {k[0], torch::randn({2, 2, 4, 4})}, pos, lengths, 4),
                                {"v_pools[1]", "shape of k_pools[1] [2, 2, 5, 4]", "got [2, 2, 4, 4]"});
  expect_error<c10::ValueError>(call(q, qpos, {k[0], torch::randn({2, 2, 4, 5}).transpose(2, 3)}, k, pos, lengths, 4),
                                {"k_pools[1]", "contiguous", "stride 5"});
  expect_error<c10::ValueError>(call(q, qpos, k, k, {pos[0], torch::zeros({2, 4}, torch::kInt)}, lengths, 4),
                                {"key_positions[1]", "[2, 5]", "got [2, 4]"});
  expect_error<c10::TypeError>(call(q, qpos, k, k, {pos[0].to(torch::kFloat), pos[1]}, lengths, 4),
                               {"key_positions[0]", "integer dtype", "Float"});
  expect_error<c10::ValueError>([&] { ops::hetero_cache_attention(q, torch::Tensor(), k, k, pos, lengths, 4); },
                                {"query_positions", "undefined"});
}
