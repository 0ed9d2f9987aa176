// invariant_mask and gradient_outlier on CUDA (docs/OPS.md).
//
// Per sample, t = the exact k-th largest magnitude key (k = int(p_inv * n)) and
// the mask is key >= t (ties kept). Two paths:
//
// * small rows (row of raw bits <= kSmallBytes): one block per sample loads the
//   row's raw bits into shared memory, radix-selects t there (11-bit digits),
//   then writes the output reading x once: one pass over global memory.
//
// * large rows: a multi-block radix select whose state lives on the device
//   (no host synchronisation), grid (blocks_per_sample, B):
//     K1 hist_top      full read of g: shared histogram of the top digit,
//                      flushed with atomics into a per-sample global histogram
//     K2 select_digit  one warp per sample: digit of the k-th largest, updates
//                      the per-sample prefix / remaining count, re-zeroes the
//                      histogram
//     K3 split         full read of g (and x): elements whose top digit is
//                      above/below the selected one are final and written now;
//                      the boundary bucket is appended (indices) to a
//                      per-sample candidate list and histogrammed on digit 2
//     K2, then per further digit K4 hist_cand (candidates only) and K2
//     K5 apply_cand    writes the output of the candidates (key >= t)
//   Global traffic per float32 element: 4 (K1) + 12 (K3: g, x, out) bytes plus
//   ~28 bytes per boundary candidate (usually a small fraction of the row).
#include "common.cuh"


#include <algorithm>

namespace ascood {
namespace cuda {
namespace {

constexpr int kSmallThreads = 512;
// Row bytes kept on chip: float32 n <= 8192, 16-bit n <= 16384, float64 n <= 4096.
// 32 KiB dynamic + ~8 KiB static (histogram) stays under the 48 KiB a launch
// may use without cudaFuncSetAttribute.
constexpr int64_t kSmallBytes = 32 * 1024;
constexpr int kLargeThreads = 256;
constexpr int64_t kMaxGridY = 65535;
// Candidate-list budget of the large-row path, in int32 entries (64 MiB).
constexpr int64_t kCandBudget = int64_t(1) << 24;

template <typename scalar_t>
struct SelectTypes {
  using Tr = KeyTraits<scalar_t>;
  using bits_t = typename Tr::bits_t;
  using wide_t = typename Tr::wide_t;
  using acc = acc_t<scalar_t>;
  // elements per thread per tile in the streaming kernels (16 bytes of g)
  static constexpr int UNROLL = sizeof(bits_t) >= 8 ? 2 : static_cast<int>(16 / sizeof(bits_t));
};

template <typename scalar_t, bool OUTLIER>
using out_t = std::conditional_t<OUTLIER, scalar_t, bool>;

// x + alpha * g in the accumulation type, rounded once to scalar_t.
template <typename scalar_t>
__device__ __forceinline__ scalar_t outlier_value(scalar_t xv, typename KeyTraits<scalar_t>::bits_t gb,
                                                  acc_t<scalar_t> alpha) {
  using acc = acc_t<scalar_t>;
  const acc xa = static_cast<acc>(xv);
  const acc ga = static_cast<acc>(KeyTraits<scalar_t>::to_scalar(gb));
  return static_cast<scalar_t>(add_rn(xa, mul_rn(alpha, ga)));
}

template <typename scalar_t, bool OUTLIER>
__device__ __forceinline__ void store_out(out_t<scalar_t, OUTLIER>* out, int64_t i, bool sel, scalar_t xv,
                                          typename KeyTraits<scalar_t>::bits_t gb, acc_t<scalar_t> alpha) {
  if constexpr (OUTLIER) {
    out[i] = sel ? outlier_value<scalar_t>(xv, gb, alpha) : xv;
  } else {
    out[i] = sel;
  }
}

// ---------------------------------------------------------------------------
// Small rows: one block per sample, the row in shared memory.
template <typename scalar_t, bool OUTLIER>
__global__ void __launch_bounds__(kSmallThreads)
    select_small_kernel(const scalar_t* __restrict__ x, const typename KeyTraits<scalar_t>::bits_t* __restrict__ g,
                        out_t<scalar_t, OUTLIER>* __restrict__ out, int64_t n, unsigned k, acc_t<scalar_t> alpha) {
  using S = SelectTypes<scalar_t>;
  using bits_t = typename S::bits_t;
  using wide_t = typename S::wide_t;
  ASCOOD_DYNAMIC_SHARED(unsigned char, smem_raw);
  ASCOOD_SHARED(unsigned[kMaxBins], hist);
  ASCOOD_SHARED(wide_t, s_prefix);
  ASCOOD_SHARED(unsigned, s_krem);
  bits_t* s_bits = reinterpret_cast<bits_t*>(smem_raw);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s_bits[i] = g[row + i];
  // block_radix_select starts with a barrier (after clearing its histogram),
  // so the row is complete in shared memory before it is read.
  wide_t t;
  unsigned need;
  block_radix_select<scalar_t>(s_bits, n, k, hist, &s_prefix, &s_krem, t, need);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const bits_t gb = s_bits[i];
    const bool sel = key_of<scalar_t>(gb) >= t;
    scalar_t xv;
    if constexpr (OUTLIER) {
      xv = x[row + i];
    } else {
      xv = scalar_t(0);
    }
    store_out<scalar_t, OUTLIER>(out, row + i, sel, xv, gb, alpha);
  }
}

// ---------------------------------------------------------------------------
// Large rows. Block (blockIdx.x, blockIdx.y = sample) streams the chunk
// [blockIdx.x * chunk, min(n, (blockIdx.x + 1) * chunk)) of its sample.

// K1: histogram of the top digit of every element.
template <typename scalar_t>
__global__ void __launch_bounds__(kLargeThreads)
    hist_top_kernel(const typename KeyTraits<scalar_t>::bits_t* __restrict__ g, int64_t n, int64_t chunk,
                    unsigned* __restrict__ ghist) {
  using S = SelectTypes<scalar_t>;
  using G = RadixGeometry<scalar_t>;
  using bits_t = typename S::bits_t;
  using wide_t = typename S::wide_t;
  constexpr int U = S::UNROLL;
  ASCOOD_SHARED(unsigned[kMaxBins], sh);
  const int lo = G::lo(0), nb = G::bins(0);
  for (int i = threadIdx.x; i < nb; i += blockDim.x) sh[i] = 0u;
  __syncthreads();
  const bits_t* gr = g + static_cast<int64_t>(blockIdx.y) * n;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = min(n, start + chunk);
  for (int64_t base = start; base < end; base += static_cast<int64_t>(U) * kLargeThreads) {
    bits_t v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * kLargeThreads + threadIdx.x;
      v[u] = i < end ? gr[i] : bits_t(0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * kLargeThreads + threadIdx.x;
      if (i < end) {
        const wide_t key = key_of<scalar_t>(v[u]);
        atomicAdd(&sh[static_cast<int>((key >> lo) & static_cast<wide_t>(nb - 1))], 1u);
      }
    }
  }
  __syncthreads();
  unsigned* gh = ghist + static_cast<int64_t>(blockIdx.y) * kMaxBins;
  for (int i = threadIdx.x; i < nb; i += blockDim.x) {
    const unsigned c = sh[i];
    if (c != 0u) atomicAdd(&gh[i], c);
  }
}

// K2: one warp per sample picks the digit of pass `pass`, updates the sample's
// prefix and remaining count, and re-zeroes the histogram for the next pass.
template <typename wide_t>
__global__ void __launch_bounds__(32)
    select_digit_kernel(unsigned* __restrict__ ghist, wide_t* __restrict__ prefix, unsigned* __restrict__ krem_arr,
                        unsigned* __restrict__ cnt, int pass, int lo, int nb, unsigned k) {
  const int b = blockIdx.x;
  const int lane = threadIdx.x;
  unsigned* h = ghist + static_cast<int64_t>(b) * kMaxBins;
  const unsigned krem = pass == 0 ? k : krem_arr[b];
  const wide_t pre = pass == 0 ? wide_t(0) : prefix[b];
  unsigned d, above;
  find_digit(h, nb, krem, d, above);
  __syncwarp();  // every lane has finished reading h, krem_arr[b] and prefix[b]
  for (int i = lane; i < nb; i += 32) h[i] = 0u;
  if (lane == 0) {
    prefix[b] = pre | (static_cast<wide_t>(d) << lo);
    krem_arr[b] = krem - above;
    if (pass == 0) cnt[b] = 0u;
  }
}

// K3: elements outside the boundary bucket (top digit != the selected one)
// are final: written now. Boundary elements go to the candidate list and the
// histogram of their second digit.
template <typename scalar_t, bool OUTLIER>
__global__ void __launch_bounds__(kLargeThreads)
    split_kernel(const scalar_t* __restrict__ x, const typename KeyTraits<scalar_t>::bits_t* __restrict__ g,
                 out_t<scalar_t, OUTLIER>* __restrict__ out, int64_t n, int64_t chunk,
                 const typename KeyTraits<scalar_t>::wide_t* __restrict__ prefix, unsigned* __restrict__ cnt,
                 int* __restrict__ cand, unsigned* __restrict__ ghist, acc_t<scalar_t> alpha) {
  using S = SelectTypes<scalar_t>;
  using G = RadixGeometry<scalar_t>;
  using bits_t = typename S::bits_t;
  using wide_t = typename S::wide_t;
  constexpr int U = S::UNROLL;
  ASCOOD_SHARED(unsigned[kMaxBins], sh);
  const int lo0 = G::lo(0), lo1 = G::lo(1), nb1 = G::bins(1);
  for (int i = threadIdx.x; i < nb1; i += blockDim.x) sh[i] = 0u;
  __syncthreads();
  const int b = blockIdx.y;
  const int64_t row = static_cast<int64_t>(b) * n;
  const wide_t top_t = prefix[b] >> lo0;
  const int lane = threadIdx.x & 31;
  const unsigned lt_mask = (1u << lane) - 1u;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = min(n, start + chunk);
  // `base` is uniform over the block, so every lane reaches the ballots.
  for (int64_t base = start; base < end; base += static_cast<int64_t>(U) * kLargeThreads) {
    bits_t gv[U];
    scalar_t xv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * kLargeThreads + threadIdx.x;
      const bool valid = i < end;
      gv[u] = valid ? g[row + i] : bits_t(0);
      if constexpr (OUTLIER) {
        xv[u] = valid ? x[row + i] : scalar_t(0);
      } else {
        xv[u] = scalar_t(0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * kLargeThreads + threadIdx.x;
      const bool valid = i < end;
      const wide_t key = key_of<scalar_t>(gv[u]);
      const wide_t top = key >> lo0;
      const bool is_cand = valid && top == top_t;
      if (valid && !is_cand) store_out<scalar_t, OUTLIER>(out, row + i, top > top_t, xv[u], gv[u], alpha);
      if (is_cand) atomicAdd(&sh[static_cast<int>((key >> lo1) & static_cast<wide_t>(nb1 - 1))], 1u);
      const unsigned ballot = __ballot_sync(kFullMask, is_cand);
      if (ballot != 0u) {  // uniform over the warp
        const int leader = __ffs(static_cast<int>(ballot)) - 1;
        unsigned pos = 0u;
        if (lane == leader) pos = atomicAdd(&cnt[b], static_cast<unsigned>(__popc(ballot)));
        pos = __shfl_sync(kFullMask, pos, leader);
        if (is_cand) cand[row + pos + static_cast<unsigned>(__popc(ballot & lt_mask))] = static_cast<int>(i);
      }
    }
  }
  __syncthreads();
  unsigned* gh = ghist + static_cast<int64_t>(b) * kMaxBins;
  for (int i = threadIdx.x; i < nb1; i += blockDim.x) {
    const unsigned c = sh[i];
    if (c != 0u) atomicAdd(&gh[i], c);
  }
}

// K4: histogram of digit `pass` over the candidates that match the prefix.
template <typename scalar_t>
__global__ void __launch_bounds__(kLargeThreads)
    hist_cand_kernel(const typename KeyTraits<scalar_t>::bits_t* __restrict__ g, int64_t n,
                     const int* __restrict__ cand, const unsigned* __restrict__ cnt,
                     const typename KeyTraits<scalar_t>::wide_t* __restrict__ prefix, int pass,
                     unsigned* __restrict__ ghist) {
  using S = SelectTypes<scalar_t>;
  using G = RadixGeometry<scalar_t>;
  using wide_t = typename S::wide_t;
  ASCOOD_SHARED(unsigned[kMaxBins], sh);
  const int hi = G::hi(pass), lo = G::lo(pass), nb = G::bins(pass);
  for (int i = threadIdx.x; i < nb; i += blockDim.x) sh[i] = 0u;
  __syncthreads();
  const int b = blockIdx.y;
  const int64_t row = static_cast<int64_t>(b) * n;
  const int64_t c = cnt[b];
  const wide_t pre_hi = prefix[b] >> hi;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < c; j += stride) {
    const int idx = cand[row + j];
    const wide_t key = key_of<scalar_t>(g[row + idx]);
    if ((key >> hi) == pre_hi) atomicAdd(&sh[static_cast<int>((key >> lo) & static_cast<wide_t>(nb - 1))], 1u);
  }
  __syncthreads();
  unsigned* gh = ghist + static_cast<int64_t>(b) * kMaxBins;
  for (int i = threadIdx.x; i < nb; i += blockDim.x) {
    const unsigned v = sh[i];
    if (v != 0u) atomicAdd(&gh[i], v);
  }
}

// K5: output of the boundary candidates, now that t (= prefix) is exact.
template <typename scalar_t, bool OUTLIER>
__global__ void __launch_bounds__(kLargeThreads)
    apply_cand_kernel(const scalar_t* __restrict__ x, const typename KeyTraits<scalar_t>::bits_t* __restrict__ g,
                      out_t<scalar_t, OUTLIER>* __restrict__ out, int64_t n, const int* __restrict__ cand,
                      const unsigned* __restrict__ cnt, const typename KeyTraits<scalar_t>::wide_t* __restrict__ prefix,
                      acc_t<scalar_t> alpha) {
  using S = SelectTypes<scalar_t>;
  using bits_t = typename S::bits_t;
  using wide_t = typename S::wide_t;
  const int b = blockIdx.y;
  const int64_t row = static_cast<int64_t>(b) * n;
  const int64_t c = cnt[b];
  const wide_t t = prefix[b];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < c; j += stride) {
    const int64_t i = row + cand[row + j];
    const bits_t gb = g[i];
    scalar_t xv;
    if constexpr (OUTLIER) {
      xv = x[i];
    } else {
      xv = scalar_t(0);
    }
    store_out<scalar_t, OUTLIER>(out, i, key_of<scalar_t>(gb) >= t, xv, gb, alpha);
  }
}

// ---------------------------------------------------------------------------
// Host side. x (OUTLIER only), g and out are contiguous in one memory format:
// sample b is the contiguous range [b*n, (b+1)*n) of each; the selection only
// depends on the multiset of a sample's keys, so element order is irrelevant.
template <typename scalar_t, bool OUTLIER>
void run_select(const scalar_t* x, const Tensor& g_c, out_t<scalar_t, OUTLIER>* out, int64_t B, int64_t n,
                int64_t k, double alpha) {
  using S = SelectTypes<scalar_t>;
  using G = RadixGeometry<scalar_t>;
  using bits_t = typename S::bits_t;
  using wide_t = typename S::wide_t;
  using acc = typename S::acc;
  static_assert(G::PASSES >= 2, "the large-row path assumes at least two digits");
  const cudaStream_t stream = current_stream();
  const bits_t* g = reinterpret_cast<const bits_t*>(g_c.const_data_ptr());
  const acc al = static_cast<acc>(alpha);

  if (n * static_cast<int64_t>(sizeof(bits_t)) <= ASCOOD_TUNABLE("small_bytes", kSmallBytes)) {
    const size_t smem = static_cast<size_t>(n) * sizeof(bits_t);
    ASCOOD_LAUNCH((select_small_kernel<scalar_t, OUTLIER>), static_cast<unsigned>(B), kSmallThreads, smem, stream, x,
                  g, out, n, static_cast<unsigned>(k), al);
    return;
  }

  // Scratch is sized for one chunk of samples and reused by the next chunk (the
  // launches are stream-ordered; the last select_digit pass re-zeroes the
  // histograms and pass 0 re-initialises prefix / counts). The candidate list
  // holds up to n indices per sample, so a chunk takes at most
  // max(1, kCandBudget / n) samples: the buffer stays near kCandBudget * 4
  // bytes instead of B x n int32 (twice an fp16 input).
  const int64_t budget = ASCOOD_TUNABLE("cand_budget", kCandBudget);
  const int64_t per_chunk = std::min<int64_t>({B, kMaxGridY, std::max<int64_t>(1, budget / n)});
  auto hist = zero(empty_on(g_c, {per_chunk, kMaxBins}, kInt));
  auto prefix_t = empty_on(g_c, {per_chunk}, kLong);  // wide_t per sample (<= 8 bytes)
  auto counts = empty_on(g_c, {2, per_chunk}, kInt);  // remaining k, candidate count
  auto cand_t = empty_on(g_c, {per_chunk, n}, kInt);
  unsigned* hb = reinterpret_cast<unsigned*>(hist.mutable_data_ptr<int>());
  wide_t* pb = reinterpret_cast<wide_t*>(prefix_t.mutable_data_ptr<int64_t>());
  unsigned* kb = reinterpret_cast<unsigned*>(counts.mutable_data_ptr<int>());
  unsigned* cb = kb + per_chunk;
  int* candb = cand_t.mutable_data_ptr<int>();

  const int64_t tile = static_cast<int64_t>(S::UNROLL) * kLargeThreads;
  const int64_t sms = num_sms();
  const unsigned kk = static_cast<unsigned>(k);
  for (int64_t b0 = 0; b0 < B; b0 += per_chunk) {
    const int64_t bb = std::min(per_chunk, B - b0);
    int64_t bps = std::max<int64_t>(1, std::min(ceil_div(4 * sms, bb), ceil_div(n, tile)));
    const int64_t chunk = ceil_div(ceil_div(n, bps), tile) * tile;
    bps = ceil_div(n, chunk);
    const dim3 grid(static_cast<unsigned>(bps), static_cast<unsigned>(bb));
    const scalar_t* xb = OUTLIER ? x + b0 * n : nullptr;
    const bits_t* gb = g + b0 * n;
    out_t<scalar_t, OUTLIER>* ob = out + b0 * n;

    ASCOOD_LAUNCH(hist_top_kernel<scalar_t>, grid, kLargeThreads, 0, stream, gb, n, chunk, hb);
    ASCOOD_LAUNCH(select_digit_kernel<wide_t>, static_cast<unsigned>(bb), 32, 0, stream, hb, pb, kb, cb, 0, G::lo(0),
                  G::bins(0), kk);
    ASCOOD_LAUNCH((split_kernel<scalar_t, OUTLIER>), grid, kLargeThreads, 0, stream, xb, gb, ob, n, chunk, pb, cb,
                  candb, hb, al);
    for (int p = 1; p < G::PASSES; ++p) {
      ASCOOD_LAUNCH(select_digit_kernel<wide_t>, static_cast<unsigned>(bb), 32, 0, stream, hb, pb, kb, cb, p, G::lo(p),
                    G::bins(p), kk);
      if (p + 1 < G::PASSES) {
        ASCOOD_LAUNCH(hist_cand_kernel<scalar_t>, grid, kLargeThreads, 0, stream, gb, n, candb, cb, pb, p + 1, hb);
      }
    }
    ASCOOD_LAUNCH((apply_cand_kernel<scalar_t, OUTLIER>), grid, kLargeThreads, 0, stream, xb, gb, ob, n, candb, cb,
                  pb, al);
  }
}

void check_selection_size(int64_t n) {
  ASCOOD_CHECK(n <= static_cast<int64_t>(std::numeric_limits<int>::max()),
              "ascood CUDA kernels support at most 2^31 - 1 elements per sample, got ", n);
}

Tensor invariant_mask_cuda(const Tensor& grad, double p_inv) {
  check_cuda_float(grad, "grad");
  ASCOOD_CHECK(grad.dim() >= 1, "grad must have a batch dim, got a 0-dim tensor");
  ASCOOD_CHECK(p_inv > 0.0 && p_inv <= 1.0, "p_inv must be in (0, 1], got ", p_inv);
  KernelDeviceGuard guard(grad.get_device_index());
  const auto fmt = image_output_format(grad);
  auto out = empty_on(grad, grad.sizes(), kBool, fmt);
  const int64_t B = grad.size(0);
  if (B == 0 || grad.numel() == 0) return out;
  const int64_t n = grad.numel() / B;
  const int64_t k = static_cast<int64_t>(p_inv * static_cast<double>(n));
  if (k == 0) {
    zero(out);
    return out;
  }
  check_selection_size(n);
  const auto g = as_contiguous(grad, fmt);
  ASCOOD_DISPATCH_FLOATING(g.scalar_type(), "ascood_invariant_mask_cuda", [&] {
    run_select<scalar_t, false>(nullptr, g, out.mutable_data_ptr<bool>(), B, n, k, 0.0);
  });
  return out;
}

Tensor gradient_outlier_cuda(const Tensor& x, const Tensor& grad, double p_inv, double alpha) {
  check_cuda_float(x, "x");
  check_cuda_float(grad, "grad");
  check_like(x, "x", grad, "grad");
  ASCOOD_CHECK(x.dim() >= 1, "x must have a batch dim, got a 0-dim tensor");
  ASCOOD_CHECK(p_inv > 0.0 && p_inv <= 1.0, "p_inv must be in (0, 1], got ", p_inv);
  KernelDeviceGuard guard(x.get_device_index());
  const auto fmt = image_output_format(x);
  auto out = empty_on(x, x.sizes(), x.scalar_type(), fmt);
  const int64_t B = x.size(0);
  if (B == 0 || x.numel() == 0) return out;
  const int64_t n = x.numel() / B;
  const int64_t k = static_cast<int64_t>(p_inv * static_cast<double>(n));
  if (k == 0) {
    copy_into(out, x);
    return out;
  }
  check_selection_size(n);
  const auto xc = as_contiguous(x, fmt);
  const auto g = as_contiguous(grad, fmt);
  ASCOOD_DISPATCH_FLOATING(x.scalar_type(), "ascood_gradient_outlier_cuda", [&] {
    run_select<scalar_t, true>(xc.const_data_ptr<scalar_t>(), g, out.mutable_data_ptr<scalar_t>(), B, n, k, alpha);
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace ascood

ASCOOD_CUDA_OPS_IMPL(m) {
  m.impl("invariant_mask", TORCH_BOX(&ascood::cuda::invariant_mask_cuda));
  m.impl("gradient_outlier", TORCH_BOX(&ascood::cuda::gradient_outlier_cuda));
}
