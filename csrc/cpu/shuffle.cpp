// shuffle_outlier on the CPU (docs/OPS.md): per sample, the npix pixels of
// largest channel-summed saliency (ties to the lower pixel index, NaN
// largest) trade places as `perm` says; all channels move together.
//
// Work is on plain-contiguous (NCHW) copies because the tie-break is on the
// logical pixel index; the result is converted to the output layout last.
#include "common.h"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace ascood {
namespace cpu {
namespace {

// Per-pixel score s (float64), summed over channels in order 0, 1, 2, ...
// so every backend gets the same bits. sal points at one sample.
template <typename sal_t>
void pixel_scores(const sal_t* sal, int64_t channels, int64_t P, double* s) {
  if (channels == 0) {  // x with no channels: nothing to sum, nothing moves visibly
    std::fill(s, s + P, 0.0);
    return;
  }
  for (int64_t p = 0; p < P; ++p) s[p] = static_cast<double>(sal[p]);
  for (int64_t c = 1; c < channels; ++c) {
    const sal_t* sc = sal + c * P;
    for (int64_t p = 0; p < P; ++p) s[p] += static_cast<double>(sc[p]);
  }
}

// A total order on scores as one integer: larger key = ranked first. NaN is
// the largest, -0 ties +0 (they compare equal as floats), and finite values
// order like the doubles. Ties are then broken by the pixel index.
inline uint64_t score_key(double v) {
  if (std::isnan(v)) return ~uint64_t{0};
  if (v == 0.0) v = 0.0;  // canonicalise -0
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  constexpr uint64_t kSign = uint64_t{1} << 63;
  return (bits & kSign) ? ~bits : (bits | kSign);
}

struct Ranked {
  uint64_t key;
  int64_t index;
};

// sel[0, npix) = the npix best pixels, best first: key descending, index
// ascending. nth_element + sort of the head only: O(P + npix log npix).
void select_pixels(const double* s, int64_t P, int64_t npix, std::vector<Ranked>& work, int64_t* sel) {
  work.resize(P);
  for (int64_t p = 0; p < P; ++p) work[p] = {score_key(s[p]), p};
  const auto before = [](const Ranked& a, const Ranked& b) {
    return a.key != b.key ? a.key > b.key : a.index < b.index;
  };
  if (npix < P) std::nth_element(work.begin(), work.begin() + npix, work.end(), before);
  std::sort(work.begin(), work.begin() + npix, before);
  for (int64_t i = 0; i < npix; ++i) sel[i] = work[i].index;
}

at::Tensor shuffle_outlier_cpu(const at::Tensor& x, const at::Tensor& saliency, double p_inv, const at::Tensor& perm) {
  check_float_cpu(x, "x", 2);
  check_float_cpu(saliency, "saliency", 1);
  TORCH_CHECK(p_inv > 0.0 && p_inv <= 1.0, "ascood (CPU): p_inv must be in (0, 1], got ", p_inv);
  const int64_t B = x.size(0);
  const int64_t C = x.size(1);
  int64_t P = 1;
  for (int64_t d = 2; d < x.dim(); ++d) P *= x.size(d);
  // saliency is x-shaped or (B, *spatial).
  const bool per_channel = saliency.dim() == x.dim();
  if (per_channel) {
    TORCH_CHECK(saliency.sizes() == x.sizes(), "ascood (CPU): saliency must have x's shape ", x.sizes(),
                " or (B, *spatial), got ", saliency.sizes());
  } else {
    std::vector<int64_t> want{B};
    for (int64_t d = 2; d < x.dim(); ++d) want.push_back(x.size(d));
    TORCH_CHECK(saliency.sizes() == at::IntArrayRef(want), "ascood (CPU): saliency must have x's shape ", x.sizes(),
                " or (B, *spatial) = ", at::IntArrayRef(want), ", got ", saliency.sizes());
  }
  const int64_t npix = count_from_fraction(p_inv, P);
  TORCH_CHECK(perm.device().is_cpu(), "ascood (CPU): perm must be a CPU tensor, got device ", perm.device());
  TORCH_CHECK(perm.scalar_type() == at::kLong, "ascood (CPU): perm must have dtype int64, got ", perm.scalar_type());
  TORCH_CHECK(perm.dim() == 2 && perm.size(0) == B && perm.size(1) == npix,
              "ascood (CPU): perm must have shape (B, npix) = (", B, ", ", npix, ") with npix = int(p_inv * P), got ",
              perm.sizes());
  const at::Tensor pc = perm.contiguous();
  const int64_t* pd = pc.const_data_ptr<int64_t>();
  // A bad perm would index out of the sample (out of range) or copy one pixel into several places
  // (a repeated value): refuse both before any write.
  std::vector<char> seen(static_cast<size_t>(npix));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t i = 0; i < npix; ++i) {
      const int64_t v = pd[b * npix + i];
      TORCH_CHECK(v >= 0 && v < npix, "ascood (CPU): perm values must be in [0, npix) = [0, ", npix, "), got ", v);
      TORCH_CHECK(!seen[v], "ascood (CPU): perm must hold a permutation of 0..npix-1 in every row (each value "
                  "exactly once); row ", b, " repeats ", v);
      seen[v] = 1;
    }
  }

  const auto fmt = output_memory_format(x);
  if (B == 0 || npix == 0) return empty_image_like(x, fmt).copy_(x);
  const at::Tensor xc = x.contiguous();
  // Work in NCHW order (unselected pixels are copies of x), change layout last.
  at::Tensor out = empty_image_like(x, at::MemoryFormat::Contiguous).copy_(xc);
  const at::Tensor sc = saliency.contiguous();
  const int64_t sal_channels = per_channel ? C : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ascood_shuffle_outlier_cpu", [&] {
    const scalar_t* xd = xc.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saliency.scalar_type(), "ascood_shuffle_scores", [&] {
      using sal_t = scalar_t;
      const sal_t* sd = sc.const_data_ptr<sal_t>();
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<double> s(P);
        std::vector<Ranked> work;
        std::vector<int64_t> sel(npix);
        for (int64_t b = begin; b < end; ++b) {
          pixel_scores(sd + b * sal_channels * P, sal_channels, P, s.data());
          select_pixels(s.data(), P, npix, work, sel.data());
          const int64_t* pb = pd + b * npix;
          for (int64_t c = 0; c < C; ++c) {
            const auto* xs = xd + (b * C + c) * P;
            auto* os = od + (b * C + c) * P;
            for (int64_t i = 0; i < npix; ++i) os[sel[i]] = xs[sel[pb[i]]];
          }
        }
      });
    });
  });
  return out.contiguous(fmt);
}

}  // namespace

TORCH_LIBRARY_IMPL(ascood, CPU, m) {
  m.impl("shuffle_outlier", &shuffle_outlier_cpu);
}

}  // namespace cpu
}  // namespace ascood
