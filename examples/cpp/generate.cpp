// Greedy generation from a toy decoder built from MixSGAAttention layers, with the compact
// heterogeneous KV cache. Prints the cache's bytes per token next to an uncompressed cache's.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include <chrono>

namespace {

// Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)).
struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(const mixsga::nn::MixSGAAttentionOptions& options) {
    const int64_t D = options.hidden_size();
    norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
    attn = register_module("attn", mixsga::nn::MixSGAAttention(options));
    norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
    up = register_module("up", torch::nn::Linear(D, 4 * D));
    down = register_module("down", torch::nn::Linear(4 * D, D));
  }
  torch::Tensor forward(torch::Tensor x, mixsga::HeteroKVCache* cache, int64_t layer) {
    x = x + std::get<0>(attn->forward(norm1(x), std::nullopt, std::nullopt, cache, layer));
    return x + down(torch::gelu(up(norm2(x))));
  }
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  mixsga::nn::MixSGAAttention attn{nullptr};
  torch::nn::Linear up{nullptr}, down{nullptr};
};
TORCH_MODULE(Block);

}  // namespace

int main() {
  torch::manual_seed(0);
  torch::NoGradGuard no_grad;
  const int64_t vocab = 512, D = 256, layers = 4, batch = 4, prompt = 64, new_tokens = 64;
  const auto options = mixsga::nn::MixSGAAttentionOptions(D, 8, 4).group_sizes({1, 2, 4}).ratios({0.3, 0.1, 0.6});
  torch::nn::Embedding embed(vocab, D);
  torch::nn::Linear head(D, vocab);
  std::vector<Block> blocks;
  for (int64_t l = 0; l < layers; ++l) blocks.emplace_back(options);

  mixsga::HeteroKVCache cache(blocks[0]->attn->cache_options(layers));
  auto step = [&](const torch::Tensor& tokens) {
    auto x = embed(tokens);
    for (int64_t l = 0; l < layers; ++l) x = blocks[l]->forward(x, &cache, l);
    return head(x.select(1, -1)).argmax(-1, /*keepdim=*/true);  // greedy next token [B, 1]
  };

  auto tokens = torch::randint(vocab, {batch, prompt});
  auto next = step(tokens);  // prefill: expert-choice routing over the prompt
  const auto start = std::chrono::steady_clock::now();
  std::vector<torch::Tensor> generated{next};
  for (int64_t t = 1; t < new_tokens; ++t) {
    next = step(next);  // decode: argmax routing, attention over the compact pools
    generated.push_back(next);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const auto ratios = cache.decode_ratios();
  fmt::print("generated {} x {} tokens after a {}-token prompt ({} layers, {:.0f} decode tokens/s)\n", batch,
             new_tokens, prompt, layers, batch * (new_tokens - 1) / seconds);
  const auto first = torch::cat(generated, 1)[0].slice(0, 0, 16).contiguous();
  fmt::print("first sequence starts: {}\n",
             fmt::join(std::vector<int64_t>(first.data_ptr<int64_t>(), first.data_ptr<int64_t>() + first.numel()), " "));
  cache.shrink_to_fit();
  fmt::print("KV cache: {:.1f} bytes/token stored compactly, {} bytes/token uncompressed ({:.1f} %)\n",
             cache.bytes_per_token(), cache.full_bytes_per_token(),
             100.0 * cache.bytes_per_token() / cache.full_bytes_per_token());
  fmt::print("decode routing ratios (untrained router; the aux loss teaches it 3:1:6): {:.2f} / {:.2f} / {:.2f}\n",
             ratios[0].item<double>(), ratios[1].item<double>(), ratios[2].item<double>());
  return 0;
}
