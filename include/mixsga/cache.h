#pragma once
/// HeteroKVCache: the inference KV cache of mixSGA. A token routed to expert e is stored with only
/// Hkv / g_e KV heads (never expanded), in per-layer, per-expert compact pools.

#include <ATen/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "mixsga/detail/expert_stream.h"

namespace mixsga {

/// Options of HeteroKVCache.
struct HeteroKVCacheOptions {
  /// Number of attention layers that store into this cache, in [1, 2^20].
  int64_t num_layers = 1;
  /// Hkv: base KV heads of the model.
  int64_t num_kv_heads = 1;
  /// d: head dim.
  int64_t head_dim = 64;
  /// Group size per expert, finest first (e.g. {1, 2, 4}); each divides num_kv_heads.
  std::vector<int64_t> group_sizes{1, 2, 4};
  /// dtype and device of the stored K/V.
  c10::ScalarType dtype = c10::kFloat;
  c10::Device device = c10::kCPU;
  /// Most tokens one sequence may hold per layer (0 = unlimited). Appending past it is an error and
  /// leaves the cache as it was.
  int64_t max_tokens = 0;
  /// Capacity growth factor of a pool that runs out of room (amortised O(1) appends). >= 1.
  double growth = 1.5;
  /// Hard per-sequence cap on the stored K/V, as a share of the full K/V (0 = no cap, the default; else in
  /// [1/g_max, 1], what the group sizes can reach). With a cap, every prefix of every sequence stores, in each
  /// layer, at most kv_cap * its tokens * a full token's K/V. The attention layers route through
  /// cap_routing() before projecting K/V, which moves tokens to coarser experts where the cap requires it;
  /// append() and append_compact() refuse routing that would break the cap (an error, nothing stored).
  double kv_cap = 0.0;
  /// Append through ATen ops only (the path non-CPU devices take) even on CPU; for testing that path.
  bool portable_append = false;
};

/// Per-layer, per-expert compact K/V pools.
///
/// Layout of layer l, expert e: keys(l)[e] and values(l)[e] are [B, Hkv/g_e, T_e, d] views of pools
/// with capacity >= T_e = max_b lengths(l)[b, e]; sequence b's tokens of expert e are the first
/// lengths(l)[b, e] slots, in position order. Padding tokens are never stored. Keys are stored after RoPE.
///
/// Positions belong to the caller (append's `positions`, by default each sequence's next ones) and the
/// cache keeps them compactly: a sequence's stored tokens have consecutive positions start, start + 1, ...
/// in each layer, so the index is one start per sequence plus each token's expert id in ceil(log2 E) bits
/// (2 bits for 3 experts). positions(l) rebuilds every slot's position from it.
///
/// Memory: a token of expert e costs 2 * (Hkv/g_e) * d * elem_size bytes of K/V plus ceil(log2 E) bits
/// of index per layer (index_bits_per_token() over all layers). Two quantities, two names:
///  - *stored*: bytes_stored() counts exactly that (index bits rounded up to whole bytes per sequence and
///    layer); stored_bytes_per_token() (= bytes_per_token()) divides it by the stored tokens, the figure to
///    compare with full_bytes_per_token();
///  - *allocated*: bytes_allocated() (= bytes_used()) counts what the pools hold in memory, which exceeds
///    the stored bytes by the growth slack (at most a factor `growth` + 16 slots per pool) and, for
///    batch > 1, by the difference between the longest and each sequence of a pool (pools are
///    rectangular over the batch); allocated_bytes_per_token() divides it by the stored tokens.
/// shrink_to_fit() removes the growth slack.
class HeteroKVCache {
 public:
  explicit HeteroKVCache(HeteroKVCacheOptions options);

  /// The routing `expert_idx` [B, L] (integer, values in [0, E)) adjusted to kv_cap and to reserved pools,
  /// for the tokens about to be appended to `layer` (the attention layers call it before projecting K/V).
  /// Each sequence's valid tokens are taken in order, counting from what `layer` already stores: a token
  /// keeps its expert while the sequence's running K/V stays within kv_cap (and the expert's reserved pool
  /// has room); otherwise it goes to the nearest coarser expert that fits, or, when reserved coarser pools
  /// are full, the nearest finer one (reserve() sizes the pools so that one always fits). Causal: a token's
  /// expert depends only on the tokens before it. Without a cap or reservation returns expert_idx itself;
  /// otherwise a new [B, L] int64 tensor on expert_idx's device. `valid`: optional [B, L] mask (padding
  /// is not stored, so it does not count). Changes nothing in the cache.
  at::Tensor cap_routing(int64_t layer, const at::Tensor& expert_idx,
                         const std::optional<at::Tensor>& valid = std::nullopt) const;

  /// Allocates every layer's pools once, for `batch` sequences of at most `max_length` tokens each, so that
  /// appends never reallocate and the allocated K/V pools stay within kv_cap (which must be set) of the
  /// full K/V of max_length tokens. Expert e < E-1 gets floor(ratios[e] * max_length) slots per sequence,
  /// the coarsest expert the rest; cap_routing() keeps each sequence within those quotas. `ratios`: [E],
  /// >= 0, summing to 1, whose KV budget sum_e ratios[e] / g_e is at most kv_cap (e.g. the layer's ratios,
  /// or mixsga::nn::ratios_for_budget(group_sizes, ratios, kv_cap)). The cache must be empty; the batch
  /// size is fixed to `batch`; appending past max_length tokens is an error; reset() drops the reservation.
  void reserve(int64_t batch, int64_t max_length, const std::vector<double>& ratios);
  /// Tokens per sequence the pools are reserved for (0: not reserved).
  int64_t reserved_length() const { return reserved_length_; }
  /// The most bytes_stored() can reach with `batch` sequences of `max_length` tokens in every layer, for
  /// planning memory: the K/V of max_length full tokens times kv_cap (rounded down to what the group sizes
  /// can store; times 1 without a cap) plus the index bits, per sequence and layer. After reserve() for
  /// the same batch and length, the reserved pools' K/V bytes are at most this figure's K/V part.
  int64_t worst_case_bytes(int64_t max_length, int64_t batch = 1) const;

  /// Appends tokens of one layer, given at the full Hkv heads (the prefill path: the layer formed them
  /// for attention anyway).
  /// @param layer      in [0, num_layers).
  /// @param keys       [B, L, Hkv, d] per-token K (after RoPE); a token of expert e is stored as the mean
  ///                   of each group of g_e heads (exact for K from grouped_kv_proj, whose groups are equal).
  /// @param values     [B, L, Hkv, d] per-token V.
  /// @param expert_idx [B, L] integer expert per token.
  /// @param valid      optional [B, L] mask; tokens with 0 are not stored (padding).
  /// @param decode     count these tokens in the decode routing statistics (default: L == 1).
  /// @param positions  optional [B, L] or [L] integer position of each token (any device); default: each
  ///                   sequence continues from next_positions(). A sequence's valid tokens must continue
  ///                   its stored positions one by one (an empty sequence may start anywhere >= 0).
  /// Errors (nothing is stored): keys / values of another dtype or device than the cache's, or not
  /// [B, L, num_kv_heads, head_dim]; a batch size other than the one fixed by the first append; a layer
  /// outside [0, num_layers); more than max_tokens tokens in a sequence; positions that do not continue.
  /// The first append that holds a token (B, L > 0) fixes the batch size B until reset(); an append of
  /// no tokens changes nothing.
  void append(int64_t layer, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& expert_idx,
              const std::optional<at::Tensor>& valid = std::nullopt, std::optional<bool> decode = std::nullopt,
              const std::optional<at::Tensor>& positions = std::nullopt);

  /// Appends tokens of one layer given at their compact size, never expanded to Hkv heads (the decode and
  /// chunk path; see mixsga::nn::SharedGroupKV::forward_compact).
  /// @param keys, values E tensors [N_e, Hkv/g_e, d]: the valid tokens of expert e (expert_idx == e, valid
  ///                     != 0) in batch-major order (sequence 0's first, each sequence's in token order).
  /// Other arguments and errors as append(); N_e must match expert_idx and valid.
  void append_compact(int64_t layer, const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                      const at::Tensor& expert_idx, const std::optional<at::Tensor>& valid = std::nullopt,
                      std::optional<bool> decode = std::nullopt,
                      const std::optional<at::Tensor>& positions = std::nullopt);

  /// [B, Hkv/g_e, T_e, d] views of the stored keys / values of `layer`, one per expert.
  std::vector<at::Tensor> keys(int64_t layer) const;
  std::vector<at::Tensor> values(int64_t layer) const;
  /// [B, T_e] int32 positions of the stored tokens, one per expert, rebuilt from the index on the host and
  /// copied to the cache's device (slots past a sequence's length hold 0).
  std::vector<at::Tensor> positions(int64_t layer) const;
  /// [B] int64 position each sequence's next token gets by default: its last stored position + 1 (0 for
  /// an empty sequence).
  at::Tensor next_positions(int64_t layer = 0) const;
  /// [B, E] int64 tokens stored per sequence and expert.
  at::Tensor lengths(int64_t layer) const;
  /// [B] int64 tokens stored per sequence in `layer`.
  at::Tensor seq_lengths(int64_t layer = 0) const;
  /// Tokens stored per sequence in layer 0, or 0 before the first append.
  int64_t max_seq_length(int64_t layer = 0) const;
  /// Batch size fixed by the first append (0 before).
  int64_t batch_size() const { return batch_; }

  /// Beam search: keeps sequences beam_idx[i] as the new sequence i ([B'] int64, values in [0, B)).
  void reorder(const at::Tensor& beam_idx);
  /// Drops every token at position >= length (all layers).
  void crop(int64_t length);
  /// Empties the cache (keeps nothing allocated).
  void reset();
  /// Reallocates every pool to exactly the stored length (removes growth slack).
  void shrink_to_fit();

  /// Bytes allocated for K/V pools and indexes (growth slack and batch padding included).
  int64_t bytes_allocated() const;
  /// The same as bytes_allocated() (its older name).
  int64_t bytes_used() const { return bytes_allocated(); }
  /// Bytes the stored tokens need: sum over tokens and layers of 2 * (Hkv/g_e) * d * elem_size, plus the
  /// expert ids (index_bits_per_token() / num_layers bits a token) rounded up to bytes per sequence and layer.
  int64_t bytes_stored() const;
  /// bytes_stored() / stored tokens: the compact bytes one token costs over all layers (0 when empty).
  /// Tokens are counted per layer (layer 0), summed over the batch.
  double stored_bytes_per_token() const;
  /// bytes_allocated() / stored tokens (0 when empty): what a token costs in memory right now, growth
  /// slack included; on a short prompt whose pools just grew it can exceed full_bytes_per_token().
  double allocated_bytes_per_token() const;
  /// stored_bytes_per_token() (the figure MixSGACache.bytes_per_token() gives in Python too).
  double bytes_per_token() const { return stored_bytes_per_token(); }
  /// Index bits one token costs over all layers: num_layers * ceil(log2 E) (e.g. 32 for 16 layers of 3
  /// experts: 4 bytes a token, next to 32,768 of fp32 K/V for Llama-3.2-1B).
  int64_t index_bits_per_token() const;
  /// Per-token bytes of an uncompressed cache of the same model: 2 * Hkv * d * elem_size per layer.
  int64_t full_bytes_per_token() const;
  /// [E] int64 tokens stored per expert in `layer` (summed over the batch).
  at::Tensor token_counts(int64_t layer) const;
  /// [E] float64 realised expert ratios of the tokens appended as decode steps in `layer`
  /// (or over all layers when layer < 0); zeros before any decode step.
  at::Tensor decode_ratios(int64_t layer = -1) const;

  const HeteroKVCacheOptions& options() const { return options_; }
  int64_t num_experts() const { return static_cast<int64_t>(options_.group_sizes.size()); }

 private:
  struct Pool {
    at::Tensor keys, values;  // [B, Hkv/g, capacity, d]
  };
  struct Layer {
    std::vector<Pool> pools;                   // one per expert
    std::vector<detail::ExpertStream> index;   // one per sequence: start position + expert ids
    at::Tensor lengths;                        // [B, E] int64 (CPU)
    at::Tensor decode_counts;                  // [E] int64 (CPU)
  };
  // Where an append puts each valid token, worked out on the host before anything is written.
  struct Placement {
    std::vector<std::vector<int64_t>> batch, token, slot;  // per expert, batch-major token order
    std::vector<int64_t> start;                            // per sequence: position of its first new token
    std::vector<int64_t> experts;                          // every valid token's expert, batch-major
    std::vector<int64_t> new_tokens;                       // per sequence
  };

  // expert_idx and the valid mask of an append, checked and copied to the host ([B, L] int64 / bool).
  struct HostRouting {
    at::Tensor expert_idx, valid;
  };

  void check_layer(int64_t layer) const;
  // The cap in integer units: a token of expert e takes lcm(group sizes) / g_e units; n tokens may take at
  // most cap_units(n) (all of them without a cap).
  int64_t unit_of(int64_t expert) const;
  int64_t cap_units(int64_t tokens) const;
  // Whether a sequence that holds counts[e] tokens of each expert (`units` cap units in all) may store one
  // more token of `expert`: within the cap and, when reserved, within the expert's quota.
  bool fits(const std::vector<int64_t>& counts, int64_t units, int64_t expert) const;
  HostRouting host_routing(int64_t B, int64_t L, const at::Tensor& expert_idx,
                           const std::optional<at::Tensor>& valid) const;
  // Checks positions and max_tokens against the layer's stored tokens, fixes the batch size on the first
  // append and grows the pools; throws before anything changes.
  Placement place(int64_t layer, const HostRouting& routing, const std::optional<at::Tensor>& positions);
  void commit(Layer& state, const Placement& placement, bool decode);
  void check_kv(const at::Tensor& t, const char* name, std::optional<c10::IntArrayRef> shape) const;
  void ensure_capacity(Pool& pool, int64_t expert, int64_t needed);
  int64_t capacity(const Pool& pool) const { return pool.keys.defined() ? pool.keys.size(2) : 0; }
  // max over sequences of lengths[b, e]: the filled prefix of expert e's pools (read on the host, no
  // tensor ops: the decode path asks for it every step).
  int64_t stored_slots(const Layer& state, int64_t expert) const;
  int64_t stored_tokens() const;

  HeteroKVCacheOptions options_;
  int64_t batch_ = 0;
  int64_t unit_lcm_ = 1;             // lcm of the group sizes
  int64_t reserved_length_ = 0;      // reserve()'s max_length (0: pools grow as needed)
  std::vector<int64_t> quota_;       // reserve()'s slots per sequence and expert (empty: no quotas)
  std::vector<Layer> layers_;
};

}  // namespace mixsga
