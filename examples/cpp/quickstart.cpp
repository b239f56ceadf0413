// A MixSGAAttention layer from C++: build, forward, backward, and a few training steps of the router.
#include <fmt/format.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

int main() {
  torch::manual_seed(0);
  // Llama-style layer: width 256, 8 query heads, 4 KV heads; experts keep 4, 2 or 1 KV heads (3:1:6).
  mixsga::nn::MixSGAAttention attn(mixsga::nn::MixSGAAttentionOptions(256, 8, 4)
                                       .group_sizes({1, 2, 4})
                                       .ratios({0.3, 0.1, 0.6}));
  fmt::print("layer: {}\nKV budget: {:.0f} % of the base layer\n", c10::str(*attn), 100 * attn->kv_fraction());

  const auto x = torch::randn({2, 64, 256});
  auto mask = torch::ones({2, 64}, torch::kLong);
  mask.index_put_({1, torch::indexing::Slice(0, 16)}, 0);  // second sequence: 16 tokens of left padding

  auto [out, aux] = attn->forward(x, mask);
  fmt::print("output {} aux_loss {:.4f}\n", c10::str(out.sizes()), aux.item<double>());

  // Only the aux loss trains the router; a few steps make argmax agree more with expert choice.
  torch::optim::Adam opt(attn->router->parameters(), torch::optim::AdamOptions(1e-2));
  for (int step = 0; step <= 50; ++step) {
    auto r = attn->forward_with_routing(x, mask);
    opt.zero_grad();
    (r.aux_loss / attn->options.aux_alpha()).backward();
    opt.step();
    if (step % 10 == 0) {
      const auto agree = (attn->router->argmax_route(attn->router->scores(x)) == r.target_idx)
                             .index({mask.ne(0)}).to(torch::kFloat).mean().item<double>();
      fmt::print("step {:2d}  aux {:.4f}  argmax agrees with expert choice on {:.1f} % of tokens\n", step,
                 r.aux_loss.item<double>() / attn->options.aux_alpha(), 100 * agree);
    }
  }
  return 0;
}
