// Double backward of grouped_kv_proj (its backward op differentiated again, as a gradient penalty
// does with create_graph): every second-order gradient against autograd through a composite reference
// built from plain torch ops, in float64.
#include <gtest/gtest.h>
#include <mixsga/mixsga.h>
#include <torch/torch.h>

#include "reference.h"

namespace ops = mixsga::ops;
using namespace mixsga::testing;

namespace {

const std::vector<int64_t> kGroups{1, 2, 4};

// grouped_kv_proj written out: every expert projects every token with its pooled weight and bias,
// repeats the compact heads over their group, and a one-hot mask keeps the token's own expert.
torch::Tensor reference_proj(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                             const torch::Tensor& idx, int64_t d) {
  const int64_t heads = w.size(0) / d;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(heads);
  out_shape.push_back(d);
  auto out = torch::zeros(out_shape, x.options());
  for (size_t e = 0; e < kGroups.size(); ++e) {
    const int64_t g = kGroups[e];
    const auto wp = reference_pool_weight(w, g, d);
    const auto bp = reference_pool_weight(b.unsqueeze(1), g, d).squeeze(1);
    std::vector<int64_t> compact_shape(out_shape.begin(), out_shape.end() - 2);
    compact_shape.push_back(heads / g);
    compact_shape.push_back(d);
    const auto y = (torch::matmul(x, wp.t()) + bp).view(compact_shape).repeat_interleave(g, -2);
    out = out + y * idx.eq(static_cast<int64_t>(e)).to(x.scalar_type()).unsqueeze(-1).unsqueeze(-1);
  }
  return out;
}

// First-order gradients of <f(x, w, b), u> with create_graph, then the gradient of
// <grads, probes> with respect to (x, w, b, u).
std::vector<torch::Tensor> second_order(
    const std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)>& f,
    const std::vector<torch::Tensor>& values, const std::vector<torch::Tensor>& probes) {
  std::vector<torch::Tensor> leaves;
  for (const auto& v : values) leaves.push_back(v.detach().clone().requires_grad_(true));
  const auto &x = leaves[0], &w = leaves[1], &b = leaves[2], &u = leaves[3];
  const auto first = torch::autograd::grad({(f(x, w, b) * u).sum()}, {x, w, b}, {}, /*retain_graph=*/true,
                                           /*create_graph=*/true);
  auto penalty = torch::zeros({}, x.options());
  for (size_t i = 0; i < first.size(); ++i) penalty = penalty + (first[i] * probes[i]).sum();
  return torch::autograd::grad({penalty}, leaves, {}, /*retain_graph=*/false, /*create_graph=*/false,
                               /*allow_unused=*/true);
}

}  // namespace

TEST(GroupedKVProjDoubleBackward, MatchesAutogradThroughTheComposite) {
  torch::manual_seed(40);
  const int64_t Hkv = 4, d = 3, D = 5;
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const auto x = torch::randn({2, 7, D}, opts), w = torch::randn({Hkv * d, D}, opts), b = torch::randn({Hkv * d}, opts);
  const auto u = torch::randn({2, 7, Hkv, d}, opts);
  const std::vector<torch::Tensor> probes{torch::randn_like(x), torch::randn_like(w), torch::randn_like(b)};
  // Mixed experts, and one expert owning every token (the kernel's no-gather path).
  for (const auto& idx : {torch::randint(0, 3, {2, 7}), torch::full({2, 7}, 1, torch::kLong)}) {
    const auto got = second_order(
        [&](const torch::Tensor& xx, const torch::Tensor& ww, const torch::Tensor& bb) {
          return ops::grouped_kv_proj(xx, ww, bb, idx, kGroups, d);
        },
        {x, w, b, u}, probes);
    const auto want = second_order(
        [&](const torch::Tensor& xx, const torch::Tensor& ww, const torch::Tensor& bb) {
          return reference_proj(xx, ww, bb, idx, d);
        },
        {x, w, b, u}, probes);
    const char* names[] = {"x", "weight", "bias", "upstream gradient"};
    for (size_t i = 0; i < 4; ++i) {
      // The bias enters linearly and alone: its second-order gradient is zero, which autograd
      // reports as undefined; every other one must be there.
      if (i != 2) ASSERT_TRUE(want[i].defined() && got[i].defined()) << names[i];
      const auto zeros = torch::zeros_like(i == 2 ? b : x);
      const auto g = got[i].defined() ? got[i] : zeros;
      const auto e = want[i].defined() ? want[i] : zeros;
      EXPECT_TRUE(torch::allclose(g, e, 1e-10, 1e-10)) << "second-order gradient of " << names[i];
    }
    // The cross terms really are there (a test that compares zeros with zeros proves nothing).
    EXPECT_GT(want[0].abs().max().item<double>(), 1e-3);
    EXPECT_GT(want[1].abs().max().item<double>(), 1e-3);
    EXPECT_GT(want[3].abs().max().item<double>(), 1e-3);
  }
}

TEST(GroupedKVProjDoubleBackward, BackwardOpTakesInputsThatRequireGrad) {
  // The backward op called directly on grad-requiring inputs: its inner out= GEMMs must not see
  // autograd (torch refuses out= with grad-requiring inputs), and its outputs carry a graph.
  torch::manual_seed(41);
  const auto x = torch::randn({6, 5}, torch::kDouble).requires_grad_(true);
  const auto w = torch::randn({8, 5}, torch::kDouble).requires_grad_(true);
  const auto grad_out = torch::randn({6, 4, 2}, torch::kDouble);
  const auto idx = torch::randint(0, 3, {6});
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mixsga::_grouped_kv_proj_backward", "")
                       .typed<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>(
                           const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                           c10::IntArrayRef, int64_t)>();
  const auto [gx, gw, gb] = op.call(grad_out, x, w, idx, kGroups, 2);
  EXPECT_TRUE(gx.requires_grad());
  EXPECT_TRUE(gw.requires_grad());
  const auto [nx, nw, nb] = op.call(grad_out, x.detach(), w.detach(), idx, kGroups, 2);
  EXPECT_TRUE(torch::equal(gx.detach(), nx));
  EXPECT_TRUE(torch::equal(gw.detach(), nw));
  EXPECT_TRUE(torch::equal(gb.detach(), nb));
  // Finite differences of the backward op itself in x and w (it is linear in each).
  const double err = max_gradient_error(
      [&](const std::vector<torch::Tensor>& in) {
        const auto [a, bw, c] = op.call(grad_out, in[0], in[1], idx, kGroups, 2);
        return torch::cat({a.flatten(), bw.flatten(), c.flatten()});
      },
      {x.detach(), w.detach()});
  EXPECT_LT(err, 1e-7);
}
