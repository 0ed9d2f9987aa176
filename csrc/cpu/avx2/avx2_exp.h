// Eight float lanes on AVX2+FMA: the subset of ATen's at::vec::Vectorized<float>
// (CPU_CAPABILITY_AVX2) that vec_rows.cpp uses, written with intrinsics so the
// extension needs nothing outside the LibTorch stable ABI.
//
// exp() is SLEEF's expf8_u10 for AVX2 (SLEEF 3, Boost Software License 1.0:
// the xexpf of sleefsimdsp.c with the helperavx2.h primitives: FMA multiply-add,
// cvtps round-to-nearest), the function at::vec's exp() calls in libtorch_cpu;
// same instructions, so the same bits (<= 1 ulp from the true value). The
// other operations are those of vec256_float.h (maximum propagates NaN) and
// functional_base.h (vec_reduce_all's shuffle order). Include only from a file
// compiled with `#pragma GCC target("avx2,fma")`.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace ascood {
namespace cpu {
namespace avx2 {

constexpr int64_t kLanes = 8;

inline __m256i lane_mask(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// SLEEF xexpf (u10) on 8 lanes.
inline __m256 expf8_u10(__m256 d) {
  constexpr float kRLn2 = 1.442695040888963407359924681001892137426645954152985934135449406931f;  // SLEEF's R_LN2f
  const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, _mm256_set1_ps(kRLn2)));
  const __m256 qf = _mm256_cvtepi32_ps(q);
  // s = d - q * ln2, ln2 split in SLEEF's L2Uf + L2Lf.
  __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-0.693145751953125f), d);
  s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.428606765330187045e-06f), s);
  __m256 u = _mm256_set1_ps(0.000198527617612853646278381f);
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00139304355252534151077271f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00833336077630519866943359f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.0416664853692054748535156f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.166666671633720397949219f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
  u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
  // ldexp2: u * 2^(q >> 1) * 2^(q - (q >> 1)), each factor built in the exponent field.
  const __m256i q1 = _mm256_srai_epi32(q, 1);
  const __m256i q2 = _mm256_sub_epi32(q, q1);
  const __m256i bias = _mm256_set1_epi32(0x7f);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q2, bias), 23));
  u = _mm256_mul_ps(_mm256_mul_ps(u, p1), p2);
  // d < -104: 0; d > 100: +inf.
  u = _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), u);
  u = _mm256_blendv_ps(u, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ));
  return u;
}

struct Vec {
  __m256 v;
  Vec(__m256 x) : v(x) {}  // NOLINT: implicit, as Vectorized<float>
  explicit Vec(float x) : v(_mm256_set1_ps(x)) {}
  static Vec loadu(const float* p) { return _mm256_loadu_ps(p); }
  // Lanes [0, count) read, the rest 0 (masked load: nothing past p + count is touched).
  static Vec loadu(const float* p, int64_t count) {
    return count >= kLanes ? loadu(p) : Vec(_mm256_maskload_ps(p, lane_mask(count)));
  }
  // Lanes [0, count) from b, the rest from a.
  static Vec set(Vec a, Vec b, int64_t count) {
    return _mm256_blendv_ps(a.v, b.v, _mm256_castsi256_ps(lane_mask(count)));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(float* p, int64_t count) const {
    if (count >= kLanes) {
      store(p);
    } else if (count > 0) {
      _mm256_maskstore_ps(p, lane_mask(count), v);
    }
  }
  Vec exp() const { return expf8_u10(v); }
};

inline Vec operator+(Vec a, Vec b) { return _mm256_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm256_div_ps(a.v, b.v); }

// IEEE maximum: NaN if either lane is NaN (all-ones is a NaN).
inline Vec maximum(Vec a, Vec b) {
  return _mm256_or_ps(_mm256_max_ps(a.v, b.v), _mm256_cmp_ps(a.v, b.v, _CMP_UNORD_Q));
}

// fun folded over the 8 lanes in vec_reduce_all's order (128-, 64-, 32-bit shuffles).
template <typename Op>
inline float reduce_all(const Op& fun, Vec v) {
  v = fun(v, Vec(_mm256_permute2f128_ps(v.v, v.v, 0x1)));
  v = fun(v, Vec(_mm256_shuffle_ps(v.v, v.v, 0x4E)));
  v = fun(v, Vec(_mm256_shuffle_ps(v.v, v.v, 0xB1)));
  return _mm256_cvtss_f32(v.v);
}

}  // namespace avx2
}  // namespace cpu
}  // namespace ascood
