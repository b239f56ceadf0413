// Bad-input catalogue: every public entry point fed each kind of bad input.
//
// Each case asserts (a) the exact c10 exception class (ValueError for bad values, shapes and devices,
// TypeError for wrong dtypes, IndexError for an out-of-range expert in expert_weights) and (b) that the
// message (what_without_backtrace) names the argument and shows the value seen. Some cases also check
// that a failed call leaves its inputs (and a module's parameters) unchanged.
//
// Devices: the ops' own device checks cannot be reached from a CPU-only test (a Meta tensor mixed with
// CPU ones is dispatched to the Meta key, which has no kernel and throws c10::NotImplementedError before
// any mixsga check runs). The modules check devices before dispatching, so Meta tensors are used there.
#include <gtest/gtest.h>
#include <mixsga/cache.h>
#include <mixsga/checkpoint.h>
#include <mixsga/nn/attention.h>
#include <mixsga/nn/rope.h>
#include <mixsga/nn/router.h>
#include <mixsga/nn/shared_group_kv.h>
#include <mixsga/ops.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <source_location>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <vector>

namespace {

namespace ops = mixsga::ops;
namespace mnn = mixsga::nn;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

// Runs f and expects it to throw exactly Exc (not a subclass, not a sibling) whose message contains
// every needle. Failures are reported at the caller's line.
template <class Exc, class F>
void expect_error(F&& f, std::initializer_list<std::string> needles,
                  std::source_location where = std::source_location::current()) {
  static_assert(std::is_base_of_v<c10::Error, Exc>, "expect_error checks c10 exception classes");
  ::testing::ScopedTrace trace(where.file_name(), static_cast<int>(where.line()), "expect_error called here");
  try {
    std::forward<F>(f)();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_TRUE(typeid(e) == typeid(Exc)) << "expected " << c10::demangle(typeid(Exc).name()) << ", got "
                                          << c10::demangle(typeid(e).name()) << ": " << msg;
    for (const auto& needle : needles) {
      EXPECT_NE(msg.find(needle), std::string::npos) << "message lacks \"" << needle << "\": " << msg;
    }
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected " << c10::demangle(typeid(Exc).name()) << ", got a non-c10 "
                  << c10::demangle(typeid(e).name()) << ": " << e.what();
    return;
  }
  ADD_FAILURE() << "expected " << c10::demangle(typeid(Exc).name()) << ", but nothing was thrown";
}

// Deep copies, to show that a failed call did not modify its inputs.
std::vector<torch::Tensor> snapshot(std::initializer_list<torch::Tensor> tensors) {
  std::vector<torch::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.detach().clone());
  return out;
}

void expect_unchanged(const std::vector<torch::Tensor>& before, std::initializer_list<torch::Tensor> after,
                      std::source_location where = std::source_location::current()) {
  ::testing::ScopedTrace trace(where.file_name(), static_cast<int>(where.line()), "expect_unchanged called here");
  ASSERT_EQ(before.size(), after.size());
  size_t i = 0;
  for (const auto& t : after) {
    // equal() is false for NaN, so compare NaN-aware.
    EXPECT_TRUE(before[i].sizes() == t.sizes() && before[i].scalar_type() == t.scalar_type() &&
                (t.is_floating_point() ? torch::allclose(before[i], t.detach(), 0, 0, /*equal_nan=*/true)
                                       : torch::equal(before[i], t.detach())))
        << "input " << i << " changed by a failed call";
    ++i;
  }
}

// Parameters of a module, deep-copied.
std::vector<torch::Tensor> params_of(const torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

void expect_params_unchanged(const std::vector<torch::Tensor>& before, const torch::nn::Module& m,
                             std::source_location where = std::source_location::current()) {
  ::testing::ScopedTrace trace(where.file_name(), static_cast<int>(where.line()), "expect_params_unchanged called here");
  const auto now = m.parameters();
  ASSERT_EQ(before.size(), now.size());
  for (size_t i = 0; i < now.size(); ++i) {
    EXPECT_TRUE(torch::equal(before[i], now[i].detach())) << "parameter " << i << " changed";
    EXPECT_FALSE(now[i].grad().defined()) << "parameter " << i << " got a gradient";
  }
}

torch::Tensor long_full(c10::IntArrayRef shape, int64_t v) { return torch::full(shape, v, torch::kLong); }

const std::vector<double> kRatios{0.3, 0.1, 0.6};
const std::vector<int64_t> kGroups{1, 2, 4};

// Per-expert count of the valid tokens of sequence b.
std::vector<int64_t> expert_counts(const torch::Tensor& idx, int64_t b, int64_t E) {
  std::vector<int64_t> c(E, 0);
  const auto row = idx[b];
  for (int64_t t = 0; t < row.size(0); ++t) {
    const int64_t e = row[t].item<int64_t>();
    if (e >= 0 && e < E) ++c[e];
  }
  return c;
}

}  // namespace

// =============================================================================================
// ops::route_expert_choice
// =============================================================================================

// Ratios: wrong sum, negative, > 1, NaN, wrong count, empty.
TEST(BadInput, RouteExpertChoiceRejectsBadRatios) {
  const auto scores = torch::rand({2, 5, 3});
  const auto before = snapshot({scores});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {0.5, 0.25, 0.5}); },
                                {"ratios", "sum to 1", "0.5, 0.25, 0.5", "1.25"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {-0.1, 0.5, 0.6}); },
                                {"ratios", "[0, 1]", "ratios[0] = -0.1"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {1.5, -0.25, -0.25}); },
                                {"ratios", "ratios[0] = 1.5"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {0.5, kNaN, 0.5}); },
                                {"ratios", "ratios[1] = nan"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {0.5, 0.5}); },
                                {"ratios", "expected 3 ratios", "got 2", "0.5, 0.5"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, {0.25, 0.25, 0.25, 0.25}); },
                                {"ratios", "expected 3 ratios", "got 4"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, std::vector<double>{}); },
                                {"ratios", "empty"});
  expect_unchanged(before, {scores});
}

// Scores: wrong rank, no expert column, integer dtype.
TEST(BadInput, RouteExpertChoiceRejectsBadScores) {
  expect_error<c10::ValueError>([] { ops::route_expert_choice(torch::rand({5, 3}), kRatios); },
                                {"scores", "[B, L, E]", "[5, 3]"});
  expect_error<c10::ValueError>([] { ops::route_expert_choice(torch::rand({1, 2, 5, 3}), kRatios); },
                                {"scores", "[1, 2, 5, 3]"});
  expect_error<c10::ValueError>([] { ops::route_expert_choice(torch::rand({2, 5, 0}), {1.0}); },
                                {"scores", "at least one expert", "[2, 5, 0]"});
  expect_error<c10::TypeError>([] { ops::route_expert_choice(torch::ones({2, 5, 3}, torch::kLong), kRatios); },
                               {"scores", "float32", "Long"});
  expect_error<c10::TypeError>([] { ops::route_expert_choice(torch::ones({2, 5, 3}, torch::kInt), kRatios); },
                               {"scores", "Int"});
  expect_error<c10::TypeError>([] { ops::route_expert_choice(torch::ones({2, 5, 3}, torch::kBool), kRatios); },
                               {"scores", "Bool"});
}

// valid_mask: wrong shape, and a sequence with no valid token.
TEST(BadInput, RouteExpertChoiceRejectsBadValidMask) {
  const auto scores = torch::rand({2, 5, 3});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, kRatios, torch::ones({2, 4})); },
                                {"valid_mask", "[2, 5]", "got [2, 4]"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, kRatios, torch::ones({5})); },
                                {"valid_mask", "got [5]"});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, kRatios, torch::ones({1, 2, 5})); },
                                {"valid_mask", "got [1, 2, 5]"});

  auto mask = torch::ones({2, 5}, torch::kBool);
  mask[1].fill_(false);  // sequence 1 is all padding
  const auto before = snapshot({scores, mask});
  expect_error<c10::ValueError>([&] { ops::route_expert_choice(scores, kRatios, mask); },
                                {"valid_mask", "sequence 1", "no valid token", "all padding"});
  expect_unchanged(before, {scores, mask});
  // A float 0/1 mask is accepted; an all-zero float row is the same error.
  expect_error<c10::ValueError>(
      [&] { ops::route_expert_choice(scores, kRatios, torch::tensor({{0.f, 0.f, 0.f, 0.f, 0.f}, {1.f, 1.f, 1.f, 1.f, 1.f}})); },
      {"valid_mask", "sequence 0"});
}

// NaN / Inf scores do not crash: NaN ranks below every number (-inf included), +inf above; ties (and
// NaN among NaN) go to the lower position; every token still gets exactly one expert and the
// per-expert counts follow the capacity rule (3, 1, 6 for ratios 0.3, 0.1, 0.6 and n = 10).
TEST(BadInput, RouteExpertChoiceToleratesNaNAndInfScores) {
  const std::vector<int64_t> want{3, 1, 6};
  for (const auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kHalf}) {
    SCOPED_TRACE(c10::toString(dtype));
    // Expert 0's column: NaN everywhere except two numbers, so its third token is the first NaN (pos 0).
    auto s = torch::rand({1, 10, 3}, torch::kDouble);
    s.index_put_({0, torch::indexing::Slice(), 0}, kNaN);
    s.index_put_({0, 7, 0}, 0.5);
    s.index_put_({0, 8, 0}, 0.25);
    const auto scores = s.to(dtype);
    const auto idx = ops::route_expert_choice(scores, kRatios);
    ASSERT_EQ(idx.sizes(), (std::vector<int64_t>{1, 10}));
    EXPECT_EQ(idx.scalar_type(), torch::kLong);
    EXPECT_EQ(expert_counts(idx, 0, 3), want);
    EXPECT_EQ(idx[0][7].item<int64_t>(), 0);
    EXPECT_EQ(idx[0][8].item<int64_t>(), 0);
    EXPECT_EQ(idx[0][0].item<int64_t>(), 0);  // lowest-position NaN fills the last slot

    // All NaN: pure position order.
    const auto all_nan = torch::full({2, 10, 3}, kNaN, dtype);
    const auto idx_nan = ops::route_expert_choice(all_nan, kRatios);
    const auto expect_nan = torch::tensor({0, 0, 0, 1, 2, 2, 2, 2, 2, 2}, torch::kLong).expand({2, 10});
    EXPECT_TRUE(torch::equal(idx_nan, expect_nan)) << idx_nan;

    // +inf wins, -inf loses to numbers but beats NaN.
    auto t = torch::rand({1, 10, 3}, torch::kDouble);
    t.index_put_({0, 9, 0}, kInf);
    t.index_put_({0, torch::indexing::Slice(0, 8), 0}, -kInf);
    t.index_put_({0, 8, 0}, kNaN);
    // expert 0 takes: 9 (+inf), then the -inf ones at positions 0 and 1 (ties -> lower position); 8 (NaN) never.
    const auto idx_inf = ops::route_expert_choice(t.to(dtype), kRatios);
    EXPECT_EQ(expert_counts(idx_inf, 0, 3), want);
    EXPECT_EQ(idx_inf[0][9].item<int64_t>(), 0);
    EXPECT_EQ(idx_inf[0][0].item<int64_t>(), 0);
    EXPECT_EQ(idx_inf[0][1].item<int64_t>(), 0);
    EXPECT_NE(idx_inf[0][8].item<int64_t>(), 0);
  }
  // NaN scores of padding tokens are ignored; valid tokens still get the capacity counts.
  auto s = torch::rand({1, 12, 3});
  s.index_put_({0, torch::indexing::Slice(10, 12)}, kNaN);
  auto mask = torch::ones({1, 12}, torch::kBool);
  mask.index_put_({0, torch::indexing::Slice(10, 12)}, false);
  const auto idx = ops::route_expert_choice(s, kRatios, mask);
  EXPECT_EQ(idx[0][10].item<int64_t>(), 2);
  EXPECT_EQ(idx[0][11].item<int64_t>(), 2);
  EXPECT_EQ(expert_counts(idx.narrow(1, 0, 10), 0, 3), want);
}

// =============================================================================================
// ops::grouped_kv_pool
// =============================================================================================

// kv: wrong rank, integer dtype.
TEST(BadInput, GroupedKVPoolRejectsBadKV) {
  const auto idx = long_full({2, 5}, 0);
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(torch::rand({8}), torch::scalar_tensor(0, torch::kLong), kGroups); },
                                {"kv", "[*, Hkv, d]", "got [8]"});
  expect_error<c10::TypeError>([&] { ops::grouped_kv_pool(torch::ones({2, 5, 4, 2}, torch::kInt), idx, kGroups); },
                               {"kv", "float32", "Int"});
}

// expert_idx: float / bool dtype, shape mismatch, values out of range (both ends).
TEST(BadInput, GroupedKVPoolRejectsBadExpertIdx) {
  const auto kv = torch::rand({2, 5, 4, 2});
  expect_error<c10::TypeError>([&] { ops::grouped_kv_pool(kv, torch::zeros({2, 5}), kGroups); },
                               {"expert_idx", "integer dtype", "Float"});
  expect_error<c10::TypeError>([&] { ops::grouped_kv_pool(kv, torch::zeros({2, 5}, torch::kBool), kGroups); },
                               {"expert_idx", "integer dtype", "Bool"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, long_full({2, 4}, 0), kGroups); },
                                {"expert_idx", "expected shape [2, 5]", "got [2, 4]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, long_full({10}, 0), kGroups); },
                                {"expert_idx", "[2, 5]", "got [10]"});
  auto too_big = long_full({2, 5}, 1);
  too_big[1][3] = 3;
  const auto before = snapshot({kv, too_big});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, too_big, kGroups); },
                                {"expert_idx", "[0, 3)", "got values in [1, 3]"});
  expect_unchanged(before, {kv, too_big});
  auto negative = torch::zeros({2, 5}, torch::kInt);
  negative[0][0] = -2;
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, negative, kGroups); },
                                {"expert_idx", "[0, 3)", "got values in [-2, 0]"});
}

// group_sizes: not increasing, zero, not dividing Hkv, empty.
TEST(BadInput, GroupedKVPoolRejectsBadGroupSizes) {
  const auto kv = torch::rand({2, 5, 4, 2});
  const auto idx = long_full({2, 5}, 0);
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, {1, 4, 2}); },
                                {"group_sizes", "strictly increasing", "[1, 4, 2]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, {2, 2}); },
                                {"group_sizes", "strictly increasing", "[2, 2]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, {0, 1, 2}); },
                                {"group_sizes", ">= 1", "group_sizes[0] = 0"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, {1, 3}); },
                                {"group_sizes", "divide", "(4)", "group_sizes[1] = 3"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, {1, 2, 8}); },
                                {"group_sizes", "group_sizes[2] = 8"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, std::vector<int64_t>{}); },
                                {"group_sizes", "empty"});
}

// The autograd path validates too, and a failed call records no graph and no gradient.
TEST(BadInput, GroupedKVPoolAutogradPathValidatesAndLeavesInputsAlone) {
  const auto kv = torch::rand({2, 5, 4, 2}).requires_grad_();
  const auto idx = long_full({2, 5}, 7);
  const auto before = snapshot({kv, idx});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(kv, idx, kGroups); }, {"expert_idx", "[7, 7]"});
  expect_unchanged(before, {kv, idx});
  EXPECT_FALSE(kv.grad().defined());
}

// =============================================================================================
// ops::grouped_kv_proj
// =============================================================================================

// x and weight: dtypes, ranks and shapes.
TEST(BadInput, GroupedKVProjRejectsBadXAndWeight) {
  const auto x = torch::rand({2, 5, 8});
  const auto w = torch::rand({8, 8});  // Hkv = 4, d = 2
  const auto idx = long_full({2, 5}, 0);
  expect_error<c10::TypeError>(
      [&] { ops::grouped_kv_proj(torch::ones({2, 5, 8}, torch::kLong), w, std::nullopt, idx, kGroups, 2); },
      {"x", "float32", "Long"});
  expect_error<c10::TypeError>(
      [&] { ops::grouped_kv_proj(x, torch::ones({8, 8}, torch::kInt), std::nullopt, idx, kGroups, 2); },
      {"weight", "float32", "Int"});
  expect_error<c10::TypeError>(
      [&] { ops::grouped_kv_proj(x, w.to(torch::kDouble), std::nullopt, idx, kGroups, 2); },
      {"weight", "dtype of x (Float)", "got Double"});
  expect_error<c10::ValueError>(
      [&] { ops::grouped_kv_proj(torch::tensor(1.f), w, std::nullopt, torch::scalar_tensor(0, torch::kLong), kGroups, 2); },
      {"x", "[*, D]", "got []"});
  // x's last dim does not match weight.size(1) (the message shows both).
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(torch::rand({2, 5, 7}), w, std::nullopt, idx, kGroups, 2); },
                                {"weight", "[Hkv * head_dim, 7]", "got [8, 8]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, torch::rand({64}), std::nullopt, idx, kGroups, 2); },
                                {"weight", "got [64]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, torch::rand({8, 8, 1}), std::nullopt, idx, kGroups, 2); },
                                {"weight", "got [8, 8, 1]"});
}

// head_dim and group_sizes against weight.size(0).
TEST(BadInput, GroupedKVProjRejectsBadHeadDimAndGroupSizes) {
  const auto x = torch::rand({2, 5, 8});
  const auto w = torch::rand({8, 8});
  const auto idx = long_full({2, 5}, 0);
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, 0); },
                                {"head_dim", "weight.size(0) (8)", "got 0"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, 3); },
                                {"head_dim", "got 3"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, -2); },
                                {"head_dim", "got -2"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, torch::rand({0, 8}), std::nullopt, idx, {1}, 2); },
                                {"head_dim", "weight.size(0) (0)"});
  // head_dim 4 -> Hkv 2, so group size 4 does not divide.
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, kGroups, 4); },
                                {"group_sizes", "(2)", "group_sizes[2] = 4"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, {2, 1}, 2); },
                                {"group_sizes", "strictly increasing", "[2, 1]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, std::nullopt, idx, {0, 1}, 2); },
                                {"group_sizes", "group_sizes[0] = 0"});
}

// bias: shape and dtype.
TEST(BadInput, GroupedKVProjRejectsBadBias) {
  const auto x = torch::rand({2, 5, 8});
  const auto w = torch::rand({8, 8});
  const auto idx = long_full({2, 5}, 1);
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, torch::rand({7}), idx, kGroups, 2); },
                                {"bias", "expected shape [8]", "got [7]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, torch::rand({1, 8}), idx, kGroups, 2); },
                                {"bias", "got [1, 8]"});
  expect_error<c10::TypeError>([&] { ops::grouped_kv_proj(x, w, torch::rand({8}, torch::kDouble), idx, kGroups, 2); },
                               {"bias", "dtype of x (Float)", "got Double"});
  expect_error<c10::TypeError>([&] { ops::grouped_kv_proj(x, w, torch::ones({8}, torch::kLong), idx, kGroups, 2); },
                               {"bias", "got Long"});
}

// expert_idx: dtype, shape, range; inputs (with requires_grad) are left alone.
TEST(BadInput, GroupedKVProjRejectsBadExpertIdx) {
  const auto x = torch::rand({2, 5, 8}).requires_grad_();
  const auto w = torch::rand({8, 8}).requires_grad_();
  const auto b = torch::rand({8}).requires_grad_();
  expect_error<c10::TypeError>([&] { ops::grouped_kv_proj(x, w, b, torch::zeros({2, 5}, torch::kDouble), kGroups, 2); },
                               {"expert_idx", "integer dtype", "Double"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, b, long_full({5, 2}, 0), kGroups, 2); },
                                {"expert_idx", "[2, 5]", "got [5, 2]"});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, b, long_full({2, 5, 1}, 0), kGroups, 2); },
                                {"expert_idx", "got [2, 5, 1]"});
  auto idx = long_full({2, 5}, 2);
  idx[0][1] = 5;
  const auto before = snapshot({x, w, b, idx});
  expect_error<c10::ValueError>([&] { ops::grouped_kv_proj(x, w, b, idx, kGroups, 2); },
                                {"expert_idx", "[0, 3)", "[2, 5]"});
  expect_unchanged(before, {x, w, b, idx});
  EXPECT_FALSE(x.grad().defined());
  EXPECT_FALSE(w.grad().defined());
  EXPECT_FALSE(b.grad().defined());
}

// =============================================================================================
// ops::expert_permutation, ops::expert_scatter, ops::expert_gather
// =============================================================================================

TEST(BadInput, ExpertPermutationRejectsBadInput) {
  expect_error<c10::ValueError>([] { ops::expert_permutation(long_full({4}, 0), 0); },
                                {"num_experts", "[1, 1048576]", "got 0"});
  expect_error<c10::ValueError>([] { ops::expert_permutation(long_full({4}, 0), -3); }, {"num_experts", "got -3"});
  expect_error<c10::TypeError>([] { ops::expert_permutation(torch::zeros({4}), 3); },
                               {"expert_idx", "integer dtype", "Float"});
  const auto idx = torch::tensor({0, 2, 3, 1}, torch::kLong);
  const auto before = snapshot({idx});
  expect_error<c10::ValueError>([&] { ops::expert_permutation(idx, 3); },
                                {"expert_idx", "[0, 3)", "got values in [0, 3]"});
  expect_unchanged(before, {idx});
  expect_error<c10::ValueError>([] { ops::expert_permutation(torch::tensor({-1, 0}, torch::kInt), 2); },
                                {"expert_idx", "[-1, 0]"});
}

// Permutation: wrong dtype, repeated values, out of range, wrong length / rank; x without a row dim.
TEST(BadInput, ExpertScatterAndGatherRejectBadPermutation) {
  const auto x = torch::rand({4, 3});
  using Fn = torch::Tensor (*)(const torch::Tensor&, const torch::Tensor&);
  for (Fn fn : {static_cast<Fn>(&ops::expert_scatter), static_cast<Fn>(&ops::expert_gather)}) {
    SCOPED_TRACE(fn == static_cast<Fn>(&ops::expert_scatter) ? "expert_scatter" : "expert_gather");
    expect_error<c10::TypeError>([&] { fn(x, torch::arange(4, torch::kInt)); }, {"permutation", "int64", "Int"});
    expect_error<c10::TypeError>([&] { fn(x, torch::arange(4, torch::kFloat)); }, {"permutation", "int64", "Float"});
    const auto repeated = torch::tensor({0, 1, 1, 3}, torch::kLong);
    const auto before = snapshot({x, repeated});
    expect_error<c10::ValueError>([&] { fn(x, repeated); }, {"permutation", "0..3", "1 appears twice"});
    expect_unchanged(before, {x, repeated});
    expect_error<c10::ValueError>([&] { fn(x, torch::tensor({0, 1, 4, 2}, torch::kLong)); },
                                  {"permutation", "[0, 4)", "permutation[2] = 4"});
    expect_error<c10::ValueError>([&] { fn(x, torch::tensor({0, -1, 2, 3}, torch::kLong)); },
                                  {"permutation", "permutation[1] = -1"});
    expect_error<c10::ValueError>([&] { fn(x, torch::arange(3, torch::kLong)); },
                                  {"permutation", "expected shape [4]", "got [3]"});
    expect_error<c10::ValueError>([&] { fn(x, torch::arange(4, torch::kLong).view({2, 2})); },
                                  {"permutation", "got [2, 2]"});
    expect_error<c10::ValueError>([&] { fn(torch::tensor(1.f), torch::arange(1, torch::kLong)); },
                                  {"x", "[N, *]", "got []"});
    // With requires_grad the autograd path validates the same way.
    const auto xg = torch::rand({4, 3}).requires_grad_();
    expect_error<c10::ValueError>([&] { fn(xg, repeated); }, {"permutation", "appears twice"});
    EXPECT_FALSE(xg.grad().defined());
  }
}

// =============================================================================================
// ops::pool_kv_weight, ops::kv_fraction
// =============================================================================================

TEST(BadInput, PoolKVWeightRejectsBadInput) {
  const auto w = torch::rand({8, 8});  // 4 heads of 2
  const auto before = snapshot({w});
  expect_error<c10::ValueError>([] { ops::pool_kv_weight(torch::tensor(1.f), 1, 1); }, {"weight", "got shape []"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 1, 0); }, {"head_dim (0)", "weight.size(0) (8)"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 1, 3); }, {"head_dim (3)", "weight.size(0) (8)"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 1, -2); }, {"head_dim (-2)"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 0, 2); }, {"group_size (0)", "KV heads (4)"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 3, 2); }, {"group_size (3)", "KV heads (4)"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(w, 8, 2); }, {"group_size (8)"});
  expect_unchanged(before, {w});
}

TEST(BadInput, KVFractionRejectsBadConfiguration) {
  expect_error<c10::ValueError>([] { ops::kv_fraction({1, 2, 4}, {0.5, 0.25, 0.5}); }, {"ratios", "sums to 1.25"});
  expect_error<c10::ValueError>([] { ops::kv_fraction({1, 2, 4}, {0.5, 0.5}); },
                                {"ratios", "expected 3 ratios", "got 2"});
  expect_error<c10::ValueError>([] { ops::kv_fraction({1, 2}, {1.2, -0.2}); }, {"ratios", "ratios[0] = 1.2"});
  expect_error<c10::ValueError>([] { ops::kv_fraction({2, 1}, {0.5, 0.5}); },
                                {"group_sizes", "strictly increasing", "[2, 1]"});
  expect_error<c10::ValueError>([] { ops::kv_fraction({0, 1}, {0.5, 0.5}); }, {"group_sizes", "group_sizes[0] = 0"});
  expect_error<c10::ValueError>([] { ops::kv_fraction({}, {}); }, {"group_sizes", "empty"});
}

// =============================================================================================
// nn::ExpertChoiceRouter
// =============================================================================================

TEST(BadInput, RouterOptionsAreValidated) {
  using Opt = mnn::ExpertChoiceRouterOptions;
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(0)); }, {"hidden_size", "> 0", "got 0"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(-4)); }, {"hidden_size", "got -4"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8, {0.4, 0.4, 0.4})); },
                                {"ratios", "sum to 1", "0.4, 0.4, 0.4"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8, {-0.5, 1.5})); }, {"ratios", "ratios[0] = -0.5"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8, {0.5, kNaN, 0.5})); }, {"ratios", "ratios[1] = nan"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8, {})); }, {"ratios", "empty"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8).aux_loss("mse")); },
                                {"aux_loss", "'sigmoid_ce', 'logit_ce', 'bce'", "got 'mse'"});
  expect_error<c10::ValueError>([] { mnn::ExpertChoiceRouter(Opt(8).aux_loss("")); }, {"aux_loss", "got ''"});
}

// forward / scores: x's last dim.
TEST(BadInput, RouterForwardRejectsBadX) {
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8));
  const auto before = params_of(*router);
  expect_error<c10::ValueError>([&] { router->forward(torch::rand({2, 5, 7})); },
                                {"x", "last dim 8 (hidden_size)", "[2, 5, 7]"});
  expect_error<c10::ValueError>([&] { router->forward(torch::tensor(1.f)); }, {"x", "got shape []"});
  expect_error<c10::ValueError>([&] { router->scores(torch::rand({3, 9})); }, {"x", "[3, 9]"});
  expect_params_unchanged(before, *router);
}

// forward: x must be floating and in the parameters' dtype.
TEST(BadInput, RouterForwardRejectsWrongDtype) {
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8));
  expect_error<c10::TypeError>([&] { router->forward(torch::rand({2, 5, 8}, torch::kDouble)); },
                               {"x", "parameters' dtype Float", "got Double"});
  expect_error<c10::TypeError>([&] { router->forward(torch::ones({2, 5, 8}, torch::kLong)); }, {"x", "Long"});
}

// route: the op's checks (scores rank / dtype, valid_mask shape / all padding).
TEST(BadInput, RouterRouteRejectsBadInput) {
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8));
  const auto scores = torch::rand({2, 5, 3});
  expect_error<c10::ValueError>([&] { router->route(torch::rand({5, 3})); }, {"scores", "[5, 3]"});
  expect_error<c10::TypeError>([&] { router->route(torch::ones({2, 5, 3}, torch::kLong)); }, {"scores", "Long"});
  expect_error<c10::ValueError>([&] { router->route(scores, torch::ones({2, 6})); }, {"valid_mask", "got [2, 6]"});
  expect_error<c10::ValueError>([&] { router->route(scores, torch::zeros({2, 5})); }, {"valid_mask", "sequence 0"});
  expect_error<c10::ValueError>([&] { router->route(torch::rand({2, 5, 4})); },
                                {"scores", "last dim 3 (experts)", "[2, 5, 4]"});
}

// argmax_route: last dim must be the number of experts; NaN ranks lowest, as in route().
TEST(BadInput, RouterArgmaxRouteRejectsBadScores) {
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8));
  expect_error<c10::ValueError>([&] { router->argmax_route(torch::rand({2, 5, 4})); },
                                {"scores", "last dim 3 (experts)", "[2, 5, 4]"});
  expect_error<c10::ValueError>([&] { router->argmax_route(torch::tensor(0.5f)); }, {"scores", "got shape []"});
  expect_error<c10::TypeError>([&] { router->argmax_route(long_full({2, 3}, 1)); }, {"scores", "Long"});
  // NaN / Inf: no crash, indices stay in range, NaN never wins (torch.argmax alone would pick it).
  const auto s = torch::tensor({{0.1f, std::nanf(""), 0.9f}, {0.2f, 0.3f, static_cast<float>(kInf)}});
  const auto idx = router->argmax_route(s);
  EXPECT_TRUE(((idx >= 0) & (idx < 3)).all().item<bool>());
  EXPECT_EQ(idx[0].item<int64_t>(), 2);
  EXPECT_EQ(idx[1].item<int64_t>(), 2);
}

// aux_loss: logits last dim, target shape, valid_mask shape.
TEST(BadInput, RouterAuxLossRejectsBadShapes) {
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8));
  const auto logits = torch::randn({2, 5, 3});
  const auto target = long_full({2, 5}, 1);
  expect_error<c10::ValueError>([&] { router->aux_loss(torch::randn({2, 5, 2}), target); },
                                {"logits", "last dim 3 (experts)", "[2, 5, 2]"});
  expect_error<c10::ValueError>([&] { router->aux_loss(logits, long_full({2, 4}, 1)); },
                                {"target", "expected shape [2, 5]", "got [2, 4]"});
  expect_error<c10::ValueError>([&] { router->aux_loss(logits, long_full({10}, 1)); }, {"target", "got [10]"});
  expect_error<c10::ValueError>([&] { router->aux_loss(logits, target, torch::ones({2, 4})); },
                                {"valid_mask", "expected shape [2, 5]", "got [2, 4]"});
}

// aux_loss: target values must be expert indices of an integer dtype, for every loss kind.
TEST(BadInput, RouterAuxLossRejectsBadTargets) {
  const auto logits = torch::randn({2, 5, 3});
  for (const std::string kind : {"sigmoid_ce", "logit_ce", "bce"}) {
    SCOPED_TRACE(kind);
    mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(8).aux_loss(kind));
    expect_error<c10::ValueError>([&] { router->aux_loss(logits, long_full({2, 5}, 5)); },
                                  {"target", "[0, 3)", "[5, 5]"});
    expect_error<c10::ValueError>([&] { router->aux_loss(logits, long_full({2, 5}, -1)); }, {"target", "[-1, -1]"});
    expect_error<c10::TypeError>([&] { router->aux_loss(logits, torch::full({2, 5}, 1.7)); }, {"target", "Float"});
    expect_error<c10::TypeError>([&] { router->aux_loss(long_full({2, 5, 3}, 1), long_full({2, 5}, 1)); },
                                 {"logits", "Long"});
  }
}

// =============================================================================================
// nn::SharedGroupKV
// =============================================================================================

TEST(BadInput, SharedGroupKVOptionsAreValidated) {
  using Opt = mnn::SharedGroupKVOptions;
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(0, 4, 2)); }, {"hidden_size", "got 0"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 0, 2)); }, {"num_kv_heads", "got 0"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 4, -2)); }, {"head_dim", "got -2"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 4, 2).group_sizes({1, 4, 2})); },
                                {"group_sizes", "strictly increasing", "[1, 4, 2]"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 4, 2).group_sizes({0, 2})); },
                                {"group_sizes", "group_sizes[0] = 0"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 6, 2)); },
                                {"group_sizes", "KV heads (6)", "group_sizes[2] = 4"});
  expect_error<c10::ValueError>([] { mnn::SharedGroupKV(Opt(8, 4, 2).group_sizes({})); }, {"group_sizes", "empty"});
}

// forward: x and expert_idx go through grouped_kv_proj's checks; parameters stay untouched.
TEST(BadInput, SharedGroupKVForwardRejectsBadInput) {
  mnn::SharedGroupKV kv(mnn::SharedGroupKVOptions(8, 4, 2).bias(true));
  const auto before = params_of(*kv);
  const auto x = torch::rand({2, 5, 8});
  expect_error<c10::TypeError>([&] { kv->forward(x, torch::zeros({2, 5})); }, {"expert_idx", "integer dtype", "Float"});
  expect_error<c10::ValueError>([&] { kv->forward(x, long_full({2, 6}, 0)); }, {"expert_idx", "[2, 5]", "got [2, 6]"});
  expect_error<c10::ValueError>([&] { kv->forward(x, long_full({2, 5}, 3)); }, {"expert_idx", "[0, 3)", "[3, 3]"});
  expect_error<c10::TypeError>([&] { kv->forward(torch::ones({2, 5, 8}, torch::kInt), long_full({2, 5}, 0)); },
                               {"x", "Int"});
  expect_error<c10::TypeError>([&] { kv->forward(x.to(torch::kDouble), long_full({2, 5}, 0)); },
                               {"x", "parameters' dtype Float", "got Double"});
  expect_error<c10::ValueError>([&] { kv->forward(torch::rand({2, 5, 7}), long_full({2, 5}, 0)); },
                                {"x", "last dim 8 (hidden_size)", "[2, 5, 7]"});
  expect_params_unchanged(before, *kv);
}

// expert_weights: expert out of range is an IndexError.
TEST(BadInput, SharedGroupKVExpertWeightsRejectsBadExpert) {
  mnn::SharedGroupKV kv(mnn::SharedGroupKVOptions(8, 4, 2));
  expect_error<c10::IndexError>([&] { kv->expert_weights(3, true); }, {"expert", "[0, 3)", "got 3"});
  expect_error<c10::IndexError>([&] { kv->expert_weights(-1, false); }, {"expert", "got -1"});
  expect_error<c10::IndexError>([&] { kv->expert_weights(100, false); }, {"expert", "got 100"});
}

// =============================================================================================
// nn::MixSGAAttention: option validation
// =============================================================================================

TEST(BadInput, AttentionOptionsRejectBadSizes) {
  using Opt = mnn::MixSGAAttentionOptions;
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(0, 4, 4)); }, {"hidden_size", "got 0"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, -4, 4)); }, {"num_heads", "got -4"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 0)); }, {"num_kv_heads", "got 0"});
  // num_kv_heads must divide num_heads.
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 3)); },
                                {"num_kv_heads", "divide num_heads (4)", "got 3"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 8)); }, {"num_kv_heads", "got 8"});
  // num_heads must divide hidden_size when head_dim is left 0.
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(30, 4, 4)); },
                                {"num_heads", "hidden_size (30)", "got 4"});
  // Odd head_dim, derived (12 / 4 = 3) or given.
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(12, 4, 4)); }, {"head_dim", "even", "got 3"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).head_dim(5)); }, {"head_dim", "got 5"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).head_dim(-2)); }, {"head_dim", "> 0", "got -2"});
}

TEST(BadInput, AttentionOptionsRejectBadGroupSizesAndRatios) {
  using Opt = mnn::MixSGAAttentionOptions;
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).group_sizes({1, 4, 2})); },
                                {"group_sizes", "strictly increasing", "[1, 4, 2]"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).group_sizes({0, 2, 4})); },
                                {"group_sizes", "group_sizes[0] = 0"});
  // Default group sizes (1, 2, 4) with 2 KV heads: 4 does not divide 2.
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 2)); },
                                {"group_sizes", "KV heads (2)", "group_sizes[2] = 4"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).group_sizes({1, 3})); },
                                {"group_sizes", "group_sizes[1] = 3"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).ratios({0.5, 0.25, 0.5})); },
                                {"ratios", "sum to 1", "1.25"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).ratios({-0.1, 0.5, 0.6})); },
                                {"ratios", "ratios[0] = -0.1"});
  // Ratios must match the number of experts (= group sizes).
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).ratios({0.5, 0.5})); },
                                {"ratios", "expected 3 ratios", "got 2 (0.5, 0.5)"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).group_sizes({1, 2})); },
                                {"ratios", "expected 2 ratios", "got 3 (0.3, 0.1, 0.6)"});
}

TEST(BadInput, AttentionOptionsRejectBadStringsAndScalars) {
  using Opt = mnn::MixSGAAttentionOptions;
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).aux_loss("cross_entropy")); },
                                {"aux_loss", "got 'cross_entropy'"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).aux_loss("Sigmoid_CE")); },
                                {"aux_loss", "got 'Sigmoid_CE'"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).prefill_routing("greedy")); },
                                {"prefill_routing", "'expert_choice' or 'argmax'", "got 'greedy'"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).aux_alpha(-0.5)); },
                                {"aux_alpha", ">= 0", "got -0.5"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).aux_alpha(kNaN)); }, {"aux_alpha", "got nan"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).aux_alpha(kInf)); }, {"aux_alpha", "got inf"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).attention_dropout(1.0)); },
                                {"attention_dropout", "[0, 1)", "got 1"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).attention_dropout(-0.1)); },
                                {"attention_dropout", "got -0.1"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).rope_theta(0.0)); }, {"rope_theta", "got 0"});
  expect_error<c10::ValueError>([] { mnn::MixSGAAttention(Opt(32, 4, 4).rope_theta(kNaN)); }, {"rope_theta", "got nan"});
}

// =============================================================================================
// nn::MixSGAAttention: forward
// =============================================================================================

// hidden_states: dtype, rank, width; a failed forward leaves the input and the parameters alone.
TEST(BadInput, AttentionForwardRejectsBadHiddenStates) {
  mnn::MixSGAAttention attn(mnn::MixSGAAttentionOptions(32, 4, 4));
  const auto params = params_of(*attn);
  expect_error<c10::TypeError>([&] { attn->forward(torch::ones({2, 5, 32}, torch::kLong)); },
                               {"hidden_states", "float32", "Long"});
  const auto x64 = torch::rand({2, 5, 32}, torch::kDouble).requires_grad_();
  const auto before = snapshot({x64});
  expect_error<c10::TypeError>([&] { attn->forward(x64); },
                               {"hidden_states", "parameters' dtype Float", "got Double"});
  expect_unchanged(before, {x64});
  EXPECT_FALSE(x64.grad().defined());
  expect_error<c10::TypeError>([&] { attn->forward(torch::rand({2, 5, 32}, torch::kBFloat16)); },
                               {"hidden_states", "got BFloat16"});
  expect_error<c10::ValueError>([&] { attn->forward(torch::rand({5, 32})); },
                                {"hidden_states", "[B, L, 32] (hidden_size)", "got [5, 32]"});
  expect_error<c10::ValueError>([&] { attn->forward(torch::rand({2, 5, 31})); }, {"hidden_states", "got [2, 5, 31]"});
  expect_error<c10::ValueError>([&] { attn->forward_with_routing(torch::rand({1, 2, 5, 32})); },
                                {"hidden_states", "got [1, 2, 5, 32]"});
  expect_params_unchanged(params, *attn);
}

// attention_mask and position_ids of the wrong shape.
TEST(BadInput, AttentionForwardRejectsBadMaskAndPositions) {
  mnn::MixSGAAttention attn(mnn::MixSGAAttentionOptions(32, 4, 4));
  const auto x = torch::rand({2, 5, 32});
  expect_error<c10::ValueError>([&] { attn->forward(x, torch::ones({2, 4})); },
                                {"attention_mask", "[B, L] = [2, 5]", "got shape [2, 4]"});
  expect_error<c10::ValueError>([&] { attn->forward(x, torch::ones({5})); }, {"attention_mask", "got shape [5]"});
  expect_error<c10::ValueError>([&] { attn->forward(x, torch::ones({2, 1, 1, 5})); },
                                {"attention_mask", "got shape [2, 1, 1, 5]"});
  expect_error<c10::ValueError>([&] { attn->forward(x, std::nullopt, torch::arange(4)); },
                                {"position_ids", "[2, 5] or [5]", "got [4]"});
  expect_error<c10::ValueError>([&] { attn->forward(x, std::nullopt, torch::arange(5).view({1, 5})); },
                                {"position_ids", "got [1, 5]"});
  expect_error<c10::ValueError>([&] { attn->forward_with_routing(x, torch::ones({2, 5}), torch::zeros({3, 5}, torch::kLong)); },
                                {"position_ids", "got [3, 5]"});
}

// An all-padding sequence in attention_mask is rejected (by the routing op, hence the name).
// An all-padding sequence is named against attention_mask, the argument the caller passed.
TEST(BadInput, AttentionForwardRejectsAllPaddingSequence) {
  for (const std::string mode : {"expert_choice", "argmax"}) {
    SCOPED_TRACE(mode);
    mnn::MixSGAAttention attn(mnn::MixSGAAttentionOptions(32, 4, 4).prefill_routing(mode));
    const auto params = params_of(*attn);
    const auto x = torch::rand({3, 5, 32}).requires_grad_();
    auto mask = torch::ones({3, 5}, torch::kLong);
    mask[2].zero_();
    const auto before = snapshot({x, mask});
    expect_error<c10::ValueError>([&] { attn->forward(x, mask); }, {"sequence 2", "no valid token", "all padding"});
    expect_error<c10::ValueError>([&] { attn->forward(x, mask); }, {"attention_mask"});
    expect_unchanged(before, {x, mask});
    expect_params_unchanged(params, *attn);
  }
}

// Devices: Meta tensors stand in for "another device"; the module checks them before any dispatch.
TEST(BadInput, AttentionForwardRejectsMismatchedDevices) {
  mnn::MixSGAAttention attn(mnn::MixSGAAttentionOptions(32, 4, 4));
  expect_error<c10::ValueError>([&] { attn->forward(torch::rand({2, 5, 32}), torch::ones({2, 5}, torch::kMeta)); },
                                {"attention_mask", "expected device cpu", "got meta"});
  expect_error<c10::ValueError>([&] { attn->forward(torch::empty({2, 5, 32}, torch::kMeta)); },
                                {"hidden_states", "parameters' device cpu", "got meta"});
}

// NaN hidden states: routing still assigns every token one expert with the capacity counts, no crash.
TEST(BadInput, AttentionForwardToleratesNaNRouterInput) {
  mnn::MixSGAAttention attn(mnn::MixSGAAttentionOptions(32, 4, 4));
  auto x = torch::rand({2, 10, 32});
  x[0][3].fill_(kNaN);
  x[1].fill_(kNaN);
  const auto r = attn->forward_with_routing(x);
  ASSERT_EQ(r.target_idx.sizes(), (std::vector<int64_t>{2, 10}));
  for (int64_t b = 0; b < 2; ++b) EXPECT_EQ(expert_counts(r.target_idx, b, 3), (std::vector<int64_t>{3, 1, 6}));
  EXPECT_TRUE(torch::equal(r.expert_idx, r.target_idx));
}

// =============================================================================================
// nn::apply_rope
// =============================================================================================

TEST(BadInput, ApplyRopeRejectsBadInput) {
  const auto x = torch::rand({2, 5, 4, 8});
  const auto pos = torch::arange(5);
  const auto before = snapshot({x, pos});
  expect_error<c10::TypeError>([&] { mnn::apply_rope(torch::ones({2, 5, 4, 8}, torch::kInt), pos); },
                               {"x", "float32", "Int"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(torch::rand({5, 4, 8}), pos); },
                                {"x", "[B, L, H, d]", "got [5, 4, 8]"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(torch::rand({2, 5, 4, 7}), pos); },
                                {"x", "even d", "got [2, 5, 4, 7]"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, torch::arange(4)); },
                                {"positions", "[2, 5] or [5]", "got [4]"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, torch::zeros({3, 5}, torch::kLong)); },
                                {"positions", "got [3, 5]"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, torch::zeros({2, 5, 1}, torch::kLong)); },
                                {"positions", "got [2, 5, 1]"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, pos, 0.0); }, {"theta", "> 0", "got 0"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, pos, -10.0); }, {"theta", "got -10"});
  expect_error<c10::ValueError>([&] { mnn::apply_rope(x, pos, kNaN); }, {"theta", "got nan"});
  expect_unchanged(before, {x, pos});
}

TEST(BadInput, RopeRotateRejectsBadInput) {
  const auto x = torch::rand({2, 5, 4, 8});
  const auto c = torch::rand({1, 5, 8}), s = torch::rand({1, 5, 8});
  const auto before = snapshot({x, c, s});
  expect_error<c10::ValueError>([&] { ops::rope_rotate(torch::rand({5, 4, 8}), c, s); }, {"x", "[B, L, H, d]", "got [5, 4, 8]"});
  expect_error<c10::ValueError>([&] { ops::rope_rotate(x, torch::rand({1, 4, 8}), s); }, {"cos", "[1, 5, 8]", "got [1, 4, 8]"});
  expect_error<c10::TypeError>([&] { ops::rope_rotate(x, c, s.to(torch::kDouble)); }, {"sin", "dtype of x", "Double"});
  expect_error<c10::ValueError>([&] { ops::rope_rotate(x, c, torch::Tensor()); }, {"sin", "undefined"});
  expect_error<c10::ValueError>([&] { ops::rope_rotate(x, c.requires_grad_(true), s); }, {"cos", "must not require grad"});
  expect_unchanged(before, {x, c.detach(), s});
}

// =============================================================================================
// ops::hetero_decode_attention
// =============================================================================================

TEST(BadInput, HeteroDecodeAttentionRejectsBadInput) {
  const auto q = torch::randn({2, 4, 8});
  const std::vector<torch::Tensor> k{torch::randn({2, 2, 3, 8}), torch::randn({2, 1, 3, 8})};
  const auto lengths = torch::ones({2, 2}, torch::kLong);
  expect_error<c10::TypeError>([&] { ops::hetero_decode_attention(q.to(torch::kLong), k, k, lengths, 2); },
                               {"q", "Long"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q[0], k, k, lengths, 2); },
                                {"q", "[B, Hq, d]", "got [4, 8]"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, k, lengths, 3); }, {"num_kv_heads", "got 3"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, k, lengths, 0); }, {"num_kv_heads", "got 0"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, {k[0]}, lengths, 2); },
                                {"k_pools / v_pools", "got 2 and 1"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, {}, {}, torch::ones({2, 0}, torch::kLong), 2); },
                                {"k_pools / v_pools", "got 0 and 0"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, k, torch::ones({2, 3}, torch::kLong), 2); },
                                {"lengths", "[2, 2]", "got [2, 3]"});
  expect_error<c10::TypeError>([&] { ops::hetero_decode_attention(q, k, k, lengths.to(torch::kFloat), 2); },
                               {"lengths", "integer", "Float"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, k, lengths * 4, 2); },
                                {"lengths", "[0, 3]", "[4, 4]"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, {k[0], torch::randn({2, 3, 3, 8})}, {k[0], torch::randn({2, 3, 3, 8})}, lengths, 2); },
                                {"k_pools[1]", "got [2, 3, 3, 8]"});
  expect_error<c10::TypeError>([&] { ops::hetero_decode_attention(q, {k[0], k[1].to(torch::kDouble)}, {k[0], k[1]}, lengths, 2); },
                               {"k_pools[1]", "Double"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, k, {k[0], torch::randn({2, 1, 2, 8})}, lengths, 2); },
                                {"v_pools[1]", "[2, 1, 3, 8]", "got [2, 1, 2, 8]"});
  expect_error<c10::ValueError>([&] { ops::hetero_decode_attention(q, {k[0], torch::randn({2, 1, 8, 3}).transpose(2, 3)}, {k[0], k[1]}, lengths, 2); },
                                {"k_pools[1]", "contiguous", "stride 3"});
}

// =============================================================================================
// _grouped_kv_proj_backward (reachable from C++ through the dispatcher)
// =============================================================================================

TEST(BadInput, GroupedKVProjBackwardRejectsBadGradOut) {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("mixsga::_grouped_kv_proj_backward", "")
                      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                            const at::Tensor&, const at::Tensor&,
                                                                            c10::IntArrayRef, int64_t)>();
  const auto x = torch::randn({2, 5, 8}), w = torch::randn({8, 8}), idx = long_full({2, 5}, 1);
  const auto grad = torch::randn({2, 5, 4, 2});
  expect_error<c10::TypeError>([&] { op.call(grad.to(torch::kHalf), x, w, idx, kGroups, 2); },
                               {"grad_out", "dtype of x", "Float", "Half"});
  expect_error<c10::ValueError>([&] { op.call(grad.narrow(1, 0, 4), x, w, idx, kGroups, 2); },
                                {"grad_out", "[2, 5, 4, 2]", "got [2, 4, 4, 2]"});
}

// =============================================================================================
// Sizes no data can have (found by tests/fuzz): clear errors, not overflow or torch internals
// =============================================================================================

TEST(BadInput, OverflowingSizesAreRejected) {
  constexpr int64_t kHuge = int64_t{1} << 62;
  expect_error<c10::ValueError>([&] { ops::expert_permutation(long_full({3}, 0), kHuge); },
                                {"num_experts", "[1, 1048576]", std::to_string(kHuge)});
  const auto empty_kv = torch::empty({kHuge, 2, 0, 4, 2});  // a valid empty tensor; its sizes' product overflows
  expect_error<c10::ValueError>([&] { ops::grouped_kv_pool(empty_kv, torch::empty({kHuge, 2, 0}, torch::kLong), {1, 2}); },
                                {"kv", "too large", "overflows int64"});
  const auto x = torch::empty({0, kHuge, 1});
  expect_error<c10::ValueError>(
      [&] { ops::grouped_kv_proj(x, torch::randn({8, 1}), std::nullopt, torch::empty({0, kHuge}, torch::kLong), {1, 2}, 2); },
      {"x", "too large"});
  expect_error<c10::TypeError>([&] { ops::pool_kv_weight(torch::ones({8, 4}, torch::kLong), 2, 2); }, {"weight", "Long"});
  expect_error<c10::ValueError>([&] { ops::pool_kv_weight(torch::empty({0, kHuge}), 2, 4); }, {"weight", "too large"});
}

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
// Checkpoints (test_checkpoint.cpp covers option and tensor mismatches)
// =============================================================================================

TEST(BadInput, CheckpointFunctionsNameThePath) {
  mnn::MixSGAAttention layer(mnn::MixSGAAttentionOptions(32, 4, 4));
  const auto dir = std::filesystem::temp_directory_path();
  const auto absent = (dir / "mixsga_bad_input_absent.pt").string();
  expect_error<c10::ValueError>([&] { mixsga::load_checkpoint(*layer, absent); }, {"path", absent});
  expect_error<c10::ValueError>([&] { mixsga::load_checkpoint(*layer, dir.string()); }, {"path", "no checkpoint file"});
  expect_error<c10::ValueError>([&] { mixsga::save_checkpoint(*layer, ""); }, {"path", "empty"});
  const auto garbage = (dir / fmt::format("mixsga_bad_input_garbage_{}.pt", ::getpid())).string();
  { std::ofstream(garbage) << "not a zip archive"; }
  expect_error<c10::ValueError>([&] { mixsga::load_checkpoint(*layer, garbage); }, {"path", garbage, "not a readable checkpoint"});
  std::filesystem::remove(garbage);
}
