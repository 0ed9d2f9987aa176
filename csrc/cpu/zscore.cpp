// zscore and zscore_backward on the CPU (docs/OPS.md): standardise the last
// dim with the unbiased std, `out = (h - mean) * rstd * sigma`,
// rstd = 1 / (std + eps). Rows run in parallel; each row is read from memory
// once per kernel (the second look at a row hits L1/L2).
#include "common.h"
#include "convert.h"
#include "reduce.h"


namespace ascood {
namespace cpu {
namespace {

// Rows are processed in blocks of this many elements: small enough that the
// two looks at a block (mean, then squared deviations) stay in L1.
constexpr int64_t kStatBlock = 4096;
// Elements a parallel task should at least get, so short rows are batched.
constexpr int64_t kGrainElems = 1 << 15;

template <typename acc>
struct RowStats {
  acc mean;
  acc m2;  // sum of squared deviations from the mean
};

// Mean and M2 of one row in a single sweep over memory: exact two-pass
// statistics per L1-resident block (no cancellation from sum-of-squares),
// combined across blocks with Chan et al.'s pairwise update.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
RowStats<acc> row_stats(const scalar_t* h, int64_t m) {
  RowStats<acc> s{0, 0};
  acc count = 0;
  for (int64_t start = 0; start < m; start += kStatBlock) {
    const int64_t len = std::min(kStatBlock, m - start);
    const scalar_t* p = h + start;
    const acc bmean = lane_sum<acc>(len, [&](int64_t i) { return to_acc<acc>(p[i]); }) / static_cast<acc>(len);
    const acc bm2 = lane_sum<acc>(len, [&](int64_t i) {
      const acc d = to_acc<acc>(p[i]) - bmean;
      return d * d;
    });
    if (start == 0) {
      s = {bmean, bm2};
      count = static_cast<acc>(len);
      continue;
    }
    const acc total = count + static_cast<acc>(len);
    const acc delta = bmean - s.mean;
    s.mean += delta * (static_cast<acc>(len) / total);
    s.m2 += bm2 + delta * delta * (count * static_cast<acc>(len) / total);
    count = total;
  }
  return s;
}

template <typename scalar_t>
void zscore_rows(const scalar_t* h, scalar_t* out, acc_t<scalar_t>* mean, acc_t<scalar_t>* rstd, int64_t rows,
                 int64_t m, double sigma, double eps) {
  using acc = acc_t<scalar_t>;
  const acc sig = static_cast<acc>(sigma);
  const acc ep = static_cast<acc>(eps);
  const acc dof = static_cast<acc>(m - 1);
  torch::stable::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / m), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* hr = h + r * m;
      scalar_t* orow = out + r * m;
      const RowStats<acc> s = row_stats(hr, m);
      const acc std = std::sqrt(s.m2 / dof);
      const acc rs = acc(1) / (std + ep);
      mean[r] = s.mean;
      rstd[r] = rs;
      const acc mu = s.mean;
      // Same association as the reference: ((h - mean) * rstd) * sigma.
      for (int64_t i = 0; i < m; ++i) {
        orow[i] = from_acc<scalar_t>((to_acc<acc>(hr[i]) - mu) * rs * sig);
      }
    }
  });
}

template <typename scalar_t>
void zscore_backward_rows(const scalar_t* gout, const scalar_t* h, const acc_t<scalar_t>* mean,
                          const acc_t<scalar_t>* rstd, scalar_t* dh, int64_t rows, int64_t m, double sigma) {
  using acc = acc_t<scalar_t>;
  const acc sig = static_cast<acc>(sigma);
  const acc dof = static_cast<acc>(m - 1);
  const acc mcount = static_cast<acc>(m);
  torch::stable::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / m), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gr = gout + r * m;
      const scalar_t* hr = h + r * m;
      scalar_t* dr = dh + r * m;
      const acc mu = mean[r];
      const acc rs = rstd[r];
      // One pass for sum(g), sum(g * xhat) and sum(xhat^2): std is
      // recomputed from xhat because 1/rstd - eps cancels when std << eps.
      constexpr int L = kLanes<acc>;
      acc lg[L] = {}, lgx[L] = {}, lxx[L] = {};
      int64_t i = 0;
      for (; i + L <= m; i += L) {
        for (int j = 0; j < L; ++j) {
          const acc g = to_acc<acc>(gr[i + j]) * sig;
          const acc xh = to_acc<acc>(hr[i + j]) - mu;
          lg[j] += g;
          lgx[j] += g * xh;
          lxx[j] += xh * xh;
        }
      }
      acc tg = 0, tgx = 0, txx = 0;
      for (; i < m; ++i) {
        const acc g = to_acc<acc>(gr[i]) * sig;
        const acc xh = to_acc<acc>(hr[i]) - mu;
        tg += g;
        tgx += g * xh;
        txx += xh * xh;
      }
      const acc sum_g = sum_lanes(lg) + tg;
      const acc dot = sum_lanes(lgx) + tgx;
      const acc std = std::sqrt((sum_lanes(lxx) + txx) / dof);
      const acc mean_g = sum_g / mcount;
      // The term through std; 0 for constant rows (std == 0), where the
      // forward is the constant 0.
      const acc coef = std > acc(0) ? dot * rs / (dof * std) : acc(0);
      for (int64_t e = 0; e < m; ++e) {
        const acc g = to_acc<acc>(gr[e]) * sig;
        const acc xh = to_acc<acc>(hr[e]) - mu;
        dr[e] = from_acc<scalar_t>(rs * (g - mean_g - xh * coef));
      }
    }
  });
}

// Shape of the per-row statistics: h.shape[:-1].
std::vector<int64_t> row_shape(const Tensor& h) {
  return std::vector<int64_t>(h.sizes().begin(), h.sizes().end() - 1);
}

void check_zscore_input(const Tensor& h, double sigma) {
  check_float_cpu(h, "h", 1);
  ASCOOD_CHECK(h.size(-1) >= 2, "ascood (CPU): zscore needs h.size(-1) >= 2 (unbiased std), got shape ", h.sizes());
  ASCOOD_CHECK(sigma > 0.0, "ascood (CPU): sigma must be > 0, got ", sigma);
}

std::tuple<Tensor, Tensor, Tensor> zscore_cpu(const Tensor& h, double sigma, double eps) {
  check_zscore_input(h, sigma);
  ASCOOD_CHECK(eps >= 0.0, "ascood (CPU): eps must be >= 0, got ", eps);
  const Tensor hc = as_contiguous(h);
  const int64_t m = h.size(-1);
  const int64_t rows = m ? h.numel() / m : 0;
  const auto acc_type = acc_scalar_type(h.scalar_type());
  Tensor out = empty_on(h, h.sizes(), h.scalar_type());
  advise_huge_pages(out);
  Tensor mean = empty_on(h, row_shape(h), acc_type);
  Tensor rstd = empty_on(h, row_shape(h), acc_type);
  if (rows == 0) return {out, mean, rstd};
  ASCOOD_DISPATCH_FLOATING(h.scalar_type(), "ascood_zscore_cpu", [&] {
    using acc = acc_t<scalar_t>;
    zscore_rows<scalar_t>(hc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                          mean.mutable_data_ptr<acc>(), rstd.mutable_data_ptr<acc>(), rows, m, sigma, eps);
  });
  return {out, mean, rstd};
}

Tensor zscore_backward_cpu(const Tensor& grad_out, const Tensor& h, const Tensor& mean,
                           const Tensor& rstd, double sigma) {
  check_zscore_input(h, sigma);
  check_like(h, "h", grad_out, "grad_out");
  const auto acc_type = acc_scalar_type(h.scalar_type());
  const auto stats_shape = row_shape(h);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"mean", mean}, {"rstd", rstd}}) {
    ASCOOD_CHECK(t.is_cpu(), "ascood (CPU): ", name, " must be a CPU tensor, got device ", t.device());
    ASCOOD_CHECK(t.scalar_type() == acc_type, "ascood (CPU): ", name, " must have dtype ", acc_type, " for h of dtype ",
                h.scalar_type(), ", got ", t.scalar_type());
    ASCOOD_CHECK(t.sizes() == IntArrayRef(stats_shape), "ascood (CPU): ", name, " must have shape h.shape[:-1] = ",
                IntArrayRef(stats_shape), ", got ", t.sizes());
  }
  const int64_t m = h.size(-1);
  const int64_t rows = h.numel() / m;
  Tensor dh = empty_on(h, h.sizes(), h.scalar_type());
  advise_huge_pages(dh);
  if (rows == 0) return dh;
  const Tensor gc = as_contiguous(grad_out), hc = as_contiguous(h);
  const Tensor mc = as_contiguous(mean), rc = as_contiguous(rstd);
  ASCOOD_DISPATCH_FLOATING(h.scalar_type(), "ascood_zscore_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    zscore_backward_rows<scalar_t>(gc.const_data_ptr<scalar_t>(), hc.const_data_ptr<scalar_t>(),
                                   mc.const_data_ptr<acc>(), rc.const_data_ptr<acc>(),
                                   dh.mutable_data_ptr<scalar_t>(), rows, m, sigma);
  });
  return dh;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ascood, CPU, m) {
  m.impl("zscore", TORCH_BOX(&zscore_cpu));
  m.impl("zscore_backward", TORCH_BOX(&zscore_backward_cpu));
}

}  // namespace cpu
}  // namespace ascood
