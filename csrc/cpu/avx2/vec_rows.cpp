// AVX2+FMA build of the loss row kernels (see ../vec_rows.h for why).
//
// The target pragma must come before any header: every function of this file
// is compiled for AVX2+FMA. setup.py links this file last, so any inline
// function it shares with the baseline files resolves to their copy.
//
// The 8-lane vector code is written with intrinsics here (avx2_exp.h) instead
// of ATen's at::vec::Vectorized<float>, which is not part of the LibTorch
// stable ABI and whose exp() calls Sleef_expf8_u10 inside libtorch_cpu. The
// operations are the same instructions in the same order, so the results are
// bit for bit those of the previous build (docs/OPS.md "Build and ABI").
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ASCOOD_VEC_ROWS 1
#pragma GCC target("avx2,fma")
#include "cpu/avx2/avx2_exp.h"
#endif

#include "cpu/vec_rows.h"

#include <cmath>
#include <limits>

namespace ascood {
namespace cpu {
namespace vec_rows {

#if defined(ASCOOD_VEC_ROWS)

using Vec = avx2::Vec;
constexpr int64_t kW = avx2::kLanes;

bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

namespace {

// Loads z[j, j + kW) or, for a tail of n < kW values, pads with `fill`.
inline Vec load(const float* z, int64_t n, float fill) {
  return n >= kW ? Vec::loadu(z) : Vec::set(Vec(fill), Vec::loadu(z, n), n);
}

}  // namespace

float logsumexp(const float* z, int64_t C) {
  const float ninf = -std::numeric_limits<float>::infinity();
  Vec m0(ninf), m1(ninf);
  int64_t j = 0;
  for (; j + 2 * kW <= C; j += 2 * kW) {
    m0 = avx2::maximum(m0, Vec::loadu(z + j));
    m1 = avx2::maximum(m1, Vec::loadu(z + j + kW));
  }
  for (; j < C; j += kW) m0 = avx2::maximum(m0, load(z + j, C - j, ninf));
  const float mx = avx2::reduce_all([](Vec a, Vec b) { return avx2::maximum(a, b); },
                                                  avx2::maximum(m0, m1));
  const float shift = std::isinf(mx) ? 0.0f : mx;
  const Vec vs(shift);
  Vec s0(0.0f), s1(0.0f);
  j = 0;
  for (; j + 2 * kW <= C; j += 2 * kW) {
    s0 = s0 + (Vec::loadu(z + j) - vs).exp();
    s1 = s1 + (Vec::loadu(z + j + kW) - vs).exp();
  }
  for (; j < C; j += kW) {
    const int64_t n = std::min<int64_t>(kW, C - j);
    // padding lanes read -inf: exp(-inf) = 0 adds nothing
    s0 = s0 + (load(z + j, n, ninf) - vs).exp();
  }
  const float s = avx2::reduce_all([](Vec a, Vec b) { return a + b; }, s0 + s1);
  return std::log(s) + shift;
}

float sum(const float* z, int64_t C) {
  Vec s0(0.0f), s1(0.0f);
  int64_t j = 0;
  for (; j + 2 * kW <= C; j += 2 * kW) {
    s0 = s0 + Vec::loadu(z + j);
    s1 = s1 + Vec::loadu(z + j + kW);
  }
  for (; j < C; j += kW) s0 = s0 + load(z + j, C - j, 0.0f);
  return avx2::reduce_all([](Vec a, Vec b) { return a + b; }, s0 + s1);
}

void scaled_softmax_minus(const float* z, float lse, float g, float sub, float den, float* d, int64_t C) {
  const Vec vl(lse), vg(g), vsub(sub), vden(den);
  int64_t j = 0;
  for (; j + kW <= C; j += kW) ((vg * ((Vec::loadu(z + j) - vl).exp() - vsub)) / vden).store(d + j);
  if (j < C) ((vg * ((load(z + j, C - j, 0.0f) - vl).exp() - vsub)) / vden).store(d + j, C - j);
}

float softmax_at(float z, float lse) {
  float out[kW];
  (Vec(z) - Vec(lse)).exp().store(out);
  return out[0];
}

#else  // not x86-64 GCC/clang: the scalar kernels in loss.cpp are used

bool available() { return false; }
float logsumexp(const float*, int64_t) { return 0.0f; }
float sum(const float*, int64_t) { return 0.0f; }
void scaled_softmax_minus(const float*, float, float, float, float, float*, int64_t) {}
float softmax_at(float, float) { return 0.0f; }

#endif

}  // namespace vec_rows
}  // namespace cpu
}  // namespace ascood
