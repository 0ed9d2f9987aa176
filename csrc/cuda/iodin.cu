// iodin_perturb on CUDA (docs/OPS.md): per sample, the kk = min(k, n) elements
// of largest key(grad), ties to the LOWER logical index, move by
// -eps * s / std[c]. Inputs are made standard-contiguous (so the index is the
// logical one); the result is converted to the output memory format at the end.
//
// * kk >= n: every element moves (elementwise kernel).
// * kk <= kRoundsMaxK: one block per sample runs kk rounds of a block-wide
//   argmax on (key desc, index asc); round r only considers elements after the
//   previous winner in that total order. kk = 1 (i-ODIN) is a single pass.
// * otherwise: one block per sample radix-selects the kk-th largest key t and
//   the number `need` of elements with key == t that belong to the top kk,
//   then one ordered pass moves every key > t element and the first `need`
//   elements with key == t (block-wide ballot scan in index order).
#include "common.cuh"


#include <algorithm>

namespace ascood {
namespace cuda {
namespace {

constexpr int kIodinThreads = 512;
constexpr int64_t kRoundsMaxK = 8;

template <typename scalar_t>
__device__ __forceinline__ scalar_t iodin_value(scalar_t xv, scalar_t gv, acc_t<scalar_t> std_c,
                                                acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  const acc s = static_cast<acc>(gv) >= acc(0) ? acc(1) : acc(-1);  // NaN -> -1
  const acc step = div_rn(mul_rn(eps, s), std_c);
  return static_cast<scalar_t>(sub_rn(static_cast<acc>(xv), step));
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    iodin_all_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                     const acc_t<scalar_t>* __restrict__ stdv, scalar_t* __restrict__ out, int64_t total, int64_t n,
                     int64_t hw, acc_t<scalar_t> eps) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    if (i >= stride) ASCOOD_PATH("grid-stride pass >= 2");
    const int64_t c = (i % n) / hw;
    out[i] = iodin_value<scalar_t>(x[i], g[i], stdv[c], eps);
  }
}

// (ka, ia) before (kb, ib) in the selection order: key desc, index asc.
template <typename wide_t>
__device__ __forceinline__ bool precedes(wide_t ka, int ia, wide_t kb, int ib) {
  return ka > kb || (ka == kb && ia < ib);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kIodinThreads)
    iodin_rounds_kernel(const scalar_t* __restrict__ x, const typename KeyTraits<scalar_t>::bits_t* __restrict__ g,
                        const acc_t<scalar_t>* __restrict__ stdv, scalar_t* __restrict__ out, int64_t n,
                        int64_t hw, int kk, acc_t<scalar_t> eps) {
  using Tr = KeyTraits<scalar_t>;
  using bits_t = typename Tr::bits_t;
  using wide_t = typename Tr::wide_t;
  ASCOOD_SHARED(wide_t[32], s_key);
  ASCOOD_SHARED(int[32], s_idx);
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  const int nw = blockDim.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * n;
  const bits_t* gr = g + row;
  wide_t last_key = 0;
  int last_idx = -1;
  for (int r = 0; r < kk; ++r) {
    // Sentinel (0, INT_MAX): every real element precedes it. kk <= n, so each
    // round has at least one eligible element.
    wide_t bk = 0;
    int bi = std::numeric_limits<int>::max();
    // 64-bit loop index: n may be up to 2^31 - 1 (host check), where i + blockDim.x
    // overflows an int; an index itself (< n) always fits in an int.
    for (int64_t i64 = threadIdx.x; i64 < n; i64 += blockDim.x) {
      const int i = static_cast<int>(i64);
      const wide_t key = key_of<scalar_t>(gr[i]);
      const bool eligible = r == 0 || precedes<wide_t>(last_key, last_idx, key, i);
      if (eligible && precedes<wide_t>(key, i, bk, bi)) {
        bk = key;
        bi = i;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const wide_t ok = __shfl_xor_sync(kFullMask, bk, off);
      const int oi = __shfl_xor_sync(kFullMask, bi, off);
      if (precedes<wide_t>(ok, oi, bk, bi)) {
        bk = ok;
        bi = oi;
      }
    }
    __syncthreads();  // the previous round's readers are done with s_key/s_idx
    if (lane == 0) {
      s_key[wid] = bk;
      s_idx[wid] = bi;
    }
    __syncthreads();
    bk = s_key[0];
    bi = s_idx[0];
    for (int w = 1; w < nw; ++w) {
      if (precedes<wide_t>(s_key[w], s_idx[w], bk, bi)) {
        bk = s_key[w];
        bi = s_idx[w];
      }
    }
    last_key = bk;
    last_idx = bi;
    if (threadIdx.x == 0 && bi >= 0 && bi < n) {
      out[row + bi] = iodin_value<scalar_t>(x[row + bi], Tr::to_scalar(gr[bi]), stdv[bi / hw], eps);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kIodinThreads)
    iodin_radix_kernel(const scalar_t* __restrict__ x, const typename KeyTraits<scalar_t>::bits_t* __restrict__ g,
                       const acc_t<scalar_t>* __restrict__ stdv, scalar_t* __restrict__ out, int64_t n,
                       int64_t hw, unsigned kk, acc_t<scalar_t> eps) {
  using Tr = KeyTraits<scalar_t>;
  using bits_t = typename Tr::bits_t;
  using wide_t = typename Tr::wide_t;
  ASCOOD_SHARED(unsigned[kMaxBins], hist);
  ASCOOD_SHARED(wide_t, s_prefix);
  ASCOOD_SHARED(unsigned, s_krem);
  ASCOOD_SHARED(unsigned[32], s_wcount);
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  const int nw = blockDim.x >> 5;
  const unsigned lt_mask = (1u << lane) - 1u;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * n;
  const bits_t* gr = g + row;
  wide_t t;
  unsigned need;
  block_radix_select<scalar_t>(gr, n, kk, hist, &s_prefix, &s_krem, t, need);
  unsigned running = 0;  // elements with key == t before the current tile
  // `base` is uniform over the block: every thread reaches the barriers and ballots.
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < n;
    const bits_t gb = valid ? gr[i] : bits_t(0);
    const wide_t key = key_of<scalar_t>(gb);
    const bool gt = valid && key > t;
    const bool eq = valid && key == t;
    const unsigned bal = __ballot_sync(kFullMask, eq);
    __syncthreads();  // the previous tile's readers are done with s_wcount
    if (lane == 0) s_wcount[wid] = static_cast<unsigned>(__popc(bal));
    __syncthreads();
    unsigned before = 0, total = 0;
    for (int w = 0; w < nw; ++w) {
      const unsigned c = s_wcount[w];
      if (w < wid) before += c;
      total += c;
    }
    const unsigned rank = running + before + static_cast<unsigned>(__popc(bal & lt_mask));
    if (gt || (eq && rank < need)) {
      out[row + i] = iodin_value<scalar_t>(x[row + i], Tr::to_scalar(gb), stdv[i / hw], eps);
    }
    running += total;
  }
}

Tensor iodin_perturb_cuda(const Tensor& x, const Tensor& grad, double eps, const Tensor& stdev,
                          int64_t k) {
  check_cuda_float(x, "x");
  check_cuda_float(grad, "grad");
  check_like(x, "x", grad, "grad");
  ASCOOD_CHECK(x.dim() >= 2, "x must have rank >= 2 (batch, channel, ...), got shape ", x.sizes());
  ASCOOD_CHECK(eps >= 0.0, "eps must be >= 0, got ", eps);
  ASCOOD_CHECK(k >= 1, "k must be >= 1, got ", k);
  ASCOOD_CHECK(stdev.defined() && is_floating_type(stdev.scalar_type()), "std must be a floating tensor");
  const int64_t C = x.size(1);
  ASCOOD_CHECK(stdev.numel() == C, "std must hold one value per channel (", C, "), got shape ", stdev.sizes());
  KernelDeviceGuard guard(x.get_device_index());
  const auto fmt = image_output_format(x);
  if (x.numel() == 0) return empty_on(x, x.sizes(), x.scalar_type(), fmt);
  const int64_t B = x.size(0);
  const int64_t n = x.numel() / B;
  const int64_t hw = n / C;
  ASCOOD_CHECK(n <= static_cast<int64_t>(std::numeric_limits<int>::max()),
              "ascood CUDA kernels support at most 2^31 - 1 elements per sample, got ", n);
  const auto acc_type = acc_scalar_type(x.scalar_type());
  const auto stdc = as_contiguous(torch::stable::to(stdev, acc_type, std::nullopt, x.device()));
  const auto xc = as_contiguous(x);
  const auto gc = as_contiguous(grad);
  const int64_t kk = std::min(k, n);
  const cudaStream_t stream = current_stream();
  Tensor out;
  ASCOOD_DISPATCH_FLOATING(x.scalar_type(), "ascood_iodin_perturb_cuda", [&] {
    using acc = acc_t<scalar_t>;
    using bits_t = typename KeyTraits<scalar_t>::bits_t;
    const acc e = static_cast<acc>(eps);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const acc* sp = stdc.const_data_ptr<acc>();
    if (kk >= n) {
      out = empty_on(x, x.sizes(), x.scalar_type());
      const int64_t total = B * n;
      const int64_t max_blocks = ASCOOD_TUNABLE("iodin_all_blocks_per_sm", 32) * num_sms();
      const unsigned blocks =
          static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, 256), max_blocks)));
      ASCOOD_LAUNCH(iodin_all_kernel<scalar_t>, blocks, 256, 0, stream, xp, gc.const_data_ptr<scalar_t>(), sp,
                    out.mutable_data_ptr<scalar_t>(), total, n, hw, e);
      return;
    }
    out = copy_into(empty_on(xc, xc.sizes(), xc.scalar_type()), xc);
    const bits_t* gp = reinterpret_cast<const bits_t*>(gc.const_data_ptr());
    if (kk <= kRoundsMaxK) {
      ASCOOD_LAUNCH(iodin_rounds_kernel<scalar_t>, static_cast<unsigned>(B), kIodinThreads, 0, stream, xp, gp, sp,
                    out.mutable_data_ptr<scalar_t>(), n, hw, static_cast<int>(kk), e);
    } else {
      ASCOOD_LAUNCH(iodin_radix_kernel<scalar_t>, static_cast<unsigned>(B), kIodinThreads, 0, stream, xp, gp, sp,
                    out.mutable_data_ptr<scalar_t>(), n, hw, static_cast<unsigned>(kk), e);
    }
  });
  return as_contiguous(out, fmt);
}

}  // namespace
}  // namespace cuda
}  // namespace ascood

ASCOOD_CUDA_OPS_IMPL(m) {
  m.impl("iodin_perturb", TORCH_BOX(&ascood::cuda::iodin_perturb_cuda));
}
