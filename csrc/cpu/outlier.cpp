// invariant_mask and gradient_outlier on the CPU (docs/OPS.md).
//
// Per sample: the exact k-th largest magnitude key t (radix select, select.h),
// then one pass that writes `key >= t` (the mask) or the masked add. The
// threshold and the add are fused per sample so the sample's gradient is
// still in L2 when the add reads it again.
#include "common.h"
#include "convert.h"
#include "select.h"
#include "stream.h"


// x + alpha*g must round exactly like the reference (two roundings): no fused
// multiply-add. GCC in ISO mode already does not contract; this tells clang.
#pragma STDC FP_CONTRACT OFF

namespace ascood {
namespace cpu {
namespace {

// Below this many elements a sample is not worth splitting across threads.
constexpr int64_t kMinChunk = 1 << 14;

// What each op does once the threshold of a sample is known: fill
// out[begin, end) of that sample. A functor so the select driver below is
// shared by both ops.
template <typename scalar_t>
struct MaskWriter {
  const scalar_t* grad;
  bool* out;
  bool stream;
  void operator()(int64_t sample, int64_t n, key_of_t<scalar_t> t, int64_t begin, int64_t end) const {
    const scalar_t* g = grad + sample * n;
    write_elements(out + sample * n, begin, end, stream, [&](int64_t i) { return magnitude_key(g[i]) >= t; });
  }
};

template <typename scalar_t>
struct OutlierWriter {
  using acc = acc_t<scalar_t>;
  using bits_t = typename KeyTraits<scalar_t>::bits_t;
  const scalar_t* x;
  const scalar_t* grad;
  scalar_t* out;
  acc alpha;
  bool stream;
  void operator()(int64_t sample, int64_t n, key_of_t<scalar_t> t, int64_t begin, int64_t end) const {
    const scalar_t* xs = x + sample * n;
    const scalar_t* g = grad + sample * n;
    const acc a = alpha;
    write_elements(out + sample * n, begin, end, stream, [&](int64_t i) {
      const scalar_t gi = g[i];
      const scalar_t xi = xs[i];
      // x + alpha * g as two roundings in acc (no fma), like the reference.
      const scalar_t moved = from_acc<scalar_t>(to_acc<acc>(xi) + a * to_acc<acc>(gi));
      // Blend on the bits, not with `?:` on the values: unselected elements
      // keep x's exact bits (NaN payloads too), and an all-ones/all-zeros
      // mask is what lets the compiler vectorise the loop.
      bits_t xb, mb;
      std::memcpy(&xb, &xi, sizeof(xb));
      std::memcpy(&mb, &moved, sizeof(mb));
      const bits_t sel = magnitude_key(gi) >= t ? static_cast<bits_t>(~bits_t{0}) : bits_t{0};
      const bits_t ob = static_cast<bits_t>((mb & sel) | (xb & ~sel));
      scalar_t r;
      std::memcpy(&r, &ob, sizeof(r));
      return r;
    });
  }
};

// Runs the per-sample select on grad (B samples of n contiguous elements)
// and hands each threshold to `write`. k == 0 never reaches here.
// Threads go across samples when there are enough of them (each thread owns
// whole samples: no synchronisation, row stays cache-hot); otherwise every
// sample is split into chunks.
template <typename scalar_t, typename Writer>
void for_each_threshold(const scalar_t* grad, int64_t B, int64_t n, int64_t k, const Writer& write) {
  using key_t = key_of_t<scalar_t>;
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  if (B >= threads || n < 2 * kMinChunk) {
    torch::stable::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      SelectScratch<key_t> scratch;
      for (int64_t b = begin; b < end; ++b) {
        const key_t t = kth_largest_key(grad + b * n, n, k, scratch);
        write(b, n, t, 0, n);
      }
    });
    return;
  }
  const int64_t nchunks = std::min(threads, n / kMinChunk);
  SelectScratch<key_t> scratch;
  for (int64_t b = 0; b < B; ++b) {
    const key_t t = kth_largest_key_parallel(grad + b * n, n, k, nchunks, scratch);
    torch::stable::parallel_for(0, n, kMinChunk, [&](int64_t begin, int64_t end) { write(b, n, t, begin, end); });
  }
}

Tensor invariant_mask_cpu(const Tensor& grad, double p_inv) {
  check_float_cpu(grad, "grad", 2);
  ASCOOD_CHECK(p_inv > 0.0 && p_inv <= 1.0, "ascood (CPU): p_inv must be in (0, 1], got ", p_inv);
  const auto fmt = output_memory_format(grad);
  const int64_t B = grad.size(0);
  const int64_t n = per_sample_numel(grad);
  const int64_t k = count_from_fraction(p_inv, n);
  if (B == 0 || k == 0) {
    return zero(empty_image_like(grad, fmt, kBool));
  }
  // In either layout a sample is one contiguous block, and the mask is
  // elementwise, so the select can run on raw memory in that layout.
  const Tensor g = as_contiguous(grad, fmt);
  Tensor out = empty_image_like(grad, fmt, kBool);
  ASCOOD_DISPATCH_FLOATING(grad.scalar_type(), "ascood_invariant_mask_cpu", [&] {
    MaskWriter<scalar_t> writer{g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<bool>(),
                                nbytes(out) >= kStreamBytes};
    for_each_threshold(g.const_data_ptr<scalar_t>(), B, n, k, writer);
  });
  return out;
}

Tensor gradient_outlier_cpu(const Tensor& x, const Tensor& grad, double p_inv, double alpha) {
  check_float_cpu(x, "x", 2);
  check_float_cpu(grad, "grad", 2);
  check_like(x, "x", grad, "grad");
  ASCOOD_CHECK(p_inv > 0.0 && p_inv <= 1.0, "ascood (CPU): p_inv must be in (0, 1], got ", p_inv);
  const auto fmt = output_memory_format(x);
  const int64_t B = x.size(0);
  const int64_t n = per_sample_numel(x);
  const int64_t k = count_from_fraction(p_inv, n);
  Tensor out = empty_image_like(x, fmt);
  if (B == 0 || k == 0) return copy_into(out, x);  // nothing moves
  const Tensor xc = as_contiguous(x, fmt);
  const Tensor g = as_contiguous(grad, fmt);
  ASCOOD_DISPATCH_FLOATING(x.scalar_type(), "ascood_gradient_outlier_cpu", [&] {
    using acc = acc_t<scalar_t>;
    OutlierWriter<scalar_t> writer{xc.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                   out.mutable_data_ptr<scalar_t>(), static_cast<acc>(alpha),
                                   nbytes(out) >= kStreamBytes};
    for_each_threshold(g.const_data_ptr<scalar_t>(), B, n, k, writer);
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ascood, CPU, m) {
  m.impl("invariant_mask", TORCH_BOX(&invariant_mask_cpu));
  m.impl("gradient_outlier", TORCH_BOX(&gradient_outlier_cpu));
}

}  // namespace cpu
}  // namespace ascood
