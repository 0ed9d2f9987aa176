// Magnitude keys (docs/OPS.md, "Magnitude keys") and an exact per-row
// k-th-largest-key radix select on them, shared by the threshold ops.
//
// Why a radix select and not a sort or std::nth_element: the threshold ops
// only need the k-th largest key, and a histogram of the key's top 11 bits
// reads the row once with a cache-resident 2048-bin table. The bucket that
// holds the k-th largest is usually a few percent of the row, so the later
// digits run over a small compacted buffer. The cost is ~2 streaming passes
// over the row whatever k is, and the result is exact (ties, NaN, +-0).
#pragma once

#include "common.h"

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstring>
#include <functional>
#include <type_traits>

namespace ascood {
namespace cpu {

// Key layout per dtype. Keys are stored in a *signed* integer type: with the
// sign bit cleared they are non-negative, and signed compares vectorise on
// every x86 level (SSE2 has no unsigned 32-bit compare).
template <typename scalar_t>
struct KeyTraits;

template <>
struct KeyTraits<float> {
  using key_t = int32_t;
  using bits_t = uint32_t;
  static constexpr int kBits = 31;  // significant bits once the sign is cleared
  static constexpr bits_t kAbsMask = 0x7FFFFFFFu;
  static constexpr key_t kInf = 0x7F800000;
  static constexpr key_t kNaN = 0x7FC00000;
};

template <>
struct KeyTraits<double> {
  using key_t = int64_t;
  using bits_t = uint64_t;
  static constexpr int kBits = 63;
  static constexpr bits_t kAbsMask = 0x7FFFFFFFFFFFFFFFull;
  static constexpr key_t kInf = 0x7FF0000000000000ll;
  static constexpr key_t kNaN = 0x7FF8000000000000ll;
};

template <>
struct KeyTraits<c10::Half> {
  using key_t = int16_t;
  using bits_t = uint16_t;
  static constexpr int kBits = 15;
  static constexpr bits_t kAbsMask = 0x7FFF;
  static constexpr key_t kInf = 0x7C00;
  static constexpr key_t kNaN = 0x7E00;
};

template <>
struct KeyTraits<c10::BFloat16> {
  using key_t = int16_t;
  using bits_t = uint16_t;
  static constexpr int kBits = 15;
  static constexpr bits_t kAbsMask = 0x7FFF;
  static constexpr key_t kInf = 0x7F80;
  static constexpr key_t kNaN = 0x7FC0;
};

template <typename scalar_t>
using key_of_t = typename KeyTraits<scalar_t>::key_t;

// Stored bits with the sign cleared; every NaN (any payload, any sign) becomes
// the one canonical key above +inf, so all NaNs tie and rank largest.
// memcpy (not a cast) reads the bits without rounding and without aliasing UB;
// it compiles to a plain load.
template <typename scalar_t>
C10_ALWAYS_INLINE key_of_t<scalar_t> magnitude_key(scalar_t v) {
  using T = KeyTraits<scalar_t>;
  typename T::bits_t bits;
  static_assert(sizeof(bits) == sizeof(scalar_t), "key width must match the dtype");
  std::memcpy(&bits, &v, sizeof(bits));
  const auto key = static_cast<typename T::key_t>(bits & T::kAbsMask);
  return key > T::kInf ? T::kNaN : key;
}

// ---------------------------------------------------------------------------
// Digit schedule: 11-bit digits from the top of the key; the last digit takes
// what is left (31 = 11+11+9, 63 = 5*11+8, 15 = 11+4).
constexpr int kDigitBits = 11;
constexpr int64_t kMaxBins = int64_t{1} << kDigitBits;

template <int kBits>
struct DigitSchedule {
  static constexpr int kLevels = (kBits + kDigitBits - 1) / kDigitBits;
  static constexpr int shift(int level) {
    return kBits - kDigitBits * (level + 1) > 0 ? kBits - kDigitBits * (level + 1) : 0;
  }
  static constexpr int width(int level) { return kBits - kDigitBits * level - shift(level); }
};

// Rows at or below this many candidates finish with std::nth_element: a
// 2048-bin histogram would cost more than it saves there.
constexpr int64_t kSmallSelect = 64;

// Scratch reused across the rows one thread handles, so a batch does not
// allocate per sample.
template <typename key_t>
struct SelectScratch {
  std::vector<int64_t> hist = std::vector<int64_t>(kMaxBins);
  std::vector<int64_t> chunk_hist;  // nchunks * kMaxBins, parallel-within-row only
  std::vector<key_t> buf;
};

// Scans buckets from the largest digit down; returns the bucket holding the
// k-th largest key and turns k into its rank inside that bucket.
inline int64_t pick_bucket(const int64_t* hist, int64_t nbins, int64_t& k) {
  for (int64_t d = nbins - 1; d > 0; --d) {
    if (hist[d] >= k) return d;
    k -= hist[d];
  }
  return 0;
}

// Histogram of the top digit of the keys of g[begin, end). The digits of a
// tile are computed first (a loop the compiler vectorises), then counted: the
// scalar increments are what remains of the cost.
template <typename scalar_t>
void histogram_top_digit(const scalar_t* g, int64_t begin, int64_t end, int64_t* hist) {
  using Sched = DigitSchedule<KeyTraits<scalar_t>::kBits>;
  constexpr int shift = Sched::shift(0);
  constexpr int64_t kTile = 256;
  std::fill(hist, hist + (int64_t{1} << Sched::width(0)), 0);
  uint16_t digit[kTile];
  int64_t i = begin;
  for (; i + kTile <= end; i += kTile) {
    for (int64_t j = 0; j < kTile; ++j) digit[j] = static_cast<uint16_t>(magnitude_key(g[i + j]) >> shift);
    for (int64_t j = 0; j < kTile; ++j) ++hist[digit[j]];
  }
  for (; i < end; ++i) ++hist[magnitude_key(g[i]) >> shift];
}

// Copies the keys of g[begin, end) whose top digit is `digit` to dst and
// returns how many. The bucket is usually a few percent of the row, so
// blocks of 8 are first tested for any match (vectorised) and skipped whole;
// a block with a match is copied branch-free (every key stored, the cursor
// advances on a match), so dst needs one slot past the match count.
template <typename scalar_t>
int64_t compact_top_digit(const scalar_t* g, int64_t begin, int64_t end, int64_t digit, key_of_t<scalar_t>* dst) {
  using key_t = key_of_t<scalar_t>;
  using Sched = DigitSchedule<KeyTraits<scalar_t>::kBits>;
  constexpr int shift = Sched::shift(0);
  constexpr int64_t kBlock = 8;
  const key_t want = static_cast<key_t>(digit);
  int64_t j = 0;
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    int any = 0;
    for (int64_t l = 0; l < kBlock; ++l) any |= (magnitude_key(g[i + l]) >> shift) == want;
    if (!any) continue;
    for (int64_t l = 0; l < kBlock; ++l) {
      const key_t key = magnitude_key(g[i + l]);
      dst[j] = key;
      j += (key >> shift) == want;
    }
  }
  for (; i < end; ++i) {
    const key_t key = magnitude_key(g[i]);
    dst[j] = key;
    j += (key >> shift) == want;
  }
  return j;
}

// Finishes the select on buf[0, count): the keys that share the digits above
// `level` (their value is `prefix`), where the answer has rank k (1-based,
// largest first). Each level histograms one digit, picks the bucket and keeps
// only that bucket's keys, in place.
template <typename key_t, int kBits>
key_t refine_select(key_t* buf, int64_t count, int64_t k, int64_t prefix, int level, int64_t* hist) {
  using Sched = DigitSchedule<kBits>;
  for (; level < Sched::kLevels; ++level) {
    if (count <= kSmallSelect) {
      std::nth_element(buf, buf + (k - 1), buf + count, std::greater<key_t>());
      return buf[k - 1];
    }
    const int shift = Sched::shift(level);
    const int64_t nbins = int64_t{1} << Sched::width(level);
    const int64_t mask = nbins - 1;
    std::fill(hist, hist + nbins, 0);
    for (int64_t i = 0; i < count; ++i) ++hist[(buf[i] >> shift) & mask];
    const int64_t digit = pick_bucket(hist, nbins, k);
    prefix = (prefix << Sched::width(level)) | digit;
    if (level + 1 == Sched::kLevels) break;
    if (hist[digit] == count) continue;  // one bin holds them all (ties): nothing to drop
    int64_t j = 0;
    for (int64_t i = 0; i < count; ++i) {
      const key_t key = buf[i];
      buf[j] = key;
      j += ((key >> shift) & mask) == static_cast<key_t>(digit);
    }
    count = j;
  }
  // All digits fixed: the prefix is the key itself.
  return static_cast<key_t>(prefix);
}

// The k-th largest key (1 <= k <= n) of g[0, n), on the calling thread.
template <typename scalar_t>
key_of_t<scalar_t> kth_largest_key(const scalar_t* g, int64_t n, int64_t k, SelectScratch<key_of_t<scalar_t>>& s) {
  using T = KeyTraits<scalar_t>;
  using Sched = DigitSchedule<T::kBits>;
  int64_t* hist = s.hist.data();
  histogram_top_digit(g, 0, n, hist);
  const int64_t digit = pick_bucket(hist, int64_t{1} << Sched::width(0), k);
  const int64_t count = hist[digit];
  if (s.buf.size() < static_cast<size_t>(count + 1)) s.buf.resize(count + 1);
  compact_top_digit(g, 0, n, digit, s.buf.data());
  return refine_select<key_of_t<scalar_t>, T::kBits>(s.buf.data(), count, k, digit, 1, hist);
}

// The k-th largest (1 <= k <= n) of the offsets keys[i] - base of n
// unsigned keys (all keys >= base), where every offset is below
// 2^(top_bit + 1) (top_bit = -1: all zero); on the calling thread. The digits
// start at the highest bit the offsets can use, so keys of a narrow range
// need few, well-filled levels whatever their type. Returns the offset.
template <typename key_t>
key_t kth_largest_bounded(const key_t* keys, key_t base, int64_t n, int64_t k, int top_bit,
                          SelectScratch<key_t>& s) {
  static_assert(std::is_unsigned_v<key_t>, "bounded select takes unsigned keys");
  if (top_bit < 0) return 0;
  int64_t* hist = s.hist.data();
  const key_t* src = keys;  // level 0 reads the row, later levels the compacted buffer
  int64_t count = n;
  key_t prefix = 0;
  while (top_bit >= 0) {
    if (src != keys && count <= kSmallSelect) {
      std::nth_element(s.buf.data(), s.buf.data() + (k - 1), s.buf.data() + count, std::greater<key_t>());
      return s.buf[k - 1];
    }
    const int width = std::min(kDigitBits, top_bit + 1);
    const int shift = top_bit + 1 - width;
    const int64_t nbins = int64_t{1} << width;
    const key_t mask = static_cast<key_t>(nbins - 1);
    std::fill(hist, hist + nbins, 0);
    const key_t sub = src == keys ? base : key_t{0};  // level 0 reads keys, later ones offsets
    for (int64_t i = 0; i < count; ++i) ++hist[((src[i] - sub) >> shift) & mask];
    const int64_t digit = pick_bucket(hist, nbins, k);
    prefix = static_cast<key_t>((prefix << width) | static_cast<key_t>(digit));
    top_bit = shift - 1;
    if (hist[digit] == count && src != keys) continue;  // one bin holds them all: nothing to drop
    if (s.buf.size() < static_cast<size_t>(hist[digit] + 1)) s.buf.resize(hist[digit] + 1);
    key_t* dst = s.buf.data();
    const key_t want = static_cast<key_t>(digit);
    int64_t j = 0;
    for (int64_t i = 0; i < count; ++i) {  // in place on the buffer after level 0
      const key_t key = src[i] - sub;
      dst[j] = key;
      j += ((key >> shift) & mask) == want;
    }
    count = j;
    src = dst;
  }
  return prefix;  // all digits fixed: the prefix is the key itself
}

// Same result with the top-digit passes split over `nchunks` threads: each
// chunk histograms its slice, the histograms are summed, and each chunk
// compacts its matches to its own region of the buffer (known from its own
// histogram). The remaining digits run over that usually small buffer.
template <typename scalar_t>
key_of_t<scalar_t> kth_largest_key_parallel(const scalar_t* g, int64_t n, int64_t k, int64_t nchunks,
                                            SelectScratch<key_of_t<scalar_t>>& s) {
  using T = KeyTraits<scalar_t>;
  using Sched = DigitSchedule<T::kBits>;
  constexpr int64_t nbins = int64_t{1} << Sched::width(0);
  const int64_t chunk = (n + nchunks - 1) / nchunks;
  s.chunk_hist.resize(nchunks * nbins);
  int64_t* chunk_hist = s.chunk_hist.data();
  torch::stable::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      histogram_top_digit(g, c * chunk, std::min(n, (c + 1) * chunk), chunk_hist + c * nbins);
    }
  });
  int64_t* hist = s.hist.data();
  std::fill(hist, hist + nbins, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    for (int64_t d = 0; d < nbins; ++d) hist[d] += chunk_hist[c * nbins + d];
  }
  const int64_t digit = pick_bucket(hist, nbins, k);
  const int64_t count = hist[digit];
  // Chunk c writes at offset (matches of chunks < c) + c: the extra slot per
  // chunk absorbs the branch-free store past its last match, so chunks never
  // write over each other; the gaps are closed below.
  std::vector<int64_t> offset(nchunks + 1, 0);
  for (int64_t c = 0; c < nchunks; ++c) offset[c + 1] = offset[c] + chunk_hist[c * nbins + digit] + 1;
  if (s.buf.size() < static_cast<size_t>(offset[nchunks])) s.buf.resize(offset[nchunks]);
  auto* buf = s.buf.data();
  torch::stable::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      compact_top_digit(g, c * chunk, std::min(n, (c + 1) * chunk), digit, buf + offset[c]);
    }
  });
  int64_t filled = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t m = offset[c + 1] - offset[c] - 1;
    std::memmove(buf + filled, buf + offset[c], m * sizeof(*buf));
    filled += m;
  }
  return refine_select<key_of_t<scalar_t>, T::kBits>(buf, count, k, digit, 1, hist);
}

}  // namespace cpu
}  // namespace ascood
