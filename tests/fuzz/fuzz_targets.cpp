#include "fuzz_targets.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <fmt/format.h>
#include <mixsga/cache.h>
#include <mixsga/ops.h>

#include <c10/util/Exception.h>
#include <c10/util/Type.h>

#include <algorithm>
#include <optional>
#include <typeinfo>

namespace mixsga::fuzz {

bool g_error_from_entry_point = false;

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw FuzzFailure(what);
}

// Runs one call of the entry point under test. A rejection must be a c10::ValueError, TypeError or
// IndexError (an argument check) or c10::OutOfMemoryError (a huge but well-formed request); any other
// c10::Error means an input got past the checks into torch internals, which is a finding.
template <class F>
auto checked(F&& f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    g_error_from_entry_point = true;
    const bool clear = dynamic_cast<const c10::ValueError*>(&e) || dynamic_cast<const c10::TypeError*>(&e) ||
                       dynamic_cast<const c10::IndexError*>(&e) || dynamic_cast<const c10::OutOfMemoryError*>(&e);
    if (!clear) {
      throw FuzzFailure(fmt::format("unclear error ({}): {}", c10::demangle(typeid(e).name()), e.what_without_backtrace()));
    }
    throw;
  }
}

std::vector<int64_t> leading(const at::Tensor& t, int64_t drop) {
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().end() - drop);
}

bool all_finite(const at::Tensor& t) { return t.numel() == 0 || at::isfinite(t.to(at::kDouble)).all().item<bool>(); }

void fuzz_route_expert_choice(Inputs& in) {
  const int64_t rank = in.coin(0.85) ? 3 : in.uniform(0, 4);
  auto shape = in.shape(rank);
  const int64_t E = rank == 3 ? shape[2] : 3;
  const auto scores = in.tensor(shape, in.dtype());
  const auto ratios = in.ratios(E);
  std::optional<at::Tensor> mask;
  if (in.coin(0.5)) {
    auto mshape = rank >= 2 && in.coin(0.85) ? std::vector<int64_t>{shape[0], shape[1]} : in.shape(in.uniform(0, 3));
    mask = in.indices(mshape, in.coin(0.9) ? 1 : 0, 1);
  }
  const auto idx = checked([&] { return ops::route_expert_choice(scores, ratios, mask); });
  require(idx.scalar_type() == at::kLong, "route_expert_choice: output is not int64");
  require(idx.sizes().equals({shape[0], shape[1]}), "route_expert_choice: output shape is not [B, L]");
  if (idx.numel() > 0) {
    require(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < E, "route_expert_choice: expert out of range");
  }
}

void fuzz_grouped_kv_pool(Inputs& in) {
  const int64_t rank = in.uniform(0, 5);
  const auto shape = in.shape(rank);
  const int64_t heads = rank >= 2 ? shape[rank - 2] : 1;
  const auto groups = in.group_sizes(heads);
  const auto kv = in.tensor(shape, in.dtype());
  const int64_t E = static_cast<int64_t>(groups.size());
  const auto idx_shape = rank >= 2 && in.coin(0.85) ? leading(kv, 2) : in.shape(in.uniform(0, 3));
  const auto idx = in.indices(idx_shape, in.coin(0.9) ? 0 : -1, in.coin(0.9) ? std::max<int64_t>(E - 1, 0) : E);
  const auto out = checked([&] { return ops::grouped_kv_pool(kv, idx, groups); });
  require(out.sizes().equals(kv.sizes()) && out.scalar_type() == kv.scalar_type(),
          "grouped_kv_pool: output shape or dtype differs from kv");
  if (kv.scalar_type() == at::kDouble && all_finite(kv)) require(all_finite(out), "grouped_kv_pool: non-finite output");
}

void fuzz_grouped_kv_proj(Inputs& in) {
  const int64_t rank = in.uniform(0, 4);
  const auto xshape = in.shape(rank);
  const int64_t D = rank >= 1 ? xshape.back() : 2;
  const int64_t head_dim = in.int_arg(1, 4);
  const int64_t heads = in.uniform(0, 4);
  const auto dtype = in.dtype();
  const auto x = in.tensor(xshape, dtype);
  const bool same_dtype = in.coin(0.9);
  const int64_t rows = head_dim > 0 && head_dim < 64 && in.coin(0.9) ? heads * head_dim : in.dim_size();
  const auto weight = in.tensor({rows, in.coin(0.9) ? D : in.dim_size()}, same_dtype ? dtype : in.dtype());
  std::optional<at::Tensor> bias;
  if (in.coin(0.4)) bias = in.tensor({in.coin(0.9) ? rows : in.dim_size()}, in.coin(0.9) ? dtype : in.dtype());
  const auto groups = in.group_sizes(heads);
  const int64_t E = static_cast<int64_t>(groups.size());
  const auto idx_shape = rank >= 1 && in.coin(0.9) ? leading(x, 1) : in.shape(in.uniform(0, 3));
  const auto idx = in.indices(idx_shape, 0, in.coin(0.95) ? std::max<int64_t>(E - 1, 0) : E);
  const bool grad = at::isFloatingType(dtype) && in.coin(0.5);
  const auto xg = grad ? x.detach().requires_grad_() : x;
  const auto wg = grad && weight.is_floating_point() ? weight.detach().requires_grad_() : weight;
  const auto out = checked([&] { return ops::grouped_kv_proj(xg, wg, bias, idx, groups, head_dim); });
  auto expected = leading(x, 1);
  expected.push_back(rows / head_dim);
  expected.push_back(head_dim);
  require(out.sizes().equals(expected), "grouped_kv_proj: output shape is not [*, Hkv, d]");
  if (grad && out.requires_grad()) checked([&] { out.sum().backward(); return 0; });
  if (dtype == at::kDouble && out.numel() > 0 && all_finite(x) && all_finite(weight) && (!bias || all_finite(*bias))) {
    auto lin = at::linear(x, weight, bias.value_or(at::Tensor())).unflatten(-1, {rows / head_dim, head_dim});
    const auto ref = ops::grouped_kv_pool(lin, idx, groups);
    require(at::allclose(out.detach(), ref, 1e-9, 1e-9), "grouped_kv_proj: differs from grouped_kv_pool(linear(x))");
  }
}

void fuzz_grouped_kv_proj_backward(Inputs& in) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mixsga::_grouped_kv_proj_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 c10::IntArrayRef, int64_t)>();
  const int64_t rank = in.uniform(1, 3);
  const auto xshape = in.shape(rank);
  const int64_t head_dim = in.int_arg(1, 3), heads = in.uniform(1, 4);
  const auto dtype = in.dtype(in.coin(0.9));
  const auto x = in.tensor(xshape, dtype);
  const int64_t rows = head_dim > 0 && head_dim < 64 ? heads * head_dim : 2;
  const auto weight = in.tensor({rows, xshape.back()}, dtype);
  auto gshape = leading(x, 1);
  gshape.push_back(heads);
  gshape.push_back(in.coin(0.9) ? head_dim : in.dim_size());
  const auto grad_out = in.tensor(in.coin(0.9) ? gshape : in.shape(in.uniform(0, 4)), in.coin(0.9) ? dtype : in.dtype());
  const auto groups = in.group_sizes(heads);
  const auto idx = in.indices(leading(x, 1), 0, std::max<int64_t>(static_cast<int64_t>(groups.size()) - 1, 0));
  const auto [gx, gw, gb] = checked([&] { return op.call(grad_out, x, weight, idx, groups, head_dim); });
  require(gx.sizes().equals(x.sizes()) && gw.sizes().equals(weight.sizes()),
          "_grouped_kv_proj_backward: gradient shapes differ from the inputs");
}

void fuzz_expert_permutation(Inputs& in) {
  const int64_t E = in.coin(0.85) ? in.uniform(1, 5) : in.int_arg(1, 5);
  const auto shape = in.shape(in.uniform(0, 3));
  const int64_t top = std::clamp<int64_t>(E, 1, 8) - 1;  // (E may be huge or negative)
  const auto idx = in.indices(shape, in.coin(0.9) ? 0 : -2, in.coin(0.9) ? top : 9);
  const auto [perm, offsets] = checked([&] { return ops::expert_permutation(idx, E); });
  const int64_t N = idx.numel();
  require(perm.numel() == N && offsets.numel() == E + 1, "expert_permutation: output sizes");
  require(offsets[0].item<int64_t>() == 0 && offsets[E].item<int64_t>() == N, "expert_permutation: offsets ends");
  require(N == 0 || at::equal(std::get<0>(perm.sort()), at::arange(N, perm.options())),
          "expert_permutation: not a permutation");
}

void fuzz_scatter_gather(Inputs& in) {
  const auto shape = in.shape(in.uniform(0, 3));
  const auto x = in.tensor(shape, in.dtype());
  const int64_t N = shape.empty() ? 1 : shape[0];
  at::Tensor perm;
  const int64_t kind = in.uniform(0, 9);
  if (kind < 6 && N < (int64_t{1} << 20)) {
    perm = at::randperm(N, in.generator());
  } else if (kind < 8) {
    perm = in.indices({in.coin(0.5) ? N : in.dim_size()}, -2, std::clamp<int64_t>(N, 1, 1 << 20) + 1);
  } else {
    perm = in.indices(in.shape(in.uniform(0, 2)), 0, 3);
  }
  const bool scatter = in.coin();
  const auto out = checked([&] { return scatter ? ops::expert_scatter(x, perm) : ops::expert_gather(x, perm); });
  require(out.sizes().equals(x.sizes()), "expert_scatter/gather: output shape differs from x");
  const auto back = scatter ? ops::expert_gather(out, perm) : ops::expert_scatter(out, perm);
  require(at::equal(back.to(at::kDouble).nan_to_num(0, 1, -1), x.to(at::kDouble).nan_to_num(0, 1, -1)),
          "expert_scatter/gather: not inverse of each other");
}

void fuzz_hetero_decode_attention(Inputs& in) {
  const int64_t B = in.dim_size(), Hkv = in.uniform(1, 4), d = in.uniform(1, 4) * 2;
  const int64_t Hq = Hkv * in.uniform(1, 2);
  const auto groups = in.group_sizes(Hkv);
  const auto dtype = in.dtype();
  const auto q = in.tensor(in.coin(0.9) ? std::vector<int64_t>{B, Hq, d} : in.shape(in.uniform(0, 4)), dtype);
  std::vector<at::Tensor> kp, vp;
  const int64_t E = in.coin(0.9) ? static_cast<int64_t>(groups.size()) : in.uniform(0, 4);
  std::vector<int64_t> T;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t g = e < static_cast<int64_t>(groups.size()) && groups[e] > 0 && groups[e] <= Hkv ? groups[e] : 1;
    T.push_back(in.dim_size());
    std::vector<int64_t> s{B, Hkv / g, T.back(), d};
    if (in.coin(0.05)) s = in.shape(in.uniform(0, 5));
    kp.push_back(in.tensor(s, in.coin(0.95) ? dtype : in.dtype()));
    vp.push_back(in.tensor(in.coin(0.95) ? s : in.shape(4), in.coin(0.95) ? dtype : in.dtype()));
  }
  at::Tensor lengths = at::zeros({B, E}, at::kLong);
  for (int64_t e = 0; e < E; ++e) {
    if (B > 0) lengths.select(1, e).copy_(at::randint(0, T[e] + 1, {B}, in.generator()));
  }
  if (in.coin(0.1)) lengths = in.indices(in.shape(in.uniform(0, 3)), -1, 5);
  const int64_t heads = in.coin(0.9) ? Hkv : in.int_arg(1, 8);
  std::optional<double> scale;
  if (in.coin(0.3)) scale = in.pick<double>({0.5, 0.0, -1.0, std::nan(""), 1e300});
  const auto out = checked([&] { return ops::hetero_decode_attention(q, kp, vp, lengths, heads, scale); });
  require(out.sizes().equals(q.sizes()) && out.scalar_type() == q.scalar_type(),
          "hetero_decode_attention: output shape or dtype differs from q");
}

void fuzz_small_helpers(Inputs& in) {
  const auto groups = in.group_sizes(in.uniform(1, 8));
  const auto ratios = in.ratios(static_cast<int64_t>(groups.size()));
  const double f = checked([&] { return mixsga::kv_fraction(groups, ratios); });
  require(f > 0.0 && f <= 1.0 + 1e-9, fmt::format("kv_fraction: {} is not in (0, 1]", f));
  const auto w = in.tensor(in.shape(in.uniform(0, 3)), in.dtype());
  const int64_t g = in.int_arg(1, 4), d = in.int_arg(1, 4);
  const auto pooled = checked([&] { return ops::pool_kv_weight(w, g, d); });
  require(pooled.dim() == w.dim(), "pool_kv_weight: rank changed");
}

// A random sequence of cache calls; after each (accepted or rejected) the cache's accounting must
// still add up, so a rejected call can never leave it half-updated.
void fuzz_cache(Inputs& in) {
  HeteroKVCacheOptions o;
  o.num_layers = in.coin(0.9) ? in.uniform(1, 3) : in.int_arg(1, 3);
  o.num_kv_heads = in.coin(0.9) ? in.uniform(1, 4) : in.int_arg(1, 4);
  o.head_dim = in.coin(0.9) ? in.uniform(1, 4) : in.int_arg(1, 4);
  o.group_sizes = in.group_sizes(o.num_kv_heads);
  o.dtype = in.dtype(in.coin(0.95));
  o.max_tokens = in.coin(0.8) ? 0 : in.int_arg(1, 12);
  o.growth = in.coin(0.9) ? 1.5 : in.pick<double>({1.0, 0.5, std::nan(""), 1e308});
  o.portable_append = in.coin(0.3);
  auto cache = checked([&] { return HeteroKVCache(o); });
  const int64_t E = cache.num_experts();
  const auto check_accounting = [&] {
    for (int64_t l = 0; l < o.num_layers; ++l) {
      const auto lengths = cache.lengths(l);
      require(lengths.size(0) == cache.batch_size() && lengths.size(1) == E, "cache: lengths shape");
      require(at::equal(cache.token_counts(l), lengths.sum(0)), "cache: token_counts != lengths summed");
      const auto keys = cache.keys(l);
      const auto positions = cache.positions(l);
      const auto next = cache.next_positions(l);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t longest = lengths.numel() ? lengths.select(1, e).max().item<int64_t>() : 0;
        require(keys[e].size(2) == longest, "cache: keys view length != longest sequence");
        require(positions[e].size(1) == longest, "cache: positions length != longest sequence");
        for (int64_t b = 0; b < cache.batch_size(); ++b) {
          // Each pool's slots are in position order, before the sequence's next position.
          const auto p = positions[e][b].narrow(0, 0, lengths[b][e].item<int64_t>()).to(at::kLong);
          if (p.numel() == 0) continue;
          require(p.max().item<int64_t>() < next[b].item<int64_t>(), "cache: a stored position >= next_positions");
          if (p.numel() > 1) require((p.diff() > 0).all().item<bool>(), "cache: pool positions not increasing");
        }
      }
    }
    require(cache.bytes_stored() <= cache.bytes_used(), "cache: bytes_stored > bytes_used");
  };
  const int64_t B = in.uniform(1, 3);
  const int64_t steps = in.uniform(1, 6);
  for (int64_t s = 0; s < steps; ++s) {
    try {
      const int64_t op = in.uniform(0, 9);
      const int64_t layer = in.coin(0.9) ? in.uniform(0, std::max<int64_t>(o.num_layers - 1, 0)) : in.int_arg(0, 3);
      if (op < 6) {
        const int64_t L = in.coin(0.1) ? 0 : in.uniform(1, 5);
        const int64_t b = in.coin(0.9) ? B : in.uniform(0, 4);
        std::vector<int64_t> s4{b, L, o.num_kv_heads, o.head_dim};
        if (in.coin(0.05)) s4 = in.shape(in.uniform(0, 5));
        const auto dt = in.coin(0.95) ? o.dtype : in.dtype();
        const auto k = in.tensor(s4, dt), v = in.tensor(in.coin(0.95) ? s4 : in.shape(4), dt);
        const auto idx = in.indices(in.coin(0.95) ? std::vector<int64_t>{b, L} : in.shape(2), in.coin(0.95) ? 0 : -1,
                                    in.coin(0.95) ? E - 1 : E);
        std::optional<at::Tensor> valid;
        if (in.coin(0.4)) valid = in.indices(in.coin(0.9) ? std::vector<int64_t>{b, L} : in.shape(2), 0, 1);
        // Positions: none (the default continues), ones that continue each sequence, or random ones.
        std::optional<at::Tensor> positions;
        if (in.coin(0.4)) {
          positions = in.coin(0.6) && cache.batch_size() == b
                          ? at::arange(L).unsqueeze(0) + cache.next_positions(layer).unsqueeze(1)
                          : in.indices(in.coin(0.9) ? std::vector<int64_t>{b, L} : in.shape(2), -2, 9);
        }
        if (in.coin(0.7)) {
          checked([&] { cache.append(layer, k, v, idx, valid, std::nullopt, positions); return 0; });
        } else {
          // The compact form: expert e's valid tokens as [N_e, Hkv/g_e, d] rows (N_e sometimes off by one).
          std::vector<at::Tensor> keys, values;
          const auto mine = valid.has_value() && valid->sizes().equals(idx.sizes()) ? valid->ne(0)
                                                                                    : at::ones(idx.sizes(), at::kBool);
          for (int64_t e = 0; e < E; ++e) {
            int64_t n = idx.dim() == 2 ? (mine & idx.eq(e)).sum().item<int64_t>() : in.uniform(0, 3);
            if (in.coin(0.05)) n = std::max<int64_t>(n + in.uniform(-1, 1), 0);
            const std::vector<int64_t> shape{n, o.num_kv_heads / o.group_sizes[e], o.head_dim};
            keys.push_back(in.tensor(shape, dt));
            values.push_back(in.tensor(in.coin(0.97) ? shape : in.shape(3), dt));
          }
          if (in.coin(0.03)) keys.pop_back();
          checked([&] { cache.append_compact(layer, keys, values, idx, valid, std::nullopt, positions); return 0; });
        }
      } else if (op == 6) {
        const auto beams = in.indices({in.uniform(0, 4)}, in.coin(0.9) ? 0 : -1, std::max<int64_t>(cache.batch_size(), 1));
        checked([&] { cache.reorder(beams); return 0; });
      } else if (op == 7) {
        const int64_t len = in.coin(0.9) ? in.uniform(0, 6) : in.int_arg(0, 6);
        checked([&] { cache.crop(len); return 0; });
      } else if (op == 8) {
        cache.shrink_to_fit();
      } else {
        const int64_t which = in.uniform(-1, o.num_layers);
        checked([&] { return cache.keys(layer); });
        checked([&] { return cache.decode_ratios(which); });
        (void)cache.bytes_per_token();
      }
    } catch (const c10::Error&) {
      // a rejected call: the cache must still be consistent, checked below
    }
    check_accounting();
  }
}

}  // namespace

const std::vector<Target>& targets() {
  static const std::vector<Target> all{
      {"route_expert_choice", fuzz_route_expert_choice},
      {"grouped_kv_pool", fuzz_grouped_kv_pool},
      {"grouped_kv_proj", fuzz_grouped_kv_proj},
      {"_grouped_kv_proj_backward", fuzz_grouped_kv_proj_backward},
      {"expert_permutation", fuzz_expert_permutation},
      {"expert_scatter_gather", fuzz_scatter_gather},
      {"hetero_decode_attention", fuzz_hetero_decode_attention},
      {"kv_fraction_pool_kv_weight", fuzz_small_helpers},
      {"hetero_kv_cache", fuzz_cache},
  };
  return all;
}

}  // namespace mixsga::fuzz
