// Row kernels of ascood_loss on float32 with ATen's vectorised (Sleef) exp,
// compiled for AVX2+FMA in csrc/cpu/avx2/vec_rows.cpp and called only when
// the CPU has both (vec_rows_available()).
//
// Why a separate translation unit: the extension is built for the baseline
// x86-64 ISA, so at::vec::Vectorized<float> there is the generic fallback
// whose exp is scalar libm, slower than eager log_softmax (which ATen
// dispatches per CPU). One file built with AVX2 gives the extension the same
// Sleef exp (Sleef_expf8_u10, <= 1 ulp) without raising the baseline of the
// rest. Its interface is plain pointers so no AVX2-compiled inline function
// is shared with the other files.
#pragma once

#include <cstdint>

namespace ascood {
namespace cpu {
namespace vec_rows {

// True when the CPU runs AVX2 and FMA and the vectorised file was built.
bool available();

// log(sum_j exp(z_j)) of a row without NaN, shifted by the row max (a +-inf
// max is replaced by 0, as torch.logsumexp does). C >= 1.
float logsumexp(const float* z, int64_t C);

// sum_j z_j (NaN-free rows only is not required: NaN propagates).
float sum(const float* z, int64_t C);

// d_j = (g * (exp(z_j - lse) - sub)) / den for every j (sub is the same for
// all j; the caller fixes up the one-hot entry with softmax_at).
void scaled_softmax_minus(const float* z, float lse, float g, float sub, float den, float* d, int64_t C);

// exp(z - lse) for one value, with the same vector exp as the row kernels.
float softmax_at(float z, float lse);

}  // namespace vec_rows
}  // namespace cpu
}  // namespace ascood
