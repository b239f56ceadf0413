#pragma once
// Helpers of the bad-input catalogue (tests/cpp/test_bad_input_*.cpp: ops, modules, cache,
// checkpoint): every public entry point fed each kind of bad input.
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

namespace bad_input {

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
inline std::vector<torch::Tensor> snapshot(std::initializer_list<torch::Tensor> tensors) {
  std::vector<torch::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.detach().clone());
  return out;
}

inline void expect_unchanged(const std::vector<torch::Tensor>& before, std::initializer_list<torch::Tensor> after,
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
inline std::vector<torch::Tensor> params_of(const torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

inline void expect_params_unchanged(const std::vector<torch::Tensor>& before, const torch::nn::Module& m,
                                    std::source_location where = std::source_location::current()) {
  ::testing::ScopedTrace trace(where.file_name(), static_cast<int>(where.line()), "expect_params_unchanged called here");
  const auto now = m.parameters();
  ASSERT_EQ(before.size(), now.size());
  for (size_t i = 0; i < now.size(); ++i) {
    EXPECT_TRUE(torch::equal(before[i], now[i].detach())) << "parameter " << i << " changed";
    EXPECT_FALSE(now[i].grad().defined()) << "parameter " << i << " got a gradient";
  }
}

inline torch::Tensor long_full(c10::IntArrayRef shape, int64_t v) { return torch::full(shape, v, torch::kLong); }

inline const std::vector<double> kRatios{0.3, 0.1, 0.6};
inline const std::vector<int64_t> kGroups{1, 2, 4};

// Per-expert count of the valid tokens of sequence b.
inline std::vector<int64_t> expert_counts(const torch::Tensor& idx, int64_t b, int64_t E) {
  std::vector<int64_t> c(E, 0);
  const auto row = idx[b];
  for (int64_t t = 0; t < row.size(0); ++t) {
    const int64_t e = row[t].item<int64_t>();
    if (e >= 0 && e < E) ++c[e];
  }
  return c;
}

}  // namespace bad_input
