// AVX2+FMA build of the loss row kernels (see ../vec_rows.h for why).
//
// The target pragma must come before any header: every function of this file
// (and the ATen vector headers it instantiates) is compiled for AVX2+FMA, and
// CPU_CAPABILITY puts at::vec in its AVX2 namespace, as ATen does for its own
// per-capability kernels. setup.py links this file last, so any inline
// function it shares with the baseline files resolves to their copy.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ASCOOD_VEC_ROWS 1
#pragma GCC target("avx2,fma")
// The pragma does not define the ISA macros that sleef.h and the ATen vector
// headers test; they hold for every function compiled below.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX2
#endif
#ifndef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#endif

#include "cpu/vec_rows.h"

#include <cmath>
#include <limits>

namespace ascood {
namespace cpu {
namespace vec_rows {

#if defined(ASCOOD_VEC_ROWS)

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

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
    m0 = at::vec::maximum(m0, Vec::loadu(z + j));
    m1 = at::vec::maximum(m1, Vec::loadu(z + j + kW));
  }
  for (; j < C; j += kW) m0 = at::vec::maximum(m0, load(z + j, C - j, ninf));
  const float mx = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); },
                                                  at::vec::maximum(m0, m1));
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
  const float s = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, s0 + s1);
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
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, s0 + s1);
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
