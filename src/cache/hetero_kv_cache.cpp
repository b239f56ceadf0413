#include "mixsga/cache.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <string>

#include "ops/validation.h"

namespace mixsga {

namespace {
constexpr int64_t kIndexBytesPerToken = sizeof(int32_t);  // the stored position
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
  layers_.assign(options_.num_layers, Layer{});
  for (auto& layer : layers_) {
    layer.pools.assign(num_experts(), Pool{});
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
             at::zeros({batch_, heads, new_capacity, options_.head_dim}, opts),
             at::zeros({batch_, new_capacity}, opts.dtype(at::kInt))};
  if (old_capacity > 0) {
    grown.keys.narrow(2, 0, old_capacity).copy_(pool.keys);
    grown.values.narrow(2, 0, old_capacity).copy_(pool.values);
    grown.positions.narrow(1, 0, old_capacity).copy_(pool.positions);
  }
  pool = std::move(grown);
}

void HeteroKVCache::append(int64_t layer, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& expert_idx,
                           const std::optional<at::Tensor>& valid, std::optional<bool> decode) {
  check_layer(layer);
  const auto& o = options_;
  const int64_t E = num_experts();
  // Every check happens before the first write, so a rejected append leaves the cache as it was.
  for (const auto& [t, name] : {std::pair{&keys, "keys"}, std::pair{&values, "values"}}) {
    TORCH_CHECK_VALUE(t->defined() && t->dim() == 4 && t->size(2) == o.num_kv_heads && t->size(3) == o.head_dim,
                      fmt::format("{}: expected shape [B, L, {}, {}] (num_kv_heads, head_dim), got {}", name, o.num_kv_heads,
                                  o.head_dim, t->defined() ? detail::shape_str(t->sizes()) : "undefined"));
    // Named after the cache, not the argument: from a layer, the mismatch is the cache's options
    // against the model's dtype / device.
    TORCH_CHECK_TYPE(t->scalar_type() == o.dtype,
                     fmt::format("cache: built for dtype {}, but the layer's K/V ({}) are {}; build the cache with "
                                 "the model's dtype (e.g. from the layer's cache_options())",
                                 dtype_name(o.dtype), name, dtype_name(t->scalar_type())));
    TORCH_CHECK_VALUE(t->device() == o.device,
                      fmt::format("cache: built for device {}, but the layer's K/V ({}) are on {}; build the cache on "
                                  "the model's device (e.g. from the layer's cache_options())",
                                  o.device.str(), name, t->device().str()));
  }
  TORCH_CHECK_VALUE(values.sizes().equals(keys.sizes()), fmt::format("values: expected the shape of keys {}, got {}",
                                                                     detail::shape_str(keys.sizes()),
                                                                     detail::shape_str(values.sizes())));
  const int64_t B = keys.size(0), L = keys.size(1);
  TORCH_CHECK_VALUE(batch_ == 0 || B == batch_,
                    fmt::format("keys: batch size {} does not match the cache's batch size {} (reset() or reorder() "
                                "to change it)", B, batch_));
  detail::check_expert_idx(expert_idx, {B, L}, E, o.device);
  at::Tensor is_valid;
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK_VALUE(valid->dim() == 2 && valid->size(0) == B && valid->size(1) == L,
                      fmt::format("valid: expected shape [{}, {}], got {}", B, L, detail::shape_str(valid->sizes())));
    TORCH_CHECK_VALUE(valid->device() == o.device, fmt::format("valid: expected the cache device {}, got {}",
                                                               o.device.str(), valid->device().str()));
    is_valid = valid->ne(0);
  } else {
    is_valid = at::ones({B, L}, at::TensorOptions().dtype(at::kBool).device(o.device));
  }
  if (batch_ == 0) {
    batch_ = B;
    // Pools may survive from a batch that reorder() emptied; their batch dim is 0, so they must go
    // (found by tests/fuzz: the next append wrote through a null pool; corpus hetero_kv_cache 1000).
    for (auto& l : layers_) {
      l.lengths = at::zeros({B, E}, at::kLong);
      l.pools.assign(E, Pool{});
    }
  }
  auto& state = layers_[layer];
  const auto idx = expert_idx.to(at::kLong);
  const auto seq_before = state.lengths.sum(1);                       // [B] CPU
  const auto valid_counts = is_valid.sum(1).to(at::kCPU);            // [B]
  if (o.max_tokens > 0 && B > 0) {
    const auto after = seq_before + valid_counts;
    const int64_t worst = after.max().item<int64_t>();
    TORCH_CHECK_VALUE(worst <= o.max_tokens,
                      fmt::format("keys: appending {} tokens would give a sequence {} tokens in layer {}, past "
                                  "max_tokens = {}; the cache is unchanged", L, worst, layer, o.max_tokens));
  }
  if (B == 0 || L == 0) return;
  if (o.device.is_cpu() && !o.portable_append) {
    append_cpu(state, keys, values, idx, is_valid, decode.value_or(L == 1));
    return;
  }

  // Position of each new token in its sequence: tokens already stored + valid tokens before it.
  const auto positions = (seq_before.to(o.device).unsqueeze(1) + is_valid.to(at::kLong).cumsum(1) - 1).to(at::kInt);
  auto lengths = state.lengths.clone();
  std::vector<at::Tensor> counts(E);
  for (int64_t e = 0; e < E; ++e) counts[e] = (is_valid & idx.eq(e)).sum(1).to(at::kCPU);
  for (int64_t e = 0; e < E; ++e) {
    const auto mine = is_valid & idx.eq(e);                          // [B, L]
    const int64_t n_new = counts[e].sum().item<int64_t>();
    if (n_new == 0) continue;
    auto& pool = state.pools[e];
    const auto new_lengths = lengths.select(1, e) + counts[e];
    ensure_capacity(pool, e, new_lengths.max().item<int64_t>());
    const int64_t g = o.group_sizes[e], heads = o.num_kv_heads / g;
    const auto where = mine.nonzero();                               // [n_new, 2]: (b, t)
    const auto b_idx = where.select(1, 0), t_idx = where.select(1, 1);
    const auto slot = (lengths.select(1, e).to(o.device).unsqueeze(1) + mine.to(at::kLong).cumsum(1) - 1)
                          .index({b_idx, t_idx});
    // Mean over each group of g heads: exact for pooled K/V, the pooling itself for raw K/V.
    auto compact = [&](const at::Tensor& kv) {
      return kv.index({b_idx, t_idx}).view({n_new, heads, g, o.head_dim}).mean(2);
    };
    pool.keys.permute({0, 2, 1, 3}).index_put_({b_idx, slot}, compact(keys));
    pool.values.permute({0, 2, 1, 3}).index_put_({b_idx, slot}, compact(values));
    pool.positions.index_put_({b_idx, slot}, positions.index({b_idx, t_idx}));
    lengths.select(1, e).copy_(new_lengths);
  }
  state.lengths = lengths;
  if (decode.value_or(L == 1)) {
    for (int64_t e = 0; e < E; ++e) state.decode_counts[e] += counts[e].sum();
  }
}

// The CPU path of append: one pass to count, one to copy. A decode step is a few hundred bytes
// per layer, so per-op overhead (not bandwidth) decides its cost; this keeps it to plain loops.
void HeteroKVCache::append_cpu(Layer& state, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& idx,
                               const at::Tensor& is_valid, bool decode) {
  const auto& o = options_;
  const int64_t B = keys.size(0), L = keys.size(1), E = num_experts(), d = o.head_dim, H = o.num_kv_heads;
  const auto idx_c = idx.contiguous();
  const auto valid_c = is_valid.contiguous();
  const int64_t* ip = idx_c.const_data_ptr<int64_t>();
  const bool* vp = valid_c.const_data_ptr<bool>();
  auto lengths = state.lengths.clone();
  int64_t* lp = lengths.mutable_data_ptr<int64_t>();
  std::vector<int64_t> seq_before(B, 0), wanted(E, 0), new_counts(E, 0);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> per_expert(lp + b * E, lp + (b + 1) * E);
    for (int64_t e = 0; e < E; ++e) seq_before[b] += per_expert[e];
    for (int64_t t = 0; t < L; ++t)
      if (vp[b * L + t]) ++per_expert[ip[b * L + t]];
    for (int64_t e = 0; e < E; ++e) wanted[e] = std::max(wanted[e], per_expert[e]);
  }
  for (int64_t e = 0; e < E; ++e) ensure_capacity(state.pools[e], e, wanted[e]);

  const auto k = keys.contiguous(), v = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "hetero_kv_cache_append", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> acc(d);
    // Writes the group means of token row `src` [H, d] into slot `slot` of a [B, H/g, cap, d] pool.
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
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp_ = v.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      int64_t position = seq_before[b];
      for (int64_t t = 0; t < L; ++t) {
        if (!vp[b * L + t]) continue;
        const int64_t e = ip[b * L + t], g = o.group_sizes[e];
        auto& pool = state.pools[e];
        const int64_t slot = lp[b * E + e]++;
        write(kp + (b * L + t) * H * d, pool.keys, b, slot, g);
        write(vp_ + (b * L + t) * H * d, pool.values, b, slot, g);
        pool.positions.mutable_data_ptr<int32_t>()[b * pool.positions.size(1) + slot] = static_cast<int32_t>(position++);
        ++new_counts[e];
      }
    }
  });
  state.lengths = lengths;
  if (decode) {
    for (int64_t e = 0; e < E; ++e) state.decode_counts[e] += new_counts[e];
  }
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
  const auto k = keys(layer);
  const auto& state = layers_[layer];
  std::vector<at::Tensor> out;
  for (int64_t e = 0; e < num_experts(); ++e) {
    out.push_back(state.pools[e].positions.defined()
                      ? state.pools[e].positions.narrow(1, 0, k[e].size(2))
                      : at::empty({batch_, 0}, at::TensorOptions().dtype(at::kInt).device(options_.device)));
  }
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
  const auto idx = beam_idx.to(at::kLong).to(at::kCPU);
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
      pool.positions = pool.positions.index_select(0, on_device);
    }
    layer.lengths = layer.lengths.index_select(0, idx);
  }
  batch_ = idx.size(0);
}

void HeteroKVCache::crop(int64_t length) {
  TORCH_CHECK_VALUE(length >= 0, fmt::format("length: must be >= 0, got {}", length));
  if (batch_ == 0) return;
  for (auto& layer : layers_) {
    for (int64_t e = 0; e < num_experts(); ++e) {
      auto& pool = layer.pools[e];
      if (!pool.keys.defined()) continue;
      // Slots are filled in position order, so the kept tokens are a prefix of each pool row.
      const auto slots = at::arange(capacity(pool), at::TensorOptions().dtype(at::kLong).device(options_.device));
      const auto stored = slots.unsqueeze(0) < layer.lengths.select(1, e).to(options_.device).unsqueeze(1);
      const auto kept = (stored & (pool.positions < length)).sum(1).to(at::kCPU);
      layer.lengths.select(1, e).copy_(kept);
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
      pool.positions = pool.positions.narrow(1, 0, stored).clone();
    }
  }
}

int64_t HeteroKVCache::bytes_allocated() const {
  int64_t bytes = 0;
  for (const auto& layer : layers_) {
    for (const auto& pool : layer.pools) {
      if (!pool.keys.defined()) continue;
      bytes += pool.keys.nbytes() + pool.values.nbytes() + pool.positions.nbytes();
    }
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
      bytes += per_expert[e].item<int64_t>() * (2 * heads * options_.head_dim * elem + kIndexBytesPerToken);
    }
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
