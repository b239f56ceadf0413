// One decode step (append the new token's K/V + attend over the whole cache) of one attention layer,
// for four caches at the same model shape (Hq = 32, Hkv = 8, d = 128):
//   mixsga  - HeteroKVCache, experts (1, 2, 4) at 3:1:6 (50 % KV budget), hetero_decode_attention
//   gqa50   - the same cache and kernel with one pool of Hkv/2 heads (static GQA at 50 %)
//   full    - the same cache and kernel with one pool of Hkv heads (the uncompressed cache)
//   sdpa50  - what users write without this library: a preallocated [B, Hkv/2, T, d] cache and
//             at::scaled_dot_product_attention(enable_gqa=true)
// Counters: bytes_per_token (K/V + index bytes stored per token, this layer) and the cache bytes
// read per second.
//
// And the new token's K/V side of a layer's decode step (project with the expert's weights, RoPE, store),
// at D = 4096, two ways side by side:
//   kv_compact  - what the layers do: SharedGroupKV::forward_compact (pooled weights, Hkv/g_e heads),
//                 RoPE on the compact heads, HeteroKVCache::append_compact
//   kv_expanded - the earlier path: grouped_kv_proj (repeated back to Hkv heads), RoPE on Hkv heads,
//                 HeteroKVCache::append (group means)
#include <benchmark/benchmark.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include <memory>

namespace {

constexpr int64_t kHq = 32, kHkv = 8, kD = 128;

enum class Variant { kMixSGA, kGQA50, kFull };

torch::Dtype dtype_of(int64_t code) { return code == 0 ? torch::kFloat : torch::kBFloat16; }

// Expert indices with exactly the 3:1:6 counts per sequence, shuffled.
torch::Tensor expert_choice_like(int64_t B, int64_t T) {
  const int64_t n0 = (3 * T + 9) / 10, n1 = (T + 9) / 10;
  auto row = torch::cat({torch::zeros({n0}, torch::kLong), torch::ones({n1}, torch::kLong),
                         torch::full({T - n0 - n1}, 2, torch::kLong)});
  std::vector<torch::Tensor> rows;
  for (int64_t b = 0; b < B; ++b) rows.push_back(row.index_select(0, torch::randperm(T)));
  return torch::stack(rows);
}

void BM_CacheDecodeStep(benchmark::State& state, Variant variant) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const int64_t B = state.range(0), T = state.range(1);
  const auto dtype = dtype_of(state.range(2));
  mixsga::HeteroKVCacheOptions o;
  o.num_kv_heads = kHkv;
  o.head_dim = kD;
  o.dtype = dtype;
  o.group_sizes = variant == Variant::kMixSGA ? std::vector<int64_t>{1, 2, 4}
                  : variant == Variant::kGQA50 ? std::vector<int64_t>{2}
                                               : std::vector<int64_t>{1};
  mixsga::HeteroKVCache cache(o);
  const int64_t E = static_cast<int64_t>(o.group_sizes.size());
  const int64_t chunk = 1024;
  for (int64_t start = 0; start < T; start += chunk) {
    const int64_t L = std::min(chunk, T - start);
    const auto idx = E == 3 ? expert_choice_like(B, L) : torch::zeros({B, L}, torch::kLong);
    cache.append(0, torch::randn({B, L, kHkv, kD}).to(dtype), torch::randn({B, L, kHkv, kD}).to(dtype), idx);
  }
  cache.shrink_to_fit();
  const auto q = torch::randn({B, kHq, kD}).to(dtype);
  const auto k_new = torch::randn({B, 1, kHkv, kD}).to(dtype), v_new = torch::randn({B, 1, kHkv, kD}).to(dtype);
  const auto decode_idx = E == 3 ? torch::multinomial(torch::tensor({0.3, 0.1, 0.6}), B, true).view({B, 1})
                                 : torch::zeros({B, 1}, torch::kLong);
  const double bytes_per_token = static_cast<double>(cache.bytes_stored()) / (B * T);
  for (auto _ : state) {
    cache.append(0, k_new, v_new, decode_idx);
    auto out = mixsga::ops::hetero_decode_attention(q, cache.keys(0), cache.values(0), cache.lengths(0), kHkv);
    benchmark::DoNotOptimize(out.data_ptr());
    state.PauseTiming();
    cache.crop(T);
    state.ResumeTiming();
  }
  state.counters["bytes_per_token"] = bytes_per_token;
  state.counters["cache_read_bytes_per_s"] =
      benchmark::Counter(bytes_per_token * B * T, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_SdpaGQA50DecodeStep(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const int64_t B = state.range(0), T = state.range(1), H = kHkv / 2;
  const auto dtype = dtype_of(state.range(2));
  auto k = torch::randn({B, H, T + 1, kD}).to(dtype), v = torch::randn({B, H, T + 1, kD}).to(dtype);
  const auto q = torch::randn({B, kHq, 1, kD}).to(dtype);
  const auto k_new = torch::randn({B, H, 1, kD}).to(dtype), v_new = torch::randn({B, H, 1, kD}).to(dtype);
  for (auto _ : state) {
    k.narrow(2, T, 1).copy_(k_new);
    v.narrow(2, T, 1).copy_(v_new);
    auto out = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, false, std::nullopt, /*enable_gqa=*/true);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  const double bytes_per_token = 2.0 * H * kD * c10::elementSize(dtype);
  state.counters["bytes_per_token"] = bytes_per_token;
  state.counters["cache_read_bytes_per_s"] =
      benchmark::Counter(bytes_per_token * B * T, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_DecodeKV(benchmark::State& state, bool compact) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const int64_t B = state.range(0), D = kHq * kD;
  const auto dtype = dtype_of(state.range(1));
  mixsga::nn::SharedGroupKV kv(mixsga::nn::SharedGroupKVOptions(D, kHkv, kD));
  kv->to(dtype);
  mixsga::HeteroKVCacheOptions o;
  o.num_kv_heads = kHkv;
  o.head_dim = kD;
  o.dtype = dtype;
  mixsga::HeteroKVCache cache(o);
  const auto x = torch::randn({B, 1, D}).to(dtype);
  const auto idx = torch::multinomial(torch::tensor({0.3, 0.1, 0.6}), B, true).view({B, 1});
  const auto warm = torch::zeros({B, 16, kHkv, kD}, dtype);
  cache.append(0, warm, warm, torch::zeros({B, 16}, torch::kLong));  // a prompt, so the step is a decode step
  const auto positions = torch::full({B, 1}, 16, torch::kLong);
  for (auto _ : state) {
    if (compact) {
      auto c = kv->forward_compact(x, idx);
      for (size_t e = 0; e < c.keys.size(); ++e) {
        if (c.keys[e].size(0) == 0) continue;
        c.keys[e] = mixsga::nn::apply_rope(c.keys[e].unsqueeze(0), positions.view({1, -1}).index_select(1, c.rows[e]))
                        .squeeze(0);
      }
      cache.append_compact(0, c.keys, c.values, idx, std::nullopt, true, positions);
    } else {
      auto [k, v] = kv->forward(x, idx);
      cache.append(0, mixsga::nn::apply_rope(k, positions), v.contiguous(), idx, std::nullopt, true, positions);
    }
    state.PauseTiming();
    cache.crop(16);
    state.ResumeTiming();
  }
}

void KVShapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "bf16"});
  for (int64_t dtype : {0, 1})
    for (int64_t batch : {1, 8}) b->Args({batch, dtype});
  b->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(0.3);
}

// (batch, context, dtype: 0 = float32, 1 = bfloat16)
void DecodeShapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "context", "bf16"});
  for (int64_t dtype : {0, 1})
    for (int64_t batch : {1, 8})
      for (int64_t context : {512, 2048, 8192}) b->Args({batch, context, dtype});
  b->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(0.3);
}

BENCHMARK_CAPTURE(BM_CacheDecodeStep, mixsga, Variant::kMixSGA)->Apply(DecodeShapes);
BENCHMARK_CAPTURE(BM_CacheDecodeStep, gqa50, Variant::kGQA50)->Apply(DecodeShapes);
BENCHMARK_CAPTURE(BM_CacheDecodeStep, full, Variant::kFull)->Apply(DecodeShapes);
BENCHMARK(BM_SdpaGQA50DecodeStep)->Apply(DecodeShapes);
BENCHMARK_CAPTURE(BM_DecodeKV, kv_compact, true)->Apply(KVShapes);
BENCHMARK_CAPTURE(BM_DecodeKV, kv_expanded, false)->Apply(KVShapes);

// A whole layer's decode step through the public API (route, project, rotate, store, attend, o_proj):
// D 1024, Hq 16, Hkv 8, d 64, experts (1, 2, 4) at 3:1:6, after a prompt of `context` tokens.
void BM_LayerDecodeStep(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const int64_t B = state.range(0), T = state.range(1);
  const auto dtype = dtype_of(state.range(2));
  mixsga::nn::MixSGAAttention layer(mixsga::nn::MixSGAAttentionOptions(1024, 16, 8));
  layer->to(dtype);
  layer->eval();
  mixsga::HeteroKVCache cache(layer->cache_options(1));
  layer->forward(torch::randn({B, T, 1024}).to(dtype), std::nullopt, std::nullopt, &cache, 0);
  const auto x = torch::randn({B, 1, 1024}).to(dtype);
  for (auto _ : state) {
    auto [out, aux] = layer->forward(x, std::nullopt, std::nullopt, &cache, 0);
    benchmark::DoNotOptimize(out.data_ptr());
    state.PauseTiming();
    cache.crop(T);
    state.ResumeTiming();
  }
}

void LayerShapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "context", "bf16"});
  for (int64_t dtype : {0, 1})
    for (int64_t batch : {1, 8})
      for (int64_t context : {512, 2048}) b->Args({batch, context, dtype});
  b->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(0.3);
}
BENCHMARK(BM_LayerDecodeStep)->Apply(LayerShapes);

}  // namespace

BENCHMARK_MAIN();
