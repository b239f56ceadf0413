#include "mixsga/cache.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>

#include "ops/validation.h"

namespace mixsga {

namespace {
constexpr int64_t kMinCapacity = 16;
constexpr int64_t kMaxLayers = int64_t{1} << 20;
constexpr int64_t kMaxTokenBytes = int64_t{1} << 32;

// torch's Python names ("float32", not c10's "Float"), since most users meet these errors from Python.
std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "float32";
    case c10::kDouble: return "float64";
    case c10::kHalf: return "float16";
    case c10::kBFloat16: return "bfloat16";
    case c10::kLong: return "int64";
    case c10::kInt: return "int32";
    case c10::kShort: return "int16";
    case c10::kChar: return "int8";
    case c10::kByte: return "uint8";
    case c10::kBool: return "bool";
    default: return c10::toString(t);
  }
}
}  // namespace

HeteroKVCache::HeteroKVCache(HeteroKVCacheOptions options) : options_(std::move(options)) {
  const auto& o = options_;
  // The per-layer bookkeeping is allocated up front, so an absurd count must be an error, not a failed
  // allocation (found by tests/fuzz; corpus case hetero_kv_cache 27).
  TORCH_CHECK_VALUE(o.num_layers > 0 && o.num_layers <= kMaxLayers,
                    fmt::format("num_layers: must be in [1, {}], got {}", kMaxLayers, o.num_layers));
  TORCH_CHECK_VALUE(o.num_kv_heads > 0, fmt::format("num_kv_heads: must be > 0, got {}", o.num_kv_heads));
  TORCH_CHECK_VALUE(o.head_dim > 0, fmt::format("head_dim: must be > 0, got {}", o.head_dim));
  TORCH_CHECK_VALUE(o.max_tokens >= 0, fmt::format("max_tokens: must be >= 0 (0 = unlimited), got {}", o.max_tokens));
  TORCH_CHECK_VALUE(std::isfinite(o.growth) && o.growth >= 1.0, fmt::format("growth: must be >= 1, got {}", o.growth));
  detail::check_group_sizes(o.group_sizes, o.num_kv_heads);
  for (const int64_t g : o.group_sizes) unit_lcm_ = std::lcm(unit_lcm_, g);  // divides num_kv_heads, as each g does
  const int64_t coarsest = o.group_sizes.back();
  TORCH_CHECK_VALUE(o.kv_cap == 0.0 || (std::isfinite(o.kv_cap) && o.kv_cap * static_cast<double>(coarsest) >= 1.0 - 1e-9 &&
                                        o.kv_cap <= 1.0),
                    fmt::format("kv_cap: must be 0 (no cap) or in [1/{}, 1] = [{:.4g}, 1], the shares of the full K/V "
                                "that group sizes ({}) can store, got {}",
                                coarsest, 1.0 / static_cast<double>(coarsest), fmt::join(o.group_sizes, ", "), o.kv_cap));
  TORCH_CHECK_TYPE(at::isFloatingType(o.dtype), fmt::format("dtype: must be a floating dtype, got {}", c10::toString(o.dtype)));
  // The memory accounting multiplies these per token; bound them so it cannot overflow (found by tests/fuzz).
  int64_t token_bytes = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(2 * c10::elementSize(o.dtype), o.num_kv_heads, &token_bytes) &&
                        !__builtin_mul_overflow(token_bytes, o.head_dim, &token_bytes) && token_bytes <= kMaxTokenBytes,
                    fmt::format("num_kv_heads, head_dim: a token's K/V would take more than {} bytes per layer "
                                "(num_kv_heads = {}, head_dim = {})",
                                kMaxTokenBytes, o.num_kv_heads, o.head_dim));
  reset();
}

void HeteroKVCache::reset() {
  batch_ = 0;
  reserved_length_ = 0;
  quota_.clear();
  layers_.assign(options_.num_layers, Layer{});
  for (auto& layer : layers_) {
    layer.pools.assign(num_experts(), Pool{});
    layer.index.clear();
    layer.lengths = at::zeros({0, num_experts()}, at::kLong);
    layer.decode_counts = at::zeros({num_experts()}, at::kLong);
  }
}

void HeteroKVCache::check_layer(int64_t layer) const {
  TORCH_CHECK_INDEX(layer >= 0 && layer < options_.num_layers,
                    fmt::format("layer: must be in [0, {}), got {}: the cache was built for {} layer{} "
                                "(num_layers = {}); build it with one layer per attention layer of the model",
                                options_.num_layers, layer, options_.num_layers, options_.num_layers == 1 ? "" : "s",
                                options_.num_layers));
}

void HeteroKVCache::ensure_capacity(Pool& pool, int64_t expert, int64_t needed) {
  const int64_t old_capacity = capacity(pool);
  if (needed <= old_capacity) return;
  int64_t new_capacity = std::max({needed, static_cast<int64_t>(std::ceil(old_capacity * options_.growth)), kMinCapacity});
  if (options_.max_tokens > 0) new_capacity = std::min(new_capacity, std::max(needed, options_.max_tokens));
  const int64_t heads = options_.num_kv_heads / options_.group_sizes[expert];
  const auto opts = at::TensorOptions().dtype(options_.dtype).device(options_.device);
  Pool grown{at::zeros({batch_, heads, new_capacity, options_.head_dim}, opts),
             at::zeros({batch_, heads, new_capacity, options_.head_dim}, opts)};
  if (old_capacity > 0) {
    grown.keys.narrow(2, 0, old_capacity).copy_(pool.keys);
    grown.values.narrow(2, 0, old_capacity).copy_(pool.values);
  }
  pool = std::move(grown);
}

void HeteroKVCache::check_kv(const at::Tensor& t, const char* name, std::optional<c10::IntArrayRef> shape) const {
  const auto& o = options_;
  if (shape.has_value()) {
    TORCH_CHECK_VALUE(t.defined() && t.sizes().equals(*shape),
                      fmt::format("{}: expected shape {}, got {}", name, detail::shape_str(*shape),
                                  t.defined() ? detail::shape_str(t.sizes()) : "undefined"));
  } else {
    TORCH_CHECK_VALUE(t.defined() && t.dim() == 4 && t.size(2) == o.num_kv_heads && t.size(3) == o.head_dim,
                      fmt::format("{}: expected shape [B, L, {}, {}] (num_kv_heads, head_dim), got {}", name,
                                  o.num_kv_heads, o.head_dim, t.defined() ? detail::shape_str(t.sizes()) : "undefined"));
  }
  // Named after the cache, not the argument: from a layer, the mismatch is the cache's options against
  // the model's dtype / device.
  TORCH_CHECK_TYPE(t.scalar_type() == o.dtype,
                   fmt::format("cache: built for dtype {}, but the layer's K/V ({}) are {}; build the cache with "
                               "the model's dtype (e.g. from the layer's cache_options())",
                               dtype_name(o.dtype), name, dtype_name(t.scalar_type())));
  TORCH_CHECK_VALUE(t.device() == o.device,
                    fmt::format("cache: built for device {}, but the layer's K/V ({}) are on {}; build the cache on "
                                "the model's device (e.g. from the layer's cache_options())",
                                o.device.str(), name, t.device().str()));
}

HeteroKVCache::HostRouting HeteroKVCache::host_routing(int64_t B, int64_t L, const at::Tensor& expert_idx,
                                                        const std::optional<at::Tensor>& valid) const {
  const auto& o = options_;
  TORCH_CHECK_VALUE(batch_ == 0 || B == batch_,
                    fmt::format("keys: batch size {} does not match the cache's batch size {} (reset() or reorder() "
                                "to change it)", B, batch_));
  detail::check_expert_idx(expert_idx, {B, L}, num_experts(), o.device);
  // The placement is host work on small [B, L] tensors: one copy each instead of a sync per expert.
  HostRouting routing{expert_idx.to(at::kCPU, at::kLong).contiguous(), {}};
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK_VALUE(valid->dim() == 2 && valid->size(0) == B && valid->size(1) == L,
                      fmt::format("valid: expected shape [{}, {}], got {}", B, L, detail::shape_str(valid->sizes())));
    TORCH_CHECK_VALUE(valid->device() == o.device, fmt::format("valid: expected the cache device {}, got {}",
                                                               o.device.str(), valid->device().str()));
    routing.valid = valid->ne(0).to(at::kCPU).contiguous();
  } else {
    routing.valid = at::ones({B, L}, at::kBool);
  }
  return routing;
}

HeteroKVCache::Placement HeteroKVCache::place(int64_t layer, const HostRouting& routing,
                                              const std::optional<at::Tensor>& positions) {
  const auto& o = options_;
  const int64_t E = num_experts(), B = routing.expert_idx.size(0), L = routing.expert_idx.size(1);
  at::Tensor pos;
  if (positions.has_value() && positions->defined()) {
    const auto& p = *positions;
    TORCH_CHECK_TYPE(at::isIntegralType(p.scalar_type(), false),
                     fmt::format("positions: expected an integer dtype, got {}", dtype_name(p.scalar_type())));
    TORCH_CHECK_VALUE((p.dim() == 2 && p.size(0) == B && p.size(1) == L) || (p.dim() == 1 && p.size(0) == L),
                      fmt::format("positions: expected shape [{}, {}] or [{}], got {}", B, L, L,
                                  detail::shape_str(p.sizes())));
    pos = p.to(at::kCPU, at::kLong).expand({B, L}).contiguous();
  }

  // Stored state of the layer, or that of an empty batch of B sequences before the first append.
  const bool first = batch_ == 0;
  const auto& state = layers_[layer];
  const int64_t* ip = routing.expert_idx.const_data_ptr<int64_t>();
  const bool* vp = routing.valid.const_data_ptr<bool>();
  const int64_t* pp = pos.defined() ? pos.const_data_ptr<int64_t>() : nullptr;
  const int64_t* lp = first ? nullptr : state.lengths.const_data_ptr<int64_t>();
  // No tokens: nothing to place, nothing changes (the batch size is fixed by the first append that stores
  // something; sizing per-sequence state by an empty [B, 0] input could allocate without bound).
  if (B == 0 || L == 0) return {};
  Placement placement;
  placement.batch.resize(E), placement.token.resize(E), placement.slot.resize(E);
  placement.start.assign(B, 0), placement.new_tokens.assign(B, 0);
  std::vector<int64_t> wanted(E, 0), per_expert(E);
  const bool capped = o.kv_cap > 0.0 || !quota_.empty();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t stored = first ? 0 : state.index[b].size();
    int64_t next = first ? 0 : state.index[b].next_position();
    bool fresh = stored == 0;  // an empty sequence starts at the caller's first position
    int64_t units = 0;
    for (int64_t e = 0; e < E; ++e) {
      per_expert[e] = first ? 0 : lp[b * E + e];
      units += per_expert[e] * unit_of(e);
    }
    for (int64_t t = 0; t < L; ++t) {
      if (!vp[b * L + t]) continue;
      if (pp != nullptr) {
        const int64_t given = pp[b * L + t];
        TORCH_CHECK_VALUE(!fresh || given >= 0,
                          fmt::format("positions: must be >= 0, got {} at [{}, {}]; the cache is unchanged", given, b, t));
        TORCH_CHECK_VALUE(fresh || given == next,
                          fmt::format("positions: sequence {}'s tokens must continue its stored positions one by one "
                                      "(the cache keeps one start position per sequence), expected {} at [{}, {}], got "
                                      "{}; the cache is unchanged", b, next, b, t, given));
        next = given;
      }
      if (fresh) placement.start[b] = next;
      fresh = false;
      TORCH_CHECK_VALUE(next < std::numeric_limits<int32_t>::max(),
                        fmt::format("positions: must be below 2^31 - 1 (positions(layer) is int32), got {} in "
                                    "sequence {}; the cache is unchanged", next, b));
      const int64_t e = ip[b * L + t];
      TORCH_CHECK_VALUE(!capped || reserved_length_ == 0 || stored + placement.new_tokens[b] < reserved_length_,
                        fmt::format("keys: sequence {} would hold more than the {} tokens per sequence reserved in "
                                    "layer {} (reserve()); the cache is unchanged", b, reserved_length_, layer));
      TORCH_CHECK_VALUE(!capped || fits(per_expert, units, e),
                        fmt::format("expert_idx: token [{}, {}] at expert {} would take sequence {} past {} in layer "
                                    "{}; route with cap_routing() first; the cache is unchanged", b, t, e, b,
                                    o.kv_cap > 0.0 ? fmt::format("kv_cap = {}", o.kv_cap)
                                                   : std::string("its reserved pools"), layer));
      units += unit_of(e);
      placement.batch[e].push_back(b);
      placement.token[e].push_back(t);
      placement.slot[e].push_back(per_expert[e]++);
      placement.experts.push_back(e);
      ++placement.new_tokens[b];
      ++next;
    }
    if (stored > 0) placement.start[b] = state.index[b].start;
    const int64_t total = stored + placement.new_tokens[b];
    TORCH_CHECK_VALUE(o.max_tokens == 0 || total <= o.max_tokens,
                      fmt::format("keys: appending {} tokens would give a sequence {} tokens in layer {}, past "
                                  "max_tokens = {}; the cache is unchanged", L, total, layer, o.max_tokens));
    for (int64_t e = 0; e < E; ++e) wanted[e] = std::max(wanted[e], per_expert[e]);
  }
  if (first && B > 0) {
    batch_ = B;
    // Pools may survive from a batch that reorder() emptied; their batch dim is 0, so they must go
    // (found by tests/fuzz: the next append wrote through a null pool; corpus hetero_kv_cache 1000).
    const int bits = detail::expert_id_bits(E);
    for (auto& l : layers_) {
      l.lengths = at::zeros({B, E}, at::kLong);
      l.pools.assign(E, Pool{});
      l.index.assign(B, detail::ExpertStream(bits));
    }
  }
  for (int64_t e = 0; e < E; ++e) ensure_capacity(layers_[layer].pools[e], e, wanted[e]);
  return placement;
}

void HeteroKVCache::commit(Layer& state, const Placement& placement, bool decode) {
  const int64_t E = num_experts();
  int64_t* lp = state.lengths.mutable_data_ptr<int64_t>();
  size_t next = 0;
  for (int64_t b = 0; b < batch_; ++b) {
    auto& stream = state.index[b];
    if (stream.size() == 0) stream.start = placement.start[b];
    for (int64_t i = 0; i < placement.new_tokens[b]; ++i) {
      const int64_t e = placement.experts[next++];
      stream.push(e);
      ++lp[b * E + e];
    }
  }
  if (decode) {
    for (int64_t e = 0; e < E; ++e) state.decode_counts[e] += static_cast<int64_t>(placement.slot[e].size());
  }
}

namespace {
// Host vector -> int64 tensor on `device`.
at::Tensor index_tensor(const std::vector<int64_t>& v, c10::Device device) {
  return at::tensor(v, at::kLong).to(device);
}
}  // namespace

void HeteroKVCache::append(int64_t layer, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& expert_idx,
                           const std::optional<at::Tensor>& valid, std::optional<bool> decode,
                           const std::optional<at::Tensor>& positions) {
  check_layer(layer);
  const auto& o = options_;
  // Every check happens before the first write, so a rejected append leaves the cache as it was.
  check_kv(keys, "keys", std::nullopt);
  check_kv(values, "values", std::nullopt);
  TORCH_CHECK_VALUE(values.sizes().equals(keys.sizes()), fmt::format("values: expected the shape of keys {}, got {}",
                                                                     detail::shape_str(keys.sizes()),
                                                                     detail::shape_str(values.sizes())));
  const int64_t B = keys.size(0), L = keys.size(1), H = o.num_kv_heads, d = o.head_dim;
  const auto placement = place(layer, host_routing(B, L, expert_idx, valid), positions);
  if (placement.experts.empty()) return;
  auto& state = layers_[layer];
  if (o.device.is_cpu() && !o.portable_append) {
    // A decode step is a few hundred bytes per layer, so per-op overhead (not bandwidth) decides its
    // cost: plain loops that write each token's group means into its slot.
    const auto k = keys.contiguous(), v = values.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "hetero_kv_cache_append", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<acc_t> acc(d);
      auto write = [&](const scalar_t* src, at::Tensor& pool, int64_t b, int64_t slot, int64_t g) {
        scalar_t* base = pool.mutable_data_ptr<scalar_t>();
        const int64_t heads = H / g, cap = pool.size(2);
        for (int64_t c = 0; c < heads; ++c) {
          scalar_t* dst = base + ((b * heads + c) * cap + slot) * d;
          const scalar_t* row = src + c * g * d;
          if (g == 1) {
            std::copy(row, row + d, dst);
            continue;
          }
          for (int64_t i = 0; i < d; ++i) acc[i] = static_cast<acc_t>(row[i]);
          for (int64_t h = 1; h < g; ++h)
            for (int64_t i = 0; i < d; ++i) acc[i] += static_cast<acc_t>(row[h * d + i]);
          const acc_t inv = acc_t(1) / static_cast<acc_t>(g);
          for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(acc[i] * inv);
        }
      };
      for (int64_t e = 0; e < num_experts(); ++e) {
        auto& pool = state.pools[e];
        for (size_t i = 0; i < placement.slot[e].size(); ++i) {
          const int64_t b = placement.batch[e][i], t = placement.token[e][i], slot = placement.slot[e][i];
          write(k.const_data_ptr<scalar_t>() + (b * L + t) * H * d, pool.keys, b, slot, o.group_sizes[e]);
          write(v.const_data_ptr<scalar_t>() + (b * L + t) * H * d, pool.values, b, slot, o.group_sizes[e]);
        }
      }
    });
  } else {
    for (int64_t e = 0; e < num_experts(); ++e) {
      const int64_t n = static_cast<int64_t>(placement.slot[e].size());
      if (n == 0) continue;
      const int64_t g = o.group_sizes[e];
      const auto b_idx = index_tensor(placement.batch[e], o.device), t_idx = index_tensor(placement.token[e], o.device);
      const auto slot = index_tensor(placement.slot[e], o.device);
      // Mean over each group of g heads: exact for pooled K/V, the pooling itself for raw K/V.
      auto compact = [&](const at::Tensor& kv) { return kv.index({b_idx, t_idx}).view({n, H / g, g, d}).mean(2); };
      auto& pool = state.pools[e];
      pool.keys.permute({0, 2, 1, 3}).index_put_({b_idx, slot}, compact(keys));
      pool.values.permute({0, 2, 1, 3}).index_put_({b_idx, slot}, compact(values));
    }
  }
  commit(state, placement, decode.value_or(L == 1));
}

void HeteroKVCache::append_compact(int64_t layer, const std::vector<at::Tensor>& keys,
                                   const std::vector<at::Tensor>& values, const at::Tensor& expert_idx,
                                   const std::optional<at::Tensor>& valid, std::optional<bool> decode,
                                   const std::optional<at::Tensor>& positions) {
  check_layer(layer);
  const auto& o = options_;
  const int64_t E = num_experts(), d = o.head_dim;
  for (const auto& [list, name] : {std::pair{&keys, "keys"}, std::pair{&values, "values"}}) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(list->size()) == E,
                      fmt::format("{}: expected one tensor per expert ({}), got {}", name, E, list->size()));
  }
  TORCH_CHECK_VALUE(expert_idx.defined() && expert_idx.dim() == 2,
                    fmt::format("expert_idx: expected shape [B, L], got {}",
                                expert_idx.defined() ? detail::shape_str(expert_idx.sizes()) : "undefined"));
  const int64_t B = expert_idx.size(0), L = expert_idx.size(1);
  // place() grows the pools, so the K/V shapes are checked against the routing first: nothing may change
  // before every check has passed.
  const auto routing = host_routing(B, L, expert_idx, valid);
  std::vector<int64_t> counts(E, 0);
  const int64_t* ip = routing.expert_idx.const_data_ptr<int64_t>();
  const bool* vp = routing.valid.const_data_ptr<bool>();
  for (int64_t i = 0; i < B * L; ++i) counts[ip[i]] += vp[i] ? 1 : 0;
  for (int64_t e = 0; e < E; ++e) {
    const std::vector<int64_t> shape{counts[e], o.num_kv_heads / o.group_sizes[e], d};
    check_kv(keys[e], fmt::format("keys[{}]", e).c_str(), shape);
    check_kv(values[e], fmt::format("values[{}]", e).c_str(), shape);
  }
  const auto placement = place(layer, routing, positions);
  if (placement.experts.empty()) return;
  auto& state = layers_[layer];
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = static_cast<int64_t>(placement.slot[e].size());
    if (n == 0) continue;
    auto& pool = state.pools[e];
    if (o.device.is_cpu() && !o.portable_append) {
      // Row i ([h, d]) goes to slot placement.slot[e][i] of sequence placement.batch[e][i], head by head.
      const auto k = keys[e].contiguous(), v = values[e].contiguous();
      const int64_t heads = o.num_kv_heads / o.group_sizes[e], cap = pool.keys.size(2);
      const int64_t row_bytes = d * static_cast<int64_t>(k.element_size());
      for (auto [src, dst] : {std::pair{&k, &pool.keys}, std::pair{&v, &pool.values}}) {
        const auto* from = static_cast<const char*>(src->const_data_ptr());
        auto* to = static_cast<char*>(dst->mutable_data_ptr());
        for (int64_t i = 0; i < n; ++i) {
          const int64_t b = placement.batch[e][i], slot = placement.slot[e][i];
          for (int64_t c = 0; c < heads; ++c) {
            std::memcpy(to + ((b * heads + c) * cap + slot) * row_bytes, from + (i * heads + c) * row_bytes,
                        static_cast<size_t>(row_bytes));
          }
        }
      }
    } else {
      const auto b_idx = index_tensor(placement.batch[e], o.device), slot = index_tensor(placement.slot[e], o.device);
      pool.keys.permute({0, 2, 1, 3}).index_put_({b_idx, slot}, keys[e]);
      pool.values.permute({0, 2, 1, 3}).index_put_({b_idx, slot}, values[e]);
    }
  }
  commit(state, placement, decode.value_or(L == 1));
}

int64_t HeteroKVCache::stored_slots(const Layer& state, int64_t expert) const {
  const int64_t E = num_experts();
  const int64_t* lp = state.lengths.const_data_ptr<int64_t>();  // [B, E] int64, contiguous, CPU
  int64_t stored = 0;
  for (int64_t b = 0; b < batch_; ++b) stored = std::max(stored, lp[b * E + expert]);
  return stored;
}

std::vector<at::Tensor> HeteroKVCache::keys(int64_t layer) const {
  check_layer(layer);
  std::vector<at::Tensor> out;
  const auto& state = layers_[layer];
  for (int64_t e = 0; e < num_experts(); ++e) {
    const auto& pool = state.pools[e];
    const int64_t stored = stored_slots(state, e);
    const int64_t heads = options_.num_kv_heads / options_.group_sizes[e];
    out.push_back(pool.keys.defined()
                      ? pool.keys.narrow(2, 0, stored)
                      : at::empty({batch_, heads, 0, options_.head_dim},
                                  at::TensorOptions().dtype(options_.dtype).device(options_.device)));
  }
  return out;
}

std::vector<at::Tensor> HeteroKVCache::values(int64_t layer) const {
  auto out = keys(layer);
  const auto& state = layers_[layer];
  for (int64_t e = 0; e < num_experts(); ++e) {
    if (state.pools[e].values.defined()) out[e] = state.pools[e].values.narrow(2, 0, out[e].size(2));
  }
  return out;
}

std::vector<at::Tensor> HeteroKVCache::positions(int64_t layer) const {
  check_layer(layer);
  const auto& state = layers_[layer];
  const int64_t E = num_experts();
  std::vector<at::Tensor> host(E);
  std::vector<int32_t*> out(E);
  for (int64_t e = 0; e < E; ++e) {
    host[e] = at::zeros({batch_, stored_slots(state, e)}, at::kInt);
    out[e] = host[e].mutable_data_ptr<int32_t>();
  }
  // Walk each sequence's expert ids in position order: the i-th token went to the next free slot of its pool.
  std::vector<int64_t> slot(E);
  for (int64_t b = 0; b < batch_; ++b) {
    const auto& stream = state.index[b];
    std::fill(slot.begin(), slot.end(), 0);
    for (int64_t i = 0; i < stream.size(); ++i) {
      const int64_t e = stream.get(i);
      out[e][b * host[e].size(1) + slot[e]++] = static_cast<int32_t>(stream.start + i);
    }
  }
  for (auto& t : host) t = t.to(options_.device);
  return host;
}

at::Tensor HeteroKVCache::next_positions(int64_t layer) const {
  check_layer(layer);
  auto out = at::zeros({batch_}, at::kLong);
  for (int64_t b = 0; b < batch_; ++b) out[b] = layers_[layer].index[b].next_position();
  return out;
}

at::Tensor HeteroKVCache::lengths(int64_t layer) const {
  check_layer(layer);
  return layers_[layer].lengths.clone();
}

at::Tensor HeteroKVCache::seq_lengths(int64_t layer) const {
  check_layer(layer);
  return layers_[layer].lengths.sum(1);
}

int64_t HeteroKVCache::max_seq_length(int64_t layer) const {
  check_layer(layer);
  const int64_t E = num_experts();
  const int64_t* lp = layers_[layer].lengths.const_data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < batch_; ++b) {
    int64_t total = 0;
    for (int64_t e = 0; e < E; ++e) total += lp[b * E + e];
    longest = std::max(longest, total);
  }
  return longest;
}

void HeteroKVCache::reorder(const at::Tensor& beam_idx) {
  TORCH_CHECK_VALUE(beam_idx.defined() && beam_idx.dim() == 1,
                    fmt::format("beam_idx: expected a 1-D index tensor, got shape {}",
                                beam_idx.defined() ? detail::shape_str(beam_idx.sizes()) : "undefined"));
  TORCH_CHECK_TYPE(at::isIntegralType(beam_idx.scalar_type(), false),
                   fmt::format("beam_idx: expected an integer dtype, got {}", c10::toString(beam_idx.scalar_type())));
  if (batch_ == 0) return;
  const auto idx = beam_idx.to(at::kLong).to(at::kCPU).contiguous();
  if (idx.numel() > 0) {
    const auto [lo, hi] = at::aminmax(idx);
    TORCH_CHECK_INDEX(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < batch_,
                      fmt::format("beam_idx: values must be in [0, {}) (the batch size), got values in [{}, {}]", batch_,
                                  lo.item<int64_t>(), hi.item<int64_t>()));
  }
  const auto on_device = idx.to(options_.device);
  for (auto& layer : layers_) {
    for (auto& pool : layer.pools) {
      if (!pool.keys.defined()) continue;
      pool.keys = pool.keys.index_select(0, on_device);
      pool.values = pool.values.index_select(0, on_device);
    }
    std::vector<detail::ExpertStream> index;
    index.reserve(static_cast<size_t>(idx.size(0)));
    for (int64_t i = 0; i < idx.size(0); ++i) index.push_back(layer.index[idx.const_data_ptr<int64_t>()[i]]);
    layer.index = std::move(index);
    layer.lengths = layer.lengths.index_select(0, idx);
  }
  batch_ = idx.size(0);
}

void HeteroKVCache::crop(int64_t length) {
  TORCH_CHECK_VALUE(length >= 0, fmt::format("length: must be >= 0, got {}", length));
  const int64_t E = num_experts();
  for (auto& layer : layers_) {
    int64_t* lp = layer.lengths.mutable_data_ptr<int64_t>();
    for (int64_t b = 0; b < batch_; ++b) {
      auto& stream = layer.index[b];
      const int64_t keep = std::clamp<int64_t>(length - stream.start, 0, stream.size());
      // Each pool keeps a prefix (slots are filled in position order): the dropped tokens are the last ones.
      for (int64_t i = keep; i < stream.size(); ++i) --lp[b * E + stream.get(i)];
      stream.truncate(keep);
    }
  }
}

void HeteroKVCache::shrink_to_fit() {
  for (auto& layer : layers_) {
    for (int64_t e = 0; e < num_experts(); ++e) {
      auto& pool = layer.pools[e];
      if (!pool.keys.defined()) continue;
      const int64_t stored = layer.lengths.select(1, e).max().item<int64_t>();
      if (stored == 0) {
        pool = Pool{};
        continue;
      }
      pool.keys = pool.keys.narrow(2, 0, stored).clone();
      pool.values = pool.values.narrow(2, 0, stored).clone();
    }
    for (auto& stream : layer.index) stream.shrink_to_fit();
  }
}

int64_t HeteroKVCache::bytes_allocated() const {
  int64_t bytes = 0;
  for (const auto& layer : layers_) {
    for (const auto& pool : layer.pools) {
      if (!pool.keys.defined()) continue;
      bytes += pool.keys.nbytes() + pool.values.nbytes();
    }
    for (const auto& stream : layer.index) bytes += stream.bytes_allocated() + static_cast<int64_t>(sizeof(stream));
    bytes += layer.lengths.nbytes();
  }
  return bytes;
}

int64_t HeteroKVCache::bytes_stored() const {
  int64_t bytes = 0;
  const int64_t elem = c10::elementSize(options_.dtype);
  for (const auto& layer : layers_) {
    if (batch_ == 0) continue;
    const auto per_expert = layer.lengths.sum(0);
    for (int64_t e = 0; e < num_experts(); ++e) {
      const int64_t heads = options_.num_kv_heads / options_.group_sizes[e];
      bytes += per_expert[e].item<int64_t>() * 2 * heads * options_.head_dim * elem;
    }
    for (const auto& stream : layer.index) bytes += stream.bytes_stored();
  }
  return bytes;
}

int64_t HeteroKVCache::stored_tokens() const {
  return batch_ == 0 ? 0 : layers_.front().lengths.sum().item<int64_t>();
}

double HeteroKVCache::stored_bytes_per_token() const {
  const int64_t tokens = stored_tokens();
  return tokens == 0 ? 0.0 : static_cast<double>(bytes_stored()) / static_cast<double>(tokens);
}

double HeteroKVCache::allocated_bytes_per_token() const {
  const int64_t tokens = stored_tokens();
  return tokens == 0 ? 0.0 : static_cast<double>(bytes_allocated()) / static_cast<double>(tokens);
}

int64_t HeteroKVCache::index_bits_per_token() const {
  return options_.num_layers * detail::expert_id_bits(num_experts());
}

int64_t HeteroKVCache::full_bytes_per_token() const {
  return options_.num_layers * 2 * options_.num_kv_heads * options_.head_dim * c10::elementSize(options_.dtype);
}

at::Tensor HeteroKVCache::token_counts(int64_t layer) const {
  check_layer(layer);
  return batch_ == 0 ? at::zeros({num_experts()}, at::kLong) : layers_[layer].lengths.sum(0);
}

at::Tensor HeteroKVCache::decode_ratios(int64_t layer) const {
  at::Tensor counts;
  if (layer < 0) {
    counts = at::zeros({num_experts()}, at::kLong);
    for (const auto& l : layers_) counts += l.decode_counts;
  } else {
    check_layer(layer);
    counts = layers_[layer].decode_counts;
  }
  const auto total = counts.sum().item<int64_t>();
  return total == 0 ? at::zeros({num_experts()}, at::kDouble) : counts.to(at::kDouble) / static_cast<double>(total);
}

}  // namespace mixsga
