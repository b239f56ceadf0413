// The README's C++ snippets, compiled and run exactly as the README shows them: the find_package test
// (tests/cpp/find_package_test.sh) copies each fenced ```cpp block that README.md marks with
// <!-- snippet: cpp-layer --> or <!-- snippet: cpp-generate --> into readme_cpp_layer.inc /
// readme_cpp_generate.inc (its #include lines into readme_includes.inc), with #line directives so a
// compile error names the README's line. An unmarked snippet leaves its file empty.
//
// Each snippet runs in its own scope; this file supplies only what the README leaves to the reader's
// program (the generation snippet's layer and inputs).
#include <fmt/format.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include "readme_includes.inc"

int main() {
  torch::manual_seed(0);
  {
#include "readme_cpp_layer.inc"
  }
  {
    // The README's layer (width 256, 8 query / 4 KV heads, 3:1:6 over group sizes 1, 2, 4), a prompt
    // with its padding mask, one decode step's hidden states, and a text to compare routings on.
    mixsga::nn::MixSGAAttention attn(mixsga::nn::MixSGAAttentionOptions(256, 8, 4)
                                         .group_sizes({1, 2, 4})
                                         .ratios({0.3, 0.1, 0.6}));
    auto prompt = torch::randn({2, 16, 256});
    auto mask = torch::ones({2, 16}, torch::kLong);
    auto next_token = torch::randn({2, 1, 256});
    auto text = torch::randn({2, 64, 256});
#include "readme_cpp_generate.inc"
  }
  fmt::print("README C++ snippets ran\n");
  return 0;
}
