// Conversions between the stored dtype and the accumulation type that the
// compiler can vectorise.
//
// c10::Half's own conversions are bit-exact but compile to branches at the
// baseline x86-64 ISA (no F16C), which stops every loop that touches float16
// from vectorising; they are ~10x slower than the float32 loops. The versions
// here are the same algorithm as c10 (Maratea's branch-free FP16 conversion,
// torch/headeronly/util/Half.h) with the selects written as bit masks, so
// results are identical bit for bit (checked exhaustively in development).
// Every other dtype uses its plain cast.
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace ascood {
namespace cpu {

C10_ALWAYS_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

C10_ALWAYS_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

C10_ALWAYS_INLINE float half_to_float(c10::Half h) {
  const uint32_t w = static_cast<uint32_t>(h.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers (and inf/NaN): rebias the exponent by 0xE0 and scale by
  // 2^-112 so that exponent 0x1F lands on 0xFF.
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: build 0.5 + m * 2^-24 exactly and subtract 0.5.
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  // two_w < 2^27 (unsigned) <=> its top 5 bits are 0: an equality test,
  // which vectorises without an unsigned compare.
  const uint32_t is_denorm = 0u - static_cast<uint32_t>((two_w >> 27) == 0);
  return bits_float(sign | (float_bits(denormalized) & is_denorm) | (float_bits(normalized) & ~is_denorm));
}

C10_ALWAYS_INLINE c10::Half float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  // max(shl1_w & 0xFF000000, 0x71000000), compared on the top byte so the
  // compare is a signed one on small values.
  const uint32_t top = shl1_w >> 24;
  const uint32_t bias = (top < 0x71u ? 0x71u : top) << 24;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  // NaN: shl1_w > 0xFF000000 (unsigned) <=> (w & 0x7FFFFFFF) > 0x7F800000.
  const uint32_t is_nan = 0u - static_cast<uint32_t>(static_cast<int32_t>(w & 0x7FFFFFFFu) > 0x7F800000);
  const uint32_t out = (sign >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan);
  return c10::Half(static_cast<uint16_t>(out), c10::Half::from_bits());
}

// Stored dtype -> accumulation type.
template <typename acc, typename scalar_t>
C10_ALWAYS_INLINE acc to_acc(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return static_cast<acc>(half_to_float(v));
  } else {
    return static_cast<acc>(v);
  }
}

// Accumulation type -> stored dtype, rounded once (to nearest even).
template <typename scalar_t, typename acc>
C10_ALWAYS_INLINE scalar_t from_acc(acc v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return float_to_half(static_cast<float>(v));
  } else {
    return static_cast<scalar_t>(v);
  }
}

}  // namespace cpu
}  // namespace ascood
