#pragma once
// Random inputs for the fuzz harness: sizes (small, zero and huge), dtypes, strides and argument lists,
// all drawn from one seeded generator so a case is replayed from its seed alone.
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace mixsga::fuzz {

class Inputs {
 public:
  explicit Inputs(uint64_t seed) : rng_(seed) {}

  int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng_); }
  bool coin(double p = 0.5) { return std::bernoulli_distribution(p)(rng_); }
  template <class T>
  T pick(const std::vector<T>& choices) { return choices[uniform(0, static_cast<int64_t>(choices.size()) - 1)]; }

  /// A tensor dimension: mostly 1..4, sometimes 0, rarely a huge value (only where the caller says a
  /// huge size cannot turn into a real allocation, i.e. when another dim is 0).
  int64_t dim_size(bool allow_huge = false) {
    const int64_t r = uniform(0, 99);
    if (r < 10) return 0;
    if (allow_huge && r < 14) return huge();
    if (r < 24) return uniform(5, 9);
    return uniform(1, 4);
  }
  /// An int argument (group size, head dim, expert count...): valid-looking, negative, zero or huge.
  int64_t int_arg(int64_t typical_lo, int64_t typical_hi) {
    const int64_t r = uniform(0, 99);
    if (r < 75) return uniform(typical_lo, typical_hi);
    if (r < 85) return uniform(-3, 0);
    return huge();
  }
  int64_t huge() {
    return pick<int64_t>({int64_t{1} << 40, int64_t{1} << 50, int64_t{1} << 62,
                          std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()});
  }
  /// A ratio list: usually valid (random simplex), sometimes wrong length, NaN, negative, > 1, not summing to 1.
  std::vector<double> ratios(int64_t experts) {
    const int64_t n = coin(0.85) && experts <= 64 ? experts : uniform(0, 5);
    std::vector<double> r(std::max<int64_t>(n, 0));
    double sum = 0;
    for (auto& v : r) sum += (v = static_cast<double>(uniform(0, 10)));
    for (auto& v : r) v = sum > 0 ? v / sum : 1.0 / static_cast<double>(r.size());
    if (!r.empty() && coin(0.15)) {
      r[uniform(0, static_cast<int64_t>(r.size()) - 1)] =
          pick<double>({std::nan(""), -0.5, 1.5, std::numeric_limits<double>::infinity(), 0.0});
    }
    return r;
  }
  /// Group sizes: usually (1, 2, 4)-like and dividing `heads`, sometimes unsorted, zero, negative or huge.
  std::vector<int64_t> group_sizes(int64_t heads) {
    std::vector<int64_t> g;
    if (coin(0.8)) {
      for (int64_t s = 1; s <= std::max<int64_t>(heads, 1) && g.size() < 4; ++s) {
        if (heads > 0 && heads % s == 0 && coin(0.7)) g.push_back(s);
      }
      if (g.empty()) g.push_back(1);
    } else {
      const int64_t n = uniform(0, 4);
      for (int64_t i = 0; i < n; ++i) g.push_back(int_arg(1, 8));
    }
    return g;
  }
  /// A floating dtype most of the time; sometimes an integer or bool dtype.
  at::ScalarType dtype(bool floating_only = false) {
    if (floating_only || coin(0.85)) return pick<at::ScalarType>({at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
    return pick<at::ScalarType>({at::kInt, at::kLong, at::kBool, at::kByte});
  }
  /// Random values of `dtype` with `shape`, sometimes with NaN/Inf, and with a random layout: contiguous,
  /// transposed (non-contiguous), sliced with a step, or a stride-0 broadcast.
  at::Tensor tensor(std::vector<int64_t> shape, at::ScalarType dtype) {
    at::Tensor t;
    const int64_t layout = uniform(0, 3);
    if (layout == 1 && shape.size() >= 2) {
      std::swap(shape[0], shape[1]);
      t = values(shape, dtype).transpose(0, 1);
    } else if (layout == 2 && !shape.empty() && shape.back() >= 0 && shape.back() < (int64_t{1} << 20)) {
      auto wide = shape;
      wide.back() *= 2;
      t = values(wide, dtype).slice(-1, 0, wide.back(), 2);
    } else if (layout == 3 && !shape.empty() && shape[0] > 1) {
      auto one = shape;
      one[0] = 1;
      t = values(one, dtype).expand(shape);
    } else {
      t = values(shape, dtype);
    }
    return t;
  }
  /// Integer expert indices of `shape` in [lo, hi], in a random integer dtype.
  at::Tensor indices(const std::vector<int64_t>& shape, int64_t lo, int64_t hi) {
    const auto dt = coin(0.8) ? at::kLong : pick<at::ScalarType>({at::kInt, at::kShort, at::kFloat, at::kBool});
    return at::randint(lo, hi + 1, shape, gen_).to(dt);
  }
  /// A shape of `rank` with dims from dim_size (at most one huge dim, only next to a 0).
  std::vector<int64_t> shape(int64_t rank) {
    std::vector<int64_t> s;
    for (int64_t i = 0; i < rank; ++i) s.push_back(dim_size());
    if (rank >= 2 && coin(0.05)) {
      s[uniform(0, rank - 1)] = 0;
      for (auto& d : s) {
        if (d != 0) { d = huge_dim(); break; }
      }
    }
    return s;
  }
  at::Generator& generator() { return gen_; }

 private:
  int64_t huge_dim() { return pick<int64_t>({int64_t{1} << 40, int64_t{1} << 50, std::numeric_limits<int64_t>::max()}); }
  at::Tensor values(const std::vector<int64_t>& shape, at::ScalarType dtype) {
    auto t = at::randn(shape, gen_, at::TensorOptions().dtype(at::kDouble));
    if (t.numel() > 0 && coin(0.1)) {
      t.view(-1)[uniform(0, t.numel() - 1)] =
          pick<double>({std::nan(""), std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity()});
    }
    if (dtype == at::kBool) return t.gt(0);
    if (at::isIntegralType(dtype, false)) return t.mul(3).to(dtype);
    return t.to(dtype);
  }

  std::mt19937_64 rng_;
  at::Generator gen_ = at::detail::createCPUGenerator(rng_());
};

}  // namespace mixsga::fuzz
