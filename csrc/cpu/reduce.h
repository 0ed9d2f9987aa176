// Small reduction helpers for the row kernels (zscore, loss).
//
// The compiler may not reorder a floating-point sum on its own (that changes
// the result), so a plain `s += x[i]` loop runs one add at a time. Keeping
// kLanes independent partial sums gives it a fixed association it can map to
// vector registers, and is also more accurate than one running sum.
#pragma once

#include "common.h"

#include <cmath>

namespace ascood {
namespace cpu {

template <typename acc>
constexpr int kLanes = 16;

// Sums the lanes pairwise so the result does not depend on the vector width.
template <typename acc, int L>
C10_ALWAYS_INLINE acc sum_lanes(const acc (&lane)[L]) {
  acc tmp[L];
  for (int j = 0; j < L; ++j) tmp[j] = lane[j];
  for (int width = L / 2; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) tmp[j] += tmp[j + width];
  }
  return tmp[0];
}

// sum_i f(i) for i in [0, len), f returning acc, with kLanes partial sums.
template <typename acc, typename F>
C10_ALWAYS_INLINE acc lane_sum(int64_t len, const F& f) {
  constexpr int L = kLanes<acc>;
  acc lane[L] = {};
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    for (int j = 0; j < L; ++j) lane[j] += f(i + j);
  }
  acc tail = 0;
  for (; i < len; ++i) tail += f(i);
  return sum_lanes(lane) + tail;
}

// Pairwise (cascade) sum of v[0, len): O(log n) error growth for long
// batch reductions, where a running float sum would drift.
template <typename acc>
acc pairwise_sum(const acc* v, int64_t len) {
  if (len <= 64) {
    return lane_sum<acc>(len, [&](int64_t i) { return v[i]; });
  }
  const int64_t half = len / 2;
  return pairwise_sum(v, half) + pairwise_sum(v + half, len - half);
}

}  // namespace cpu
}  // namespace ascood
