#pragma once
/// ExpertStream: the index HeteroKVCache keeps per sequence and layer, in place of a position per token.
///
/// A sequence's stored tokens have consecutive positions start, start + 1, ...; which pool each one went
/// to is its expert id, packed in ceil(log2 E) bits (2 bits for the paper's 3 experts, 0 for one
/// expert). From that the cache recovers every slot's position (for attention over a chunk) and how
/// many tokens of each pool lie before a position (for crop), so nothing else per token is stored.
/// Host memory only: the decode kernels never read it.

#include <cstdint>
#include <vector>

namespace mixsga::detail {

/// Bits an expert id takes with `num_experts` experts: ceil(log2(num_experts)), 0 for one expert.
inline int expert_id_bits(int64_t num_experts) {
  int bits = 0;
  while ((int64_t{1} << bits) < num_experts) ++bits;
  return bits;
}

class ExpertStream {
 public:
  explicit ExpertStream(int bits = 0) : bits_(bits) {}

  /// Position of the first stored token (meaningless while empty).
  int64_t start = 0;

  int64_t size() const { return size_; }
  /// Position the next token gets by default: the last one's + 1, or 0 while empty.
  int64_t next_position() const { return size_ == 0 ? 0 : start + size_; }

  void push(int64_t expert) {
    const int64_t first_bit = size_ * bits_;
    bytes_.resize(static_cast<size_t>((first_bit + bits_ + 7) / 8), 0);
    for (int k = 0; k < bits_; ++k) {
      if ((expert >> k) & 1) bytes_[static_cast<size_t>((first_bit + k) / 8)] |= uint8_t(1u << ((first_bit + k) % 8));
    }
    ++size_;
  }

  int64_t get(int64_t i) const {
    const int64_t first_bit = i * bits_;
    int64_t expert = 0;
    for (int k = 0; k < bits_; ++k) {
      expert |= int64_t((bytes_[static_cast<size_t>((first_bit + k) / 8)] >> ((first_bit + k) % 8)) & 1) << k;
    }
    return expert;
  }

  /// Keeps the first n tokens (n <= size()).
  void truncate(int64_t n) {
    size_ = n;
    bytes_.resize(static_cast<size_t>((n * bits_ + 7) / 8));
    // Clear the bits past the end in the last byte, since push() only ORs bits in.
    if (n * bits_ % 8 != 0) bytes_.back() &= uint8_t((1u << (n * bits_ % 8)) - 1);
  }

  /// Bytes the ids of the stored tokens need.
  int64_t bytes_stored() const { return (size_ * bits_ + 7) / 8; }
  /// Bytes held in memory (vector capacity).
  int64_t bytes_allocated() const { return static_cast<int64_t>(bytes_.capacity()); }
  void shrink_to_fit() { bytes_.shrink_to_fit(); }
  /// Allocates room for n tokens' ids up front (HeteroKVCache::reserve).
  void reserve(int64_t n) { bytes_.reserve(static_cast<size_t>((n * bits_ + 7) / 8)); }

 private:
  int bits_;
  int64_t size_ = 0;
  std::vector<uint8_t> bytes_;
};

}  // namespace mixsga::detail
