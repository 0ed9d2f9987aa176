// shuffle_outlier on the CPU (docs/OPS.md): per sample, the npix pixels of
// largest channel-summed saliency (ties to the lower pixel index, NaN
// largest) trade places as `perm` says; all channels move together.
//
// Per sample, on one thread (a sample's working set stays in L2/L3):
// 1. the float64 pixel scores, turned at once into 64-bit order keys;
// 2. the exact npix-th largest key by radix select (select.h);
// 3. the selected pixels gathered in index order (the order docs/OPS.md
//    prescribes, so nothing is sorted);
// 4. one sweep writing the output: each channel (or, channels-last, the whole
//    sample) is copied, then the npix moved pixels are overwritten while the
//    copy is still in cache (in ascending destination order).
// Contiguous and channels-last inputs are read in their own layout (no
// transposing copies); the output has the layout docs/OPS.md prescribes.
#include "common.h"
#include "convert.h"
#include "select.h"


#include <algorithm>
#include <cmath>
#include <cstring>

namespace ascood {
namespace cpu {
namespace {

// A total order on float64 scores as one unsigned integer: larger key =
// ranked first. NaN is the largest, -0 ties +0 (they compare equal as
// floats), and the other values order like the doubles.
C10_ALWAYS_INLINE uint64_t score_key(double v) {
  if (v == 0.0) v = 0.0;  // canonicalise -0
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  constexpr uint64_t kSign = uint64_t{1} << 63;
  const uint64_t key = (bits & kSign) ? ~bits : (bits | kSign);
  return std::isnan(v) ? ~uint64_t{0} : key;
}

// Layout of one sample of a (B, C, *spatial) tensor: element (c, p) sits at
// c * channel_stride + p * pixel_stride (contiguous: P, 1; channels-last: 1, C).
struct SampleLayout {
  int64_t channel_stride;
  int64_t pixel_stride;
};

inline SampleLayout layout_of(MemoryFormat fmt, int64_t channels, int64_t P) {
  return fmt == MemoryFormat::ChannelsLast ? SampleLayout{1, channels} : SampleLayout{P, 1};
}

// keys[p] = score_key(sum_c sal[c, p]), the float64 sum taken channel 0 first
// then 1, 2, ... (so every backend gets the same bits). Pixels go in tiles so
// the partial sums stay in L1 whatever the layout.
// Also sets key_min / key_max (P >= 1).
template <typename sal_t>
void pixel_keys(const sal_t* sal, int64_t channels, int64_t P, SampleLayout lay, uint64_t* keys, uint64_t& key_min,
                uint64_t& key_max) {
  constexpr int64_t kTile = 512;
  uint64_t mn = ~uint64_t{0}, mx = 0;
  double s[kTile];
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    const int64_t len = std::min(kTile, P - p0);
    const sal_t* base = sal + p0 * lay.pixel_stride;
    if (channels == 0) {  // x with no channels: nothing to sum, nothing moves visibly
      std::fill(s, s + len, 0.0);
    } else if (lay.pixel_stride == 1) {
      for (int64_t j = 0; j < len; ++j) s[j] = static_cast<double>(to_acc<float>(base[j]));
      for (int64_t c = 1; c < channels; ++c) {
        const sal_t* sc = base + c * lay.channel_stride;
        for (int64_t j = 0; j < len; ++j) s[j] += static_cast<double>(to_acc<float>(sc[j]));
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        const sal_t* px = base + j * lay.pixel_stride;
        double acc = static_cast<double>(to_acc<float>(px[0]));
        for (int64_t c = 1; c < channels; ++c) acc += static_cast<double>(to_acc<float>(px[c * lay.channel_stride]));
        s[j] = acc;
      }
    }
    for (int64_t j = 0; j < len; ++j) {
      const uint64_t k = score_key(s[j]);
      keys[p0 + j] = k;
      mn = std::min(mn, k);
      mx = std::max(mx, k);
    }
  }
  key_min = mn;
  key_max = mx;
}

// float64 saliency needs no widening (to_acc<float> would round it).
template <>
void pixel_keys<double>(const double* sal, int64_t channels, int64_t P, SampleLayout lay, uint64_t* keys,
                        uint64_t& key_min, uint64_t& key_max) {
  uint64_t mn = ~uint64_t{0}, mx = 0;
  for (int64_t p = 0; p < P; ++p) {
    const double* px = sal + p * lay.pixel_stride;
    double acc = channels == 0 ? 0.0 : px[0];
    for (int64_t c = 1; c < channels; ++c) acc += px[c * lay.channel_stride];
    const uint64_t k = score_key(acc);
    keys[p] = k;
    mn = std::min(mn, k);
    mx = std::max(mx, k);
  }
  key_min = mn;
  key_max = mx;
}

// Scratch one thread reuses for all its samples.
struct ShuffleScratch {
  std::vector<uint64_t> keys;
  SelectScratch<uint64_t> select;
  std::vector<uint64_t> sel_key;
  std::vector<int64_t> sel_idx;
  std::vector<int64_t> src;
  uint64_t key_min = 0, key_max = 0;  // of keys, set by pixel_keys
};

// w.sel_idx[0, npix) = the npix best pixels of one sample (ties at the
// threshold to the lower index), in ascending pixel order, from w.keys[0, P).
void select_pixels(ShuffleScratch& w, int64_t P, int64_t npix) {
  const uint64_t* keys = w.keys.data();
  uint64_t* sk = w.sel_key.data();
  int64_t* si = w.sel_idx.data();
  int64_t m = 0;
  uint64_t t = 0;
  if (npix == P) {
    for (int64_t p = 0; p < P; ++p) si[p] = p;
    m = P;
  } else {
    // Select on the offsets from the smallest key: their range is narrow, so
    // the radix digits start where the keys actually differ.
    const uint64_t range = w.key_max - w.key_min;
    t = w.key_min + kth_largest_bounded(keys, w.key_min, P, npix, range == 0 ? -1 : 63 - __builtin_clzll(range),
                                        w.select);
    // Every key >= t, in index order (branch-free: each is stored, the
    // cursor moves on a match; sk has room for P entries).
    for (int64_t p = 0; p < P; ++p) {
      const uint64_t k = keys[p];
      sk[m] = k;
      si[m] = p;
      m += k >= t;
    }
    if (m > npix) {
      // More ties at t than places: keep the first (npix - #above) of them.
      int64_t above = 0;
      for (int64_t i = 0; i < m; ++i) above += sk[i] > t;
      int64_t ties_left = npix - above;
      int64_t j = 0;
      for (int64_t i = 0; i < m; ++i) {
        const bool take = sk[i] > t || ties_left > 0;
        ties_left -= sk[i] == t && take;
        sk[j] = sk[i];
        si[j] = si[i];
        j += take;
      }
      m = j;
    }
  }
  ASCOOD_CHECK(m == npix, "ascood (CPU): shuffle selection found ", m, " pixels, want ", npix);
}

// out = x with out[:, sel[i]] = x[:, src[i]] for every channel, one sample.
template <typename scalar_t>
void write_sample(const scalar_t* x, scalar_t* out, int64_t channels, int64_t P, SampleLayout lay,
                  const int64_t* sel, const int64_t* src, int64_t npix) {
  if (lay.pixel_stride == 1) {
    // Channel by channel: the copy of one channel is still in L1/L2 when its
    // moved pixels are overwritten.
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* xc = x + c * P;
      scalar_t* oc = out + c * P;
      std::memcpy(oc, xc, P * sizeof(scalar_t));
      for (int64_t i = 0; i < npix; ++i) oc[sel[i]] = xc[src[i]];
    }
    return;
  }
  std::memcpy(out, x, channels * P * sizeof(scalar_t));
  for (int64_t i = 0; i < npix; ++i) {
    const scalar_t* s = x + src[i] * channels;
    scalar_t* d = out + sel[i] * channels;
    for (int64_t c = 0; c < channels; ++c) d[c] = s[c];
  }
}

Tensor shuffle_outlier_cpu(const Tensor& x, const Tensor& saliency, double p_inv, const Tensor& perm) {
  check_float_cpu(x, "x", 2);
  check_float_cpu(saliency, "saliency", 1);
  ASCOOD_CHECK(p_inv > 0.0 && p_inv <= 1.0, "ascood (CPU): p_inv must be in (0, 1], got ", p_inv);
  const int64_t B = x.size(0);
  const int64_t C = x.size(1);
  int64_t P = 1;
  for (int64_t d = 2; d < x.dim(); ++d) P *= x.size(d);
  // saliency is x-shaped or (B, *spatial).
  const bool per_channel = saliency.dim() == x.dim();
  if (per_channel) {
    ASCOOD_CHECK(saliency.sizes() == x.sizes(), "ascood (CPU): saliency must have x's shape ", x.sizes(),
                " or (B, *spatial), got ", saliency.sizes());
  } else {
    std::vector<int64_t> want{B};
    for (int64_t d = 2; d < x.dim(); ++d) want.push_back(x.size(d));
    ASCOOD_CHECK(saliency.sizes() == IntArrayRef(want), "ascood (CPU): saliency must have x's shape ", x.sizes(),
                " or (B, *spatial) = ", IntArrayRef(want), ", got ", saliency.sizes());
  }
  const int64_t npix = count_from_fraction(p_inv, P);
  ASCOOD_CHECK(perm.is_cpu(), "ascood (CPU): perm must be a CPU tensor, got device ", perm.device());
  ASCOOD_CHECK(perm.scalar_type() == kLong, "ascood (CPU): perm must have dtype int64, got ", perm.scalar_type());
  ASCOOD_CHECK(perm.dim() == 2 && perm.size(0) == B && perm.size(1) == npix,
              "ascood (CPU): perm must have shape (B, npix) = (", B, ", ", npix, ") with npix = int(p_inv * P), got ",
              perm.sizes());
  const Tensor pc = as_contiguous(perm);
  const int64_t* pd = pc.const_data_ptr<int64_t>();
  // A bad perm would index out of the sample (out of range) or copy one pixel into several places
  // (a repeated value): refuse both before any write.
  std::vector<char> seen(static_cast<size_t>(npix));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t i = 0; i < npix; ++i) {
      const int64_t v = pd[b * npix + i];
      ASCOOD_CHECK(v >= 0 && v < npix, "ascood (CPU): perm values must be in [0, npix) = [0, ", npix, "), got ", v);
      ASCOOD_CHECK(!seen[v], "ascood (CPU): perm must hold a permutation of 0..npix-1 in every row (each value "
                  "exactly once); row ", b, " repeats ", v);
      seen[v] = 1;
    }
  }

  const auto fmt = output_memory_format(x);
  if (B == 0 || npix == 0) return copy_into(empty_image_like(x, fmt), x);
  // x is read in the output's layout (a no-op for contiguous and
  // channels-last inputs); the saliency in its own when that is one of the two.
  const Tensor xc = as_contiguous(x, fmt);
  const auto sal_fmt = per_channel ? output_memory_format(saliency) : MemoryFormat::Contiguous;
  const Tensor sc = as_contiguous(saliency, sal_fmt);
  const int64_t sal_channels = per_channel ? C : 1;
  const SampleLayout x_lay = layout_of(fmt, C, P);
  const SampleLayout s_lay = layout_of(sal_fmt, sal_channels, P);
  Tensor out = empty_image_like(x, fmt);
  ASCOOD_DISPATCH_FLOATING(x.scalar_type(), "ascood_shuffle_outlier_cpu", [&] {
    const scalar_t* xd = xc.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    ASCOOD_DISPATCH_FLOATING(saliency.scalar_type(), "ascood_shuffle_scores", [&] {
      using sal_t = scalar_t;
      const sal_t* sd = sc.const_data_ptr<sal_t>();
      torch::stable::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        ShuffleScratch w;
        w.keys.resize(P);
        w.sel_key.resize(P);
        w.sel_idx.resize(P);
        w.src.resize(npix);
        for (int64_t b = begin; b < end; ++b) {
          pixel_keys(sd + b * sal_channels * P, sal_channels, P, s_lay, w.keys.data(), w.key_min, w.key_max);
          select_pixels(w, P, npix);
          const int64_t* sel = w.sel_idx.data();
          const int64_t* pb = pd + b * npix;
          for (int64_t i = 0; i < npix; ++i) w.src[i] = sel[pb[i]];
          write_sample(xd + b * C * P, od + b * C * P, C, P, x_lay, sel, w.src.data(), npix);
        }
      });
    });
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ascood, CPU, m) {
  m.impl("shuffle_outlier", TORCH_BOX(&shuffle_outlier_cpu));
}

}  // namespace cpu
}  // namespace ascood
