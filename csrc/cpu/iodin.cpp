// iodin_perturb on the CPU (docs/OPS.md): per sample, the min(k, n) elements
// of largest magnitude key(grad) (ties to the lower logical index) step by
// `-eps * sign(grad) / std[channel]`; everything else is copied.
//
// i-ODIN uses k = 1, so the common case is a single scan with a k-slot
// buffer; large k falls back to std::nth_element. Work is on plain-contiguous
// copies because the tie-break is on the logical index.
#include "common.h"
#include "convert.h"
#include "select.h"


// x - eps*s/std must round exactly like the reference: no fused multiply-add
// (GCC in ISO mode does not contract anyway; this tells clang).
#pragma STDC FP_CONTRACT OFF

namespace ascood {
namespace cpu {
namespace {

// Up to this many slots the sorted-buffer scan beats a full nth_element.
constexpr int64_t kSmallK = 32;

// Indices of the k (< n) largest keys of g[0, n), ties to the lower index:
// one scan keeping the best k seen so far, sorted best first. Indices arrive
// in increasing order, so a newcomer only displaces a strictly smaller key
// and goes after every equal key already held.
template <typename scalar_t>
void top_k_small(const scalar_t* g, int64_t n, int64_t k, int64_t* idx) {
  using key_t = key_of_t<scalar_t>;
  key_t keys[kSmallK];
  int64_t held = 0;
  for (int64_t i = 0; i < n; ++i) {
    const key_t key = magnitude_key(g[i]);
    if (held == k && key <= keys[k - 1]) continue;  // the usual case: one compare
    int64_t pos = held < k ? held++ : k - 1;
    while (pos > 0 && keys[pos - 1] < key) {
      keys[pos] = keys[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    keys[pos] = key;
    idx[pos] = i;
  }
}

// Same selection for large k: nth_element on (key, index) pairs.
template <typename scalar_t>
void top_k_large(const scalar_t* g, int64_t n, int64_t k, std::vector<std::pair<key_of_t<scalar_t>, int64_t>>& work,
                 int64_t* idx) {
  work.resize(n);
  for (int64_t i = 0; i < n; ++i) work[i] = {magnitude_key(g[i]), i};
  std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  for (int64_t i = 0; i < k; ++i) idx[i] = work[i].second;
}

// ODIN's step: x - eps * s / std[c], s = +1 if g >= 0 else -1 (NaN gives -1),
// in acc and rounded once. Same association as the reference:
// x - ((eps * s) / std).
template <typename scalar_t, typename acc = acc_t<scalar_t>>
C10_ALWAYS_INLINE scalar_t step(scalar_t x, scalar_t g, acc eps, acc std) {
  const acc s = to_acc<acc>(g) >= acc(0) ? acc(1) : acc(-1);
  return from_acc<scalar_t>(to_acc<acc>(x) - eps * s / std);
}

Tensor iodin_perturb_cpu(const Tensor& x, const Tensor& grad, double eps, const Tensor& channel_std,
                         int64_t k) {
  check_float_cpu(x, "x", 2);
  check_float_cpu(grad, "grad", 2);
  check_like(x, "x", grad, "grad");
  ASCOOD_CHECK(eps >= 0.0, "ascood (CPU): eps must be >= 0, got ", eps);
  ASCOOD_CHECK(k >= 1, "ascood (CPU): k must be >= 1, got ", k);
  const int64_t B = x.size(0);
  const int64_t C = x.size(1);
  ASCOOD_CHECK(channel_std.is_cpu(), "ascood (CPU): std must be a CPU tensor, got device ",
              channel_std.device());
  ASCOOD_CHECK(channel_std.scalar_type() == kFloat || channel_std.scalar_type() == kDouble,
              "ascood (CPU): std must have dtype float32 or float64, got ", channel_std.scalar_type());
  ASCOOD_CHECK(channel_std.dim() == 1 && channel_std.numel() == C, "ascood (CPU): std must have shape (C,) = (", C,
              ",) with C = x.size(1), got ", channel_std.sizes());

  const auto fmt = output_memory_format(x);
  const int64_t n = per_sample_numel(x);
  if (B == 0 || n == 0) return copy_into(empty_image_like(x, fmt), x);
  const Tensor xc = as_contiguous(x);
  const int64_t kk = std::min(k, n);
  // Work in NCHW order (unselected elements are copies of x; with k >= n
  // every element is written below), change layout last.
  Tensor out = empty_image_like(x, MemoryFormat::Contiguous);
  if (kk < n) copy_into(out, xc);
  const Tensor gc = as_contiguous(grad);
  const int64_t inner = n / C;  // elements per channel of a sample
  ASCOOD_DISPATCH_FLOATING(x.scalar_type(), "ascood_iodin_perturb_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const Tensor sd = as_contiguous(to_dtype(channel_std, std::is_same_v<acc, double> ? kDouble : kFloat));
    const acc* stdp = sd.const_data_ptr<acc>();
    const acc e = static_cast<acc>(eps);
    const scalar_t* xd = xc.const_data_ptr<scalar_t>();
    const scalar_t* gd = gc.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    if (kk == n) {
      // ODIN: every element moves; a plain elementwise sweep.
      torch::stable::parallel_for(0, B * C, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(inner, 1)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t bc = begin; bc < end; ++bc) {
                           const acc sc = stdp[bc % C];
                           const int64_t off = bc * inner;
                           for (int64_t i = 0; i < inner; ++i) od[off + i] = step(xd[off + i], gd[off + i], e, sc);
                         }
                       });
      return;
    }
    torch::stable::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> idx(kk);
      std::vector<std::pair<key_of_t<scalar_t>, int64_t>> work;
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* g = gd + b * n;
        if (kk <= kSmallK) {
          top_k_small(g, n, kk, idx.data());
        } else {
          top_k_large(g, n, kk, work, idx.data());
        }
        for (int64_t j = 0; j < kk; ++j) {
          const int64_t i = b * n + idx[j];
          od[i] = step(xd[i], gd[i], e, stdp[idx[j] / inner]);
        }
      }
    });
  });
  return as_contiguous(out, fmt);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ascood, CPU, m) {
  m.impl("iodin_perturb", TORCH_BOX(&iodin_perturb_cpu));
}

}  // namespace cpu
}  // namespace ascood
