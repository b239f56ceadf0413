// The training-side costs of a mixSGA layer, each next to the baseline a user would compare with:
//   Layer/mixsga vs Layer/gqa50   - forward and forward+backward of MixSGAAttention (3:1:6 over (1,2,4))
//                                   vs a static GQA layer with Hkv/2 heads (same 50 % budget), both
//                                   with at::scaled_dot_product_attention
//   KVProj/grouped vs KVProj/full - the K and V projections of SharedGroupKV at 3:1:6 (one fused
//                                   grouped_kv_proj over [W_k; W_v]) vs the two full Linears of the
//                                   base layer (the target is <= 0.6x: the GEMM work is
//                                   sum rho_e / g_e = 0.5 of it)
//   Routing                        - route_expert_choice over [B, L, 3]
#include <benchmark/benchmark.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

namespace {

struct Shape {
  int64_t hidden, heads, kv_heads, seq, batch;
};
// Index into kShapes: small to mid-size Llama-style layers, from short batched sequences to one long one.
const Shape kShapes[] = {{512, 8, 4, 1024, 4},  {1024, 16, 8, 512, 1}, {1024, 16, 8, 2048, 1},
                         {2048, 32, 8, 1024, 1}, {1024, 16, 4, 256, 8}, {512, 8, 4, 4096, 1}};

torch::Dtype dtype_of(int64_t code) { return code == 0 ? torch::kFloat : torch::kBFloat16; }

// Static GQA written the plain way: q/k/v/o Linears, RoPE, SDPA with enable_gqa.
struct StaticGQA {
  StaticGQA(const Shape& s, int64_t kv_heads, torch::Dtype dtype)
      : d(s.hidden / s.heads), heads(s.heads), kv(kv_heads),
        q(torch::nn::LinearOptions(s.hidden, s.heads * d).bias(false)),
        k(torch::nn::LinearOptions(s.hidden, kv_heads * d).bias(false)),
        v(torch::nn::LinearOptions(s.hidden, kv_heads * d).bias(false)),
        o(torch::nn::LinearOptions(s.heads * d, s.hidden).bias(false)) {
    for (auto* m : {&q, &k, &v, &o}) (*m)->to(dtype);
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& pos) {
    const int64_t B = x.size(0), L = x.size(1);
    auto qh = mixsga::nn::apply_rope(q(x).view({B, L, heads, d}), pos).transpose(1, 2);
    auto kh = mixsga::nn::apply_rope(k(x).view({B, L, kv, d}), pos).transpose(1, 2);
    auto vh = v(x).view({B, L, kv, d}).transpose(1, 2);
    auto a = at::scaled_dot_product_attention(qh, kh, vh, std::nullopt, 0.0, true, std::nullopt, true);
    return o(a.transpose(1, 2).reshape({B, L, heads * d}));
  }
  int64_t d, heads, kv;
  torch::nn::Linear q, k, v, o;
};

void BM_Layer(benchmark::State& state, bool mixsga, bool backward) {
  torch::manual_seed(0);
  const auto& s = kShapes[state.range(0)];
  const auto dtype = dtype_of(state.range(1));
  const auto x = torch::randn({s.batch, s.seq, s.hidden}).to(dtype).requires_grad_(backward);
  const auto pos = torch::arange(s.seq);
  mixsga::nn::MixSGAAttention layer(mixsga::nn::MixSGAAttentionOptions(s.hidden, s.heads, s.kv_heads));
  layer->to(dtype);
  StaticGQA gqa(s, s.kv_heads / 2, dtype);
  for (auto _ : state) {
    torch::Tensor loss;
    {
      std::optional<torch::NoGradGuard> no_grad;
      if (!backward) no_grad.emplace();
      if (mixsga) {
        auto [out, aux] = layer->forward(x);
        loss = out.to(torch::kFloat).square().mean() + aux;
      } else {
        loss = gqa.forward(x, pos).to(torch::kFloat).square().mean();
      }
      if (backward) loss.backward();
    }
    benchmark::DoNotOptimize(loss.data_ptr());
  }
}

void BM_KVProj(benchmark::State& state, bool grouped) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const auto& s = kShapes[state.range(0)];
  const auto dtype = dtype_of(state.range(1));
  const int64_t d = s.hidden / s.heads;
  const auto x = torch::randn({s.batch, s.seq, s.hidden}).to(dtype);
  mixsga::nn::SharedGroupKV kv(mixsga::nn::SharedGroupKVOptions(s.hidden, s.kv_heads, d));
  kv->to(dtype);
  const auto idx = mixsga::ops::route_expert_choice(torch::rand({s.batch, s.seq, 3}), {0.3, 0.1, 0.6});
  for (auto _ : state) {
    torch::Tensor k, v;
    if (grouped) {
      std::tie(k, v) = kv->forward(x, idx);
    } else {
      k = kv->k_proj(x).view({s.batch, s.seq, s.kv_heads, d});
      v = kv->v_proj(x).view({s.batch, s.seq, s.kv_heads, d});
    }
    benchmark::DoNotOptimize(k.data_ptr());
    benchmark::DoNotOptimize(v.data_ptr());
  }
}

void BM_Routing(benchmark::State& state) {
  torch::manual_seed(0);
  const int64_t B = state.range(0), L = state.range(1);
  const auto scores = torch::rand({B, L, 3});
  for (auto _ : state) {
    auto idx = mixsga::ops::route_expert_choice(scores, {0.3, 0.1, 0.6});
    benchmark::DoNotOptimize(idx.data_ptr());
  }
  state.SetItemsProcessed(state.iterations() * B * L);
}

void LayerShapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"shape", "bf16"});
  for (int64_t dtype : {0, 1})
    for (int64_t shape = 0; shape < static_cast<int64_t>(std::size(kShapes)); ++shape) b->Args({shape, dtype});
  b->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.5);
}

BENCHMARK_CAPTURE(BM_Layer, mixsga_fwd, true, false)->Apply(LayerShapes);
BENCHMARK_CAPTURE(BM_Layer, gqa50_fwd, false, false)->Apply(LayerShapes);
BENCHMARK_CAPTURE(BM_Layer, mixsga_fwd_bwd, true, true)->Apply(LayerShapes);
BENCHMARK_CAPTURE(BM_Layer, gqa50_fwd_bwd, false, true)->Apply(LayerShapes);
BENCHMARK_CAPTURE(BM_KVProj, grouped, true)->Apply(LayerShapes);
BENCHMARK_CAPTURE(BM_KVProj, full, false)->Apply(LayerShapes);
BENCHMARK(BM_Routing)->ArgNames({"batch", "seq"})->Args({1, 4096})->Args({8, 4096})->Args({8, 512})->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
