// zscore forward and backward on CUDA (docs/OPS.md): one block per row (a
// grid-stride loop over rows), statistics in float32 (float64 for float64).
// Each kernel reads its row from global memory once; the repeat reads of the
// row within the block (mean, then squared deviations, then the output) hit
// L1/L2. Sums: per-thread sequential, warp shuffles, then a sequential sum of
// the warp partials (deterministic for a given row length).
#include "common.cuh"


#include <algorithm>
#include <cmath>

namespace ascood {
namespace cuda {
namespace {

constexpr int64_t kMaxRowBlocks = 1 << 20;

int zscore_threads(int64_t m) {
  const int64_t warps = std::min<int64_t>(8, std::max<int64_t>(1, ceil_div(m, 128)));
  return static_cast<int>(32 * warps);
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    zscore_fwd_kernel(const scalar_t* __restrict__ h, scalar_t* __restrict__ out, acc_t<scalar_t>* __restrict__ mean,
                      acc_t<scalar_t>* __restrict__ rstd, int64_t rows, int64_t m, acc_t<scalar_t> sigma,
                      acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  ASCOOD_SHARED(acc[32], sh);
  const acc mf = static_cast<acc>(m);
  const acc m1 = static_cast<acc>(m - 1);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // uniform over the block
    if (r >= gridDim.x) ASCOOD_PATH("grid-stride pass >= 2");
    const scalar_t* hr = h + r * m;
    scalar_t* outr = out + r * m;
    acc s = acc(0);
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) s += static_cast<acc>(hr[i]);
    s = block_sum(s, sh);
    const acc mu = div_rn(s, mf);
    acc q = acc(0);
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const acc d = sub_rn(static_cast<acc>(hr[i]), mu);
      q += d * d;
    }
    q = block_sum(q, sh);
    const acc sd = sqrt(div_rn(q, m1));
    const acc rs = div_rn(acc(1), add_rn(sd, eps));
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      outr[i] = static_cast<scalar_t>(mul_rn(mul_rn(sub_rn(static_cast<acc>(hr[i]), mu), rs), sigma));
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    zscore_bwd_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ h,
                      const acc_t<scalar_t>* __restrict__ mean, const acc_t<scalar_t>* __restrict__ rstd,
                      scalar_t* __restrict__ dh, int64_t rows, int64_t m, acc_t<scalar_t> sigma) {
  using acc = acc_t<scalar_t>;
  ASCOOD_SHARED(acc[32], sh);
  const acc mf = static_cast<acc>(m);
  const acc m1 = static_cast<acc>(m - 1);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // uniform over the block
    if (r >= gridDim.x) ASCOOD_PATH("grid-stride pass >= 2");
    const scalar_t* gr = grad_out + r * m;
    const scalar_t* hr = h + r * m;
    scalar_t* dr = dh + r * m;
    const acc mu = mean[r];
    const acc rs = rstd[r];
    acc sg = acc(0), sgx = acc(0), sxx = acc(0);
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const acc g = mul_rn(static_cast<acc>(gr[i]), sigma);
      const acc xh = sub_rn(static_cast<acc>(hr[i]), mu);
      sg += g;
      sgx += g * xh;
      sxx += xh * xh;
    }
    sg = block_sum(sg, sh);
    sgx = block_sum(sgx, sh);
    sxx = block_sum(sxx, sh);
    const acc sd = sqrt(div_rn(sxx, m1));  // recomputed from xhat, not 1/rstd - eps
    const acc gmean = div_rn(sg, mf);
    const bool through = sd > acc(0);  // std == 0 (or NaN): the term through the std is 0
    const acc denom = mul_rn(m1, sd);
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const acc g = mul_rn(static_cast<acc>(gr[i]), sigma);
      const acc xh = sub_rn(static_cast<acc>(hr[i]), mu);
      const acc ts = through ? div_rn(mul_rn(mul_rn(xh, sgx), rs), denom) : acc(0);
      dr[i] = static_cast<scalar_t>(mul_rn(rs, sub_rn(sub_rn(g, gmean), ts)));
    }
  }
}

std::vector<int64_t> stat_shape(const Tensor& h) {
  return std::vector<int64_t>(h.sizes().begin(), h.sizes().end() - 1);
}

std::tuple<Tensor, Tensor, Tensor> zscore_cuda(const Tensor& h, double sigma, double eps) {
  check_cuda_float(h, "h");
  ASCOOD_CHECK(h.dim() >= 1, "h must have rank >= 1, got a 0-dim tensor");
  ASCOOD_CHECK(h.size(-1) >= 2, "h must have >= 2 features in its last dim (unbiased std), got shape ", h.sizes());
  ASCOOD_CHECK(sigma > 0.0, "sigma must be > 0, got ", sigma);
  ASCOOD_CHECK(eps >= 0.0, "eps must be >= 0, got ", eps);
  KernelDeviceGuard guard(h.get_device_index());
  const auto acc_type = acc_scalar_type(h.scalar_type());
  const auto hc = as_contiguous(h);
  auto out = empty_on(h, h.sizes(), h.scalar_type());
  auto mean = empty_on(h, stat_shape(h), acc_type);
  auto rstd = empty_on(h, stat_shape(h), acc_type);
  const int64_t m = h.size(-1);
  const int64_t rows = h.numel() / m;
  if (rows == 0) return {out, mean, rstd};
  const cudaStream_t stream = current_stream();
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>(rows, ASCOOD_TUNABLE("zscore_max_blocks", kMaxRowBlocks)));
  const int threads = zscore_threads(m);
  ASCOOD_DISPATCH_FLOATING(h.scalar_type(), "ascood_zscore_cuda", [&] {
    using acc = acc_t<scalar_t>;
    ASCOOD_LAUNCH(zscore_fwd_kernel<scalar_t>, blocks, threads, 0, stream, hc.const_data_ptr<scalar_t>(),
                  out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc>(), rstd.mutable_data_ptr<acc>(), rows, m,
                  static_cast<acc>(sigma), static_cast<acc>(eps));
  });
  return {out, mean, rstd};
}

Tensor zscore_backward_cuda(const Tensor& grad_out, const Tensor& h, const Tensor& mean,
                            const Tensor& rstd, double sigma) {
  check_cuda_float(h, "h");
  check_cuda_float(grad_out, "grad_out");
  check_like(h, "h", grad_out, "grad_out");
  ASCOOD_CHECK(h.dim() >= 1, "h must have rank >= 1, got a 0-dim tensor");
  ASCOOD_CHECK(h.size(-1) >= 2, "h must have >= 2 features in its last dim (unbiased std), got shape ", h.sizes());
  ASCOOD_CHECK(sigma > 0.0, "sigma must be > 0, got ", sigma);
  const auto acc_type = acc_scalar_type(h.scalar_type());
  const int64_t m = h.size(-1);
  const int64_t rows = h.numel() / m;
  const char* names[2] = {"mean", "rstd"};
  const Tensor* stats[2] = {&mean, &rstd};
  for (int j = 0; j < 2; ++j) {
    const Tensor& s = *stats[j];
    ASCOOD_CHECK(s.defined() && s.device() == h.device(), names[j], " must be on h's device ", h.device());
    ASCOOD_CHECK(s.scalar_type() == acc_type, names[j], " must have dtype ", acc_type, ", got ", s.scalar_type());
    ASCOOD_CHECK(s.numel() == rows, names[j], " must have shape h.shape[:-1] (", rows, " elements), got shape ",
                s.sizes());
  }
  KernelDeviceGuard guard(h.get_device_index());
  auto dh = empty_on(h, h.sizes(), h.scalar_type());
  if (rows == 0) return dh;
  const auto hc = as_contiguous(h);
  const auto gc = as_contiguous(grad_out);
  const auto mc = as_contiguous(mean);
  const auto rc = as_contiguous(rstd);
  const cudaStream_t stream = current_stream();
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>(rows, ASCOOD_TUNABLE("zscore_max_blocks", kMaxRowBlocks)));
  const int threads = zscore_threads(m);
  ASCOOD_DISPATCH_FLOATING(h.scalar_type(), "ascood_zscore_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    ASCOOD_LAUNCH(zscore_bwd_kernel<scalar_t>, blocks, threads, 0, stream, gc.const_data_ptr<scalar_t>(),
                  hc.const_data_ptr<scalar_t>(), mc.const_data_ptr<acc>(), rc.const_data_ptr<acc>(),
                  dh.mutable_data_ptr<scalar_t>(), rows, m, static_cast<acc>(sigma));
  });
  return dh;
}

}  // namespace
}  // namespace cuda
}  // namespace ascood

ASCOOD_CUDA_OPS_IMPL(m) {
  m.impl("zscore", TORCH_BOX(&ascood::cuda::zscore_cuda));
  m.impl("zscore_backward", TORCH_BOX(&ascood::cuda::zscore_backward_cuda));
}
