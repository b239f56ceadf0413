// HeteroKVCache and hetero_decode_attention: decode == full forward, padding / batching, reorder and
// crop, the memory identity, routing statistics, and bad input that leaves the cache usable.
#include <gtest/gtest.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include "ops/hetero_cache_attention_composite.h"

using namespace mixsga::nn;
using mixsga::HeteroKVCache;
using torch::indexing::Slice;

namespace {

MixSGAAttention make_layer(const std::string& prefill, torch::Dtype dtype = torch::kDouble) {
  MixSGAAttention layer(MixSGAAttentionOptions(32, 8, 4).ratios({0.3, 0.1, 0.6}).prefill_routing(prefill));
  layer->to(dtype);
  layer->eval();
  return layer;
}

// Runs a prompt of P tokens through the cache, then decodes the remaining tokens one at a time.
// Returns the outputs [B, L, D] and the experts [B, L] used.
std::pair<torch::Tensor, torch::Tensor> prefill_then_decode(MixSGAAttention& layer, HeteroKVCache& cache,
                                                            const torch::Tensor& x, int64_t P,
                                                            const std::optional<torch::Tensor>& mask = std::nullopt) {
  std::vector<torch::Tensor> outs, idx;
  auto r = layer->forward_with_routing(x.narrow(1, 0, P), mask, std::nullopt, &cache, 0);
  outs.push_back(r.output);
  idx.push_back(r.expert_idx);
  for (int64_t t = P; t < x.size(1); ++t) {
    auto step = layer->forward_with_routing(x.narrow(1, t, 1), std::nullopt, std::nullopt, &cache, 0);
    outs.push_back(step.output);
    idx.push_back(step.expert_idx);
  }
  return {torch::cat(outs, 1), torch::cat(idx, 1)};
}

// The message of the c10::Error that f() throws, without the backtrace; "no error" if it throws none.
template <typename F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "no error";
}

// Decode attention written out: expand every pool to Hq heads and run a plain softmax, in float64.
torch::Tensor reference_decode(const torch::Tensor& q, const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v,
                               const torch::Tensor& lengths, int64_t Hkv) {
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2);
  auto out = torch::zeros({B, Hq, d}, torch::kDouble);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<torch::Tensor> ks, vs;
    for (size_t e = 0; e < k.size(); ++e) {
      const int64_t n = lengths[b][e].item<int64_t>(), g = Hkv / k[e].size(1);
      ks.push_back(k[e][b].narrow(1, 0, n).to(torch::kDouble).repeat_interleave(g, 0).repeat_interleave(Hq / Hkv, 0));
      vs.push_back(v[e][b].narrow(1, 0, n).to(torch::kDouble).repeat_interleave(g, 0).repeat_interleave(Hq / Hkv, 0));
    }
    const auto K = torch::cat(ks, 1), V = torch::cat(vs, 1);  // [Hq, n, d]
    const auto s = torch::matmul(K, q[b].to(torch::kDouble).unsqueeze(-1)).squeeze(-1) / std::sqrt(double(d));
    out[b] = torch::matmul(torch::softmax(s, -1).unsqueeze(1), V).squeeze(1);
  }
  return out;
}

// hetero_cache_attention written out: per sequence, every pool expanded to Hq heads, one softmax over
// the slots whose stored position is <= the query's, in float64; zeros for a query that sees nothing.
torch::Tensor reference_cache_attention(const torch::Tensor& q, const torch::Tensor& qpos,
                                        const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v,
                                        const std::vector<torch::Tensor>& pos, const torch::Tensor& lengths, int64_t Hkv) {
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2), d = q.size(3);
  auto out = torch::zeros({B, L, Hq, d}, torch::kDouble);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<torch::Tensor> ks, vs, ps;
    for (size_t e = 0; e < k.size(); ++e) {
      const int64_t n = lengths[b][e].item<int64_t>(), g = Hkv / k[e].size(1);
      ks.push_back(k[e][b].narrow(1, 0, n).to(torch::kDouble).repeat_interleave(g, 0).repeat_interleave(Hq / Hkv, 0));
      vs.push_back(v[e][b].narrow(1, 0, n).to(torch::kDouble).repeat_interleave(g, 0).repeat_interleave(Hq / Hkv, 0));
      ps.push_back(pos[e][b].narrow(0, 0, n).to(torch::kLong));
    }
    const auto K = torch::cat(ks, 1), V = torch::cat(vs, 1), P = torch::cat(ps);  // [Hq, n, d], [n]
    for (int64_t t = 0; t < L; ++t) {
      const auto visible = P.le(qpos[b][t]);
      if (!visible.any().item<bool>()) continue;
      const auto s = torch::matmul(K.index({torch::indexing::Slice(), visible}), q[b][t].to(torch::kDouble).unsqueeze(-1))
                         .squeeze(-1) / std::sqrt(double(d));
      out[b][t] = torch::matmul(torch::softmax(s, -1).unsqueeze(1), V.index({torch::indexing::Slice(), visible})).squeeze(1);
    }
  }
  return out;
}

// Inputs of hetero_cache_attention: pools with spare capacity (viewed narrower, like the cache hands
// them out), stored positions shuffled over the pools, the L queries at each sequence's last positions.
struct CacheAttentionInputs {
  torch::Tensor q, qpos, lengths;
  std::vector<torch::Tensor> k, v, pos;
};

CacheAttentionInputs cache_attention_inputs(int64_t B, int64_t L, int64_t Hq, int64_t Hkv, int64_t d,
                                            const std::vector<int64_t>& groups, const std::vector<int64_t>& caps) {
  CacheAttentionInputs in;
  const int64_t E = static_cast<int64_t>(groups.size());
  in.lengths = torch::zeros({B, E}, torch::kLong);
  for (int64_t e = 0; e < E; ++e) {
    in.k.push_back(torch::randn({B, Hkv / groups[e], caps[e] + 3, d}, torch::kDouble).narrow(2, 0, caps[e]));
    in.v.push_back(torch::randn({B, Hkv / groups[e], caps[e] + 3, d}, torch::kDouble).narrow(2, 0, caps[e]));
    in.pos.push_back(torch::full({B, caps[e]}, 1000000, torch::kInt));
    in.lengths.select(1, e).copy_(torch::randint(0, caps[e] + 1, {B}));
  }
  in.qpos = torch::zeros({B, L}, torch::kLong);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = in.lengths[b].sum().item<int64_t>();
    const auto order = torch::randperm(n, torch::kInt);
    int64_t start = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t m = in.lengths[b][e].item<int64_t>();
      in.pos[e][b].narrow(0, 0, m).copy_(order.narrow(0, start, m));
      start += m;
    }
    in.qpos[b].copy_(torch::arange(n - L, n));
  }
  in.q = torch::randn({B, L, Hq, d}, torch::kDouble);
  return in;
}

}  // namespace

// ---- hetero_cache_attention -----------------------------------------------------------------------

TEST(HeteroCacheAttention, MatchesExpandedReference) {
  torch::manual_seed(20);
  for (const auto& [Hq, Hkv, L] : {std::tuple{8, 4, 5}, std::tuple{4, 4, 11}, std::tuple{16, 4, 1}}) {
    const auto in = cache_attention_inputs(3, L, Hq, Hkv, 16, {1, 2, 4}, {7, 70, 3});
    const auto got = mixsga::ops::hetero_cache_attention(in.q, in.qpos, in.k, in.v, in.pos, in.lengths, Hkv);
    ASSERT_EQ(got.sizes(), in.q.sizes());
    EXPECT_TRUE(torch::allclose(got, reference_cache_attention(in.q, in.qpos, in.k, in.v, in.pos, in.lengths, Hkv),
                                1e-12, 1e-12))
        << "Hq " << Hq << " Hkv " << Hkv << " L " << L;
  }
}

TEST(HeteroCacheAttention, OneQueryAfterEverythingEqualsDecodeAttention) {
  torch::manual_seed(21);
  const auto in = cache_attention_inputs(4, 1, 8, 4, 16, {1, 2, 4}, {9, 80, 6});
  const auto got = mixsga::ops::hetero_cache_attention(in.q, torch::full({4, 1}, 100000, torch::kLong), in.k, in.v,
                                                       in.pos, in.lengths, 4);
  const auto want = mixsga::ops::hetero_decode_attention(in.q.select(1, 0), in.k, in.v, in.lengths, 4);
  EXPECT_TRUE(torch::allclose(got.select(1, 0), want, 1e-12, 1e-12));
}

// The ATen composite registered for CUDA, run on CPU: the same results as the CPU kernel, for every
// floating dtype, including pools with nothing stored, queries that see nothing, and cropped slots.
TEST(HeteroCacheAttention, CompositeMatchesTheCpuKernel) {
  torch::manual_seed(22);
  auto in = cache_attention_inputs(3, 6, 8, 2, 8, {1, 2}, {0, 90});
  in.qpos[0][0] = -1;                                               // sees nothing: zeros
  in.v[1][1].narrow(1, in.lengths[1][1].item<int64_t>(), 90 - in.lengths[1][1].item<int64_t>()).fill_(INFINITY);
  for (auto dtype : {torch::kDouble, torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    std::vector<torch::Tensor> k, v;
    for (size_t e = 0; e < in.k.size(); ++e) {
      k.push_back(in.k[e].to(dtype));
      v.push_back(in.v[e].to(dtype));
    }
    const auto q = in.q.to(dtype);
    const auto kernel = mixsga::ops::hetero_cache_attention(q, in.qpos, k, v, in.pos, in.lengths, 2);
    const auto composite =
        mixsga::detail::hetero_cache_attention_composite(q, in.qpos, k, v, in.pos, in.lengths, 2, std::nullopt);
    ASSERT_EQ(composite.scalar_type(), dtype);
    ASSERT_TRUE(composite.is_contiguous());
    const double tol = dtype == torch::kDouble ? 1e-12 : dtype == torch::kFloat ? 1e-5 : 1e-2;
    EXPECT_TRUE(torch::allclose(kernel.to(torch::kDouble), composite.to(torch::kDouble), tol, tol)) << dtype;
    EXPECT_TRUE(torch::equal(kernel[0][0], torch::zeros_like(kernel[0][0]))) << dtype;
    EXPECT_TRUE(torch::isfinite(composite).all().item<bool>()) << dtype;
  }
  const auto exact = reference_cache_attention(in.q, in.qpos, in.k, in.v, in.pos, in.lengths, 2);
  const auto composite =
      mixsga::detail::hetero_cache_attention_composite(in.q, in.qpos, in.k, in.v, in.pos, in.lengths, 2, 0.25);
  const auto kernel = mixsga::ops::hetero_cache_attention(in.q, in.qpos, in.k, in.v, in.pos, in.lengths, 2, 0.25);
  EXPECT_TRUE(torch::allclose(composite, kernel, 1e-12, 1e-12));
  EXPECT_FALSE(torch::allclose(kernel, exact, 1e-6, 1e-6));  // the scale argument is used
}

TEST(HeteroCacheAttention, BadInputNamesTheArgumentAndTheValue) {
  const auto in = cache_attention_inputs(2, 3, 8, 4, 16, {1, 2, 4}, {7, 70, 3});
  auto call = [&](const torch::Tensor& qpos, const std::vector<torch::Tensor>& pos, const torch::Tensor& lengths,
                  int64_t Hkv) {
    return message_of([&] { mixsga::ops::hetero_cache_attention(in.q, qpos, in.k, in.v, pos, lengths, Hkv); });
  };
  EXPECT_NE(call(in.qpos.to(torch::kFloat), in.pos, in.lengths, 4).find("query_positions: expected an integer dtype, got Float"),
            std::string::npos);
  EXPECT_NE(call(in.qpos.narrow(1, 0, 2), in.pos, in.lengths, 4).find("query_positions: expected shape [2, 3]"),
            std::string::npos);
  EXPECT_NE(call(in.qpos, {in.pos[0], in.pos[1].narrow(1, 0, 69), in.pos[2]}, in.lengths, 4)
                .find("key_positions[1]: expected shape [2, 70]"),
            std::string::npos);
  EXPECT_NE(call(in.qpos, in.pos, torch::tensor({{8, 0, 0}, {0, 0, 0}}), 4).find("got values in [0, 8]"),
            std::string::npos);
  EXPECT_NE(call(in.qpos, in.pos, in.lengths, 3).find("num_kv_heads: must be > 0 and divide the query heads (8), got 3"),
            std::string::npos);
  EXPECT_THROW(mixsga::ops::hetero_cache_attention(in.q, torch::Tensor(), in.k, in.v, in.pos, in.lengths, 4),
               c10::ValueError);
}

// ---- hetero_decode_attention ---------------------------------------------------------------------

TEST(HeteroDecodeAttention, MatchesExpandedReference) {
  torch::manual_seed(0);
  const int64_t B = 3, Hq = 8, Hkv = 4, d = 16;
  std::vector<torch::Tensor> k, v;
  const std::vector<int64_t> groups{1, 2, 4}, caps{40, 7, 90};
  for (int e = 0; e < 3; ++e) {
    // Pools with spare capacity, viewed narrower, like the cache hands them out.
    k.push_back(torch::randn({B, Hkv / groups[e], caps[e] + 5, d}, torch::kDouble).narrow(2, 0, caps[e]));
    v.push_back(torch::randn({B, Hkv / groups[e], caps[e] + 5, d}, torch::kDouble).narrow(2, 0, caps[e]));
  }
  const auto lengths = torch::tensor({{40, 7, 90}, {0, 3, 17}, {12, 0, 0}});
  const auto q = torch::randn({B, Hq, d}, torch::kDouble);
  const auto got = mixsga::ops::hetero_decode_attention(q, k, v, lengths, Hkv);
  EXPECT_TRUE(torch::allclose(got, reference_decode(q, k, v, lengths, Hkv), 1e-6, 1e-6));
  // float32 and bfloat16 inputs, float32 accumulation: error within 2x of plain PyTorch in that dtype.
  const auto exact = reference_decode(q, k, v, lengths, Hkv);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    std::vector<torch::Tensor> kl, vl;
    for (int e = 0; e < 3; ++e) {
      kl.push_back(k[e].to(dtype));
      vl.push_back(v[e].to(dtype));
    }
    const auto ours = mixsga::ops::hetero_decode_attention(q.to(dtype), kl, vl, lengths, Hkv);
    EXPECT_EQ(ours.scalar_type(), dtype);
    // PyTorch in the low dtype: expand, softmax, matmul, all in `dtype`.
    std::vector<torch::Tensor> rows;
    for (int64_t b = 0; b < B; ++b) {
      std::vector<torch::Tensor> ks, vs;
      for (int e = 0; e < 3; ++e) {
        const int64_t n = lengths[b][e].item<int64_t>(), g = groups[e];
        ks.push_back(kl[e][b].narrow(1, 0, n).repeat_interleave(g * 2, 0));
        vs.push_back(vl[e][b].narrow(1, 0, n).repeat_interleave(g * 2, 0));
      }
      const auto s = torch::matmul(torch::cat(ks, 1), q[b].to(dtype).unsqueeze(-1)).squeeze(-1) / 4.0;
      rows.push_back(torch::matmul(torch::softmax(s, -1).unsqueeze(1), torch::cat(vs, 1)).squeeze(1));
    }
    const auto torch_low = torch::stack(rows);
    const double err_ours = (ours.to(torch::kDouble) - exact).abs().max().item<double>();
    const double err_torch = (torch_low.to(torch::kDouble) - exact).abs().max().item<double>();
    EXPECT_LE(err_ours, 2 * err_torch + 1e-6) << dtype;
  }
}

TEST(HeteroDecodeAttention, EmptySequenceGivesZerosAndBadShapesThrow) {
  const auto q = torch::randn({1, 4, 8});
  std::vector<torch::Tensor> k{torch::randn({1, 2, 3, 8})}, v{torch::randn({1, 2, 3, 8})};
  EXPECT_TRUE(torch::equal(mixsga::ops::hetero_decode_attention(q, k, v, torch::zeros({1, 1}, torch::kLong), 2),
                           torch::zeros({1, 4, 8})));
  EXPECT_THROW(mixsga::ops::hetero_decode_attention(q, k, v, torch::tensor({{4}}), 2), c10::ValueError);
  EXPECT_THROW(mixsga::ops::hetero_decode_attention(q, k, v, torch::tensor({{1}}), 3), c10::ValueError);
  EXPECT_THROW(mixsga::ops::hetero_decode_attention(q.to(torch::kDouble), k, v, torch::tensor({{1}}), 2), c10::TypeError);
}

// ---- generation path ------------------------------------------------------------------------------

TEST(HeteroKVCache, ArgmaxPrefillThenDecodeEqualsFullForward) {
  torch::manual_seed(1);
  auto layer = make_layer("argmax");
  const auto x = torch::randn({2, 20, 32}, torch::kDouble);
  const auto full = layer->forward_with_routing(x);
  HeteroKVCache cache(layer->cache_options());
  const auto [out, idx] = prefill_then_decode(layer, cache, x, 12);
  EXPECT_TRUE(torch::equal(idx, full.expert_idx));
  EXPECT_TRUE(torch::allclose(out, full.output, 1e-10, 1e-12)) << (out - full.output).abs().amax({0, 2});
  EXPECT_EQ(cache.max_seq_length(), 20);
}

TEST(HeteroKVCache, ExpertChoicePrefillThenDecodeEqualsFullForwardWithTheSameRouting) {
  torch::manual_seed(2);
  auto layer = make_layer("expert_choice");
  const auto x = torch::randn({2, 24, 32}, torch::kDouble);
  HeteroKVCache cache(layer->cache_options());
  const auto [out, idx] = prefill_then_decode(layer, cache, x, 16);
  // The prompt was routed by expert choice over the prompt (3:1:6 of 16 = 5 / 2 / 9), the rest by argmax.
  EXPECT_EQ((idx.narrow(1, 0, 16) == 0).sum().item<int64_t>(), 10);
  const auto want = layer->forward_routed(x, idx);
  EXPECT_TRUE(torch::allclose(out, want, 1e-10, 1e-12)) << (out - want).abs().max();
  // Storage is compact: a token of expert e holds 4 / g_e heads.
  const auto counts = cache.token_counts(0);
  EXPECT_EQ(counts.sum().item<int64_t>(), 48);
  const std::vector<int64_t> groups{1, 2, 4};
  for (int64_t e = 0; e < 3; ++e) EXPECT_EQ(cache.keys(0)[e].size(1), 4 / groups[e]);
}

TEST(HeteroKVCache, ChunkedContinuationEqualsFullForward) {
  torch::manual_seed(3);
  auto layer = make_layer("argmax");
  const auto x = torch::randn({1, 18, 32}, torch::kDouble);
  const auto full = std::get<0>(layer->forward(x));
  HeteroKVCache cache(layer->cache_options());
  std::vector<torch::Tensor> outs;
  for (auto [start, len] : {std::pair{0, 7}, std::pair{7, 5}, std::pair{12, 1}, std::pair{13, 5}}) {
    outs.push_back(std::get<0>(layer->forward(x.narrow(1, start, len), std::nullopt, std::nullopt, &cache, 0)));
  }
  EXPECT_TRUE(torch::allclose(torch::cat(outs, 1), full, 1e-10, 1e-12));
}

TEST(HeteroKVCache, BatchWithLeftPaddingMatchesEachSequenceAlone) {
  torch::manual_seed(4);
  for (const std::string prefill : {"expert_choice", "argmax"}) {
    auto layer = make_layer(prefill);
    // Sequence 0 has a 10-token prompt, sequence 1 a 6-token prompt left-padded to 10.
    const auto a = torch::randn({1, 15, 32}, torch::kDouble), b = torch::randn({1, 11, 32}, torch::kDouble);
    auto batch = torch::zeros({2, 15, 32}, torch::kDouble);
    batch[0].copy_(a[0]);
    batch[1].narrow(0, 4, 11).copy_(b[0]);
    auto mask = torch::ones({2, 10}, torch::kLong);
    mask[1].narrow(0, 0, 4).zero_();
    HeteroKVCache cache(layer->cache_options());
    const auto [out, idx] = prefill_then_decode(layer, cache, batch, 10, mask);
    HeteroKVCache ca(layer->cache_options()), cb(layer->cache_options());
    const auto [out_a, idx_a] = prefill_then_decode(layer, ca, a, 10);
    const auto [out_b, idx_b] = prefill_then_decode(layer, cb, b, 6);
    EXPECT_TRUE(torch::allclose(out[0], out_a[0], 1e-10, 1e-12)) << prefill;
    EXPECT_TRUE(torch::allclose(out[1].narrow(0, 4, 11), out_b[0], 1e-10, 1e-12)) << prefill;
    // Padding is never stored: 15 + 11 tokens.
    EXPECT_TRUE(torch::equal(cache.seq_lengths(), torch::tensor({15, 11})));
  }
}

TEST(HeteroKVCache, ReorderAndCrop) {
  torch::manual_seed(5);
  auto layer = make_layer("argmax");
  const auto x = torch::randn({2, 14, 32}, torch::kDouble);
  HeteroKVCache cache(layer->cache_options());
  prefill_then_decode(layer, cache, x.narrow(1, 0, 10), 8);
  // Beam search: swap the sequences and duplicate one; decoding continues as for the reordered batch.
  cache.reorder(torch::tensor({1, 0, 1}));
  const auto y = torch::stack({x[1], x[0], x[1]});
  std::vector<torch::Tensor> outs;
  for (int64_t t = 10; t < 14; ++t) outs.push_back(std::get<0>(layer->forward(y.narrow(1, t, 1), std::nullopt, std::nullopt, &cache, 0)));
  const auto full = std::get<0>(layer->forward(y));
  EXPECT_TRUE(torch::allclose(torch::cat(outs, 1), full.narrow(1, 10, 4), 1e-10, 1e-12));
  // Crop back to 10 tokens and decode the same 4 again: identical outputs.
  cache.crop(10);
  EXPECT_TRUE(torch::equal(cache.seq_lengths(), torch::tensor({10, 10, 10})));
  std::vector<torch::Tensor> again;
  for (int64_t t = 10; t < 14; ++t) again.push_back(std::get<0>(layer->forward(y.narrow(1, t, 1), std::nullopt, std::nullopt, &cache, 0)));
  EXPECT_TRUE(torch::allclose(torch::cat(again, 1), torch::cat(outs, 1), 1e-12, 1e-12));
  cache.reset();
  EXPECT_EQ(cache.bytes_used(), 0);
  EXPECT_EQ(cache.batch_size(), 0);
}

TEST(HeteroKVCache, PortableAppendPathMatchesTheCPUPath) {
  torch::manual_seed(9);
  mixsga::HeteroKVCacheOptions o;
  o.num_kv_heads = 4;
  o.head_dim = 8;
  HeteroKVCache fast(o);
  o.portable_append = true;
  HeteroKVCache portable(o);
  for (int step = 0; step < 6; ++step) {
    const int64_t L = step == 0 ? 9 : 1;
    const auto k = torch::randn({3, L, 4, 8}), v = torch::randn({3, L, 4, 8});
    const auto idx = torch::randint(0, 3, {3, L});
    const auto valid = step == 0 ? (torch::rand({3, L}) > 0.3) : torch::ones({3, L}, torch::kBool);
    fast.append(0, k, v, idx, valid);
    portable.append(0, k, v, idx, valid);
  }
  EXPECT_TRUE(torch::equal(fast.lengths(0), portable.lengths(0)));
  for (int64_t e = 0; e < 3; ++e) {
    EXPECT_TRUE(torch::allclose(fast.keys(0)[e], portable.keys(0)[e], 1e-6, 1e-6));
    EXPECT_TRUE(torch::allclose(fast.values(0)[e], portable.values(0)[e], 1e-6, 1e-6));
    EXPECT_TRUE(torch::equal(fast.positions(0)[e], portable.positions(0)[e]));
  }
  EXPECT_TRUE(torch::equal(fast.decode_ratios(), portable.decode_ratios()));
}

// ---- memory -----------------------------------------------------------------------------------------

TEST(HeteroKVCache, MemoryIdentity) {
  // Cache bytes per token == sum_e (count_e / n) * 2 * (Hkv/g_e) * d * elem_size + index bytes.
  torch::manual_seed(6);
  const int64_t Hkv = 4, d = 16, layers = 2;
  mixsga::HeteroKVCacheOptions o;
  o.num_layers = layers;
  o.num_kv_heads = Hkv;
  o.head_dim = d;
  o.dtype = torch::kBFloat16;
  HeteroKVCache cache(o);
  int64_t n = 0;
  for (int step = 0; step < 60; ++step) {
    const int64_t L = step == 0 ? 37 : 1;
    const auto idx = torch::multinomial(torch::tensor({0.3, 0.1, 0.6}), L, true).view({1, L});
    for (int64_t l = 0; l < layers; ++l) {
      cache.append(l, torch::randn({1, L, Hkv, d}).to(torch::kBFloat16), torch::randn({1, L, Hkv, d}).to(torch::kBFloat16), idx);
    }
    n += L;
  }
  double want = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const auto counts = cache.token_counts(l);
    ASSERT_EQ(counts.sum().item<int64_t>(), n);
    for (int64_t e = 0; e < 3; ++e) {
      want += counts[e].item<double>() / n * (2 * (Hkv / std::vector<int64_t>{1, 2, 4}[e]) * d * 2);
    }
    want += static_cast<double>((2 * n + 7) / 8) / n;  // the index: 2 bits of expert id per token, in whole bytes
  }
  EXPECT_NEAR(static_cast<double>(cache.bytes_stored()) / n, want, 1e-9);
  // Allocated: at most the documented growth slack above the stored bytes (factor 1.5 + 16 slots per pool).
  EXPECT_GE(cache.bytes_used(), cache.bytes_stored());
  EXPECT_LE(cache.allocated_bytes_per_token(), 1.5 * want + 16.0 * layers * 3 * (2 * Hkv * d * 2 + 1) / n + 0.5);
  // Two names for two quantities; bytes_per_token() is the stored one.
  EXPECT_DOUBLE_EQ(cache.stored_bytes_per_token(), static_cast<double>(cache.bytes_stored()) / n);
  EXPECT_DOUBLE_EQ(cache.allocated_bytes_per_token(), static_cast<double>(cache.bytes_allocated()) / n);
  EXPECT_DOUBLE_EQ(cache.bytes_per_token(), cache.stored_bytes_per_token());
  EXPECT_EQ(cache.bytes_used(), cache.bytes_allocated());
  EXPECT_GT(cache.allocated_bytes_per_token(), cache.stored_bytes_per_token());  // growth slack
  // After shrink_to_fit (batch 1), allocated == stored + the [B, E] lengths table + each sequence's index header.
  cache.shrink_to_fit();
  EXPECT_EQ(cache.bytes_used(),
            cache.bytes_stored() + layers * 3 * 8 + layers * static_cast<int64_t>(sizeof(mixsga::detail::ExpertStream)));
  // About half of an uncompressed cache at 3:1:6.
  EXPECT_NEAR(want / cache.full_bytes_per_token(), 0.5, 0.08);
}

// ---- statistics -------------------------------------------------------------------------------------

TEST(HeteroKVCache, RoutingStatistics) {
  torch::manual_seed(7);
  auto layer = make_layer("expert_choice", torch::kFloat);
  const auto x = torch::randn({4, 40, 32});
  HeteroKVCache cache(layer->cache_options());
  const auto [out, idx] = prefill_then_decode(layer, cache, x, 20);
  const auto ratios = cache.decode_ratios(0);
  EXPECT_NEAR(ratios.sum().item<double>(), 1.0, 1e-12);
  const auto decoded = idx.narrow(1, 20, 20);
  for (int64_t e = 0; e < 3; ++e) {
    EXPECT_NEAR(ratios[e].item<double>(), (decoded == e).to(torch::kDouble).mean().item<double>(), 1e-12);
  }
  const auto agreement = layer->routing_agreement(x);
  EXPECT_GE(agreement.agreement, 0.0);
  EXPECT_LE(agreement.agreement, 1.0);
  EXPECT_NEAR(agreement.expert_choice_ratios[0].item<double>(), 0.3, 1e-12);
  EXPECT_NEAR(agreement.argmax_ratios.sum().item<double>(), 1.0, 1e-12);
}

// ---- bad input ----------------------------------------------------------------------------------------

// A cache built for another dtype or fewer layers than the model says so, in torch's dtype names.
TEST(HeteroKVCache, MismatchMessagesSayWhatTheCacheWasBuiltFor) {
  auto layer = make_layer("argmax", torch::kDouble);
  auto o = layer->cache_options();
  o.dtype = torch::kFloat;
  HeteroKVCache cache(o);
  const auto x = torch::randn({1, 4, 32}, torch::kDouble);
  const auto from_layer = message_of([&] { layer->forward(x, std::nullopt, std::nullopt, &cache, 0); });
  EXPECT_NE(from_layer.find("cache: built for dtype float32, but the layer's K/V (keys) are float64"), std::string::npos)
      << from_layer;
  EXPECT_EQ(from_layer.find("Float"), std::string::npos) << from_layer;
  EXPECT_THROW(layer->forward(x, std::nullopt, std::nullopt, &cache, 0), c10::TypeError);
  EXPECT_EQ(cache.batch_size(), 0);  // nothing stored
  const auto layer_msg = message_of([&] { cache.lengths(1); });
  EXPECT_NE(layer_msg.find("layer: must be in [0, 1), got 1: the cache was built for 1 layer (num_layers = 1)"),
            std::string::npos)
      << layer_msg;
  EXPECT_THROW(cache.keys(-1), c10::IndexError);
}

TEST(HeteroKVCache, BadInputIsRejectedAndTheCacheStaysUsable) {
  torch::manual_seed(8);
  auto layer = make_layer("argmax");
  auto o = layer->cache_options();
  o.max_tokens = 12;
  HeteroKVCache cache(o);
  const auto x = torch::randn({2, 10, 32}, torch::kDouble);
  layer->forward(x, std::nullopt, std::nullopt, &cache, 0);
  const auto bytes = cache.bytes_used();
  const auto lengths = cache.lengths(0);
  auto expect_unchanged = [&] {
    EXPECT_EQ(cache.bytes_used(), bytes);
    EXPECT_TRUE(torch::equal(cache.lengths(0), lengths));
  };
  EXPECT_NE(message_of([&] { layer->forward(x.narrow(1, 0, 3), std::nullopt, std::nullopt, &cache, 0); }).find("max_tokens = 12"),
            std::string::npos);
  expect_unchanged();
  EXPECT_NE(message_of([&] { layer->forward(x.narrow(1, 0, 1), std::nullopt, std::nullopt, &cache, 3); }).find("layer"),
            std::string::npos);
  EXPECT_NE(message_of([&] { layer->forward(x.narrow(0, 0, 1).narrow(1, 0, 1), std::nullopt, std::nullopt, &cache, 0); })
                .find("batch size 1"),
            std::string::npos);
  const auto k = torch::randn({2, 1, 4, 4}, torch::kDouble);
  EXPECT_NE(message_of([&] { cache.append(0, torch::randn({2, 1, 2, 4}, torch::kDouble), k, torch::zeros({2, 1}, torch::kLong)); })
                .find("keys"),
            std::string::npos);
  EXPECT_THROW(cache.append(0, k.to(torch::kFloat), k.to(torch::kFloat), torch::zeros({2, 1}, torch::kLong)), c10::TypeError);
  EXPECT_THROW(cache.append(0, k, k, torch::full({2, 1}, 3, torch::kLong)), c10::ValueError);
  EXPECT_THROW(cache.reorder(torch::tensor({0, 2})), c10::IndexError);
  EXPECT_THROW(cache.crop(-1), c10::ValueError);
  MixSGAAttention other(MixSGAAttentionOptions(32, 8, 4).group_sizes({1, 4}).ratios({0.5, 0.5}));
  other->to(torch::kDouble);
  EXPECT_NE(message_of([&] { other->forward(x, std::nullopt, std::nullopt, &cache, 0); }).find("group_sizes"), std::string::npos);
  expect_unchanged();
  // Still usable: two more decode steps fit under max_tokens and match the full forward.
  const auto y = torch::randn({2, 12, 32}, torch::kDouble);
  y.narrow(1, 0, 10).copy_(x);
  std::vector<torch::Tensor> outs;
  for (int64_t t = 10; t < 12; ++t) outs.push_back(std::get<0>(layer->forward(y.narrow(1, t, 1), std::nullopt, std::nullopt, &cache, 0)));
  EXPECT_TRUE(torch::allclose(torch::cat(outs, 1), std::get<0>(layer->forward(y)).narrow(1, 10, 2), 1e-10, 1e-12));
}
