// ascood_loss forward and backward on CUDA (docs/OPS.md).
//
// Forward: one warp per row over both logit matrices in one launch (rows
// [0, B) are ID rows, [B, B + B2) outlier rows): row max, log-sum-exp (shift 0
// when the max is +-inf, as torch.logsumexp), and the row's CE or KL term into
// a scratch vector; then a single block sums the terms in a fixed order and
// writes the 0-dim loss (deterministic, no host synchronisation). An
// out-of-range target trips CUDA_KERNEL_ASSERT.
// Backward (Proposition 1): one elementwise grid-stride kernel over both.
#include "common.cuh"


#include <algorithm>
#include <cmath>

namespace ascood {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;  // 8 rows per block
constexpr int kRowsPerBlock = kRowThreads / 32;

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }
__device__ __forceinline__ float acc_log(float v) { return logf(v); }
__device__ __forceinline__ double acc_log(double v) { return log(v); }

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    loss_rows_kernel(const scalar_t* __restrict__ id, const int64_t* __restrict__ target,
                     const scalar_t* __restrict__ ood, int64_t B, int64_t B2, int64_t C,
                     acc_t<scalar_t>* __restrict__ lse_id, acc_t<scalar_t>* __restrict__ lse_ood,
                     acc_t<scalar_t>* __restrict__ terms, acc_t<scalar_t> log_c) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= B + B2) return;  // whole warps leave; this kernel has no block barriers
  const bool is_id = r < B;
  const scalar_t* z = is_id ? id + r * C : ood + (r - B) * C;
  const acc inf = std::numeric_limits<acc>::infinity();
  acc mx = -inf;
  for (int64_t j = lane; j < C; j += 32) mx = fmax(mx, static_cast<acc>(z[j]));
  mx = warp_max(mx);
  const acc shift = (mx == inf || mx == -inf) ? acc(0) : mx;
  acc se = acc(0), sz = acc(0);
  for (int64_t j = lane; j < C; j += 32) {
    const acc v = static_cast<acc>(z[j]);
    se += acc_exp(sub_rn(v, shift));
    sz += v;
  }
  se = warp_sum(se);
  sz = warp_sum(sz);
  const acc lse = add_rn(acc_log(se), shift);
  if (lane == 0) {
    if (is_id) {
      const int64_t t = target[r];
      CUDA_KERNEL_ASSERT(t >= 0 && t < C);
      const acc zt = (t >= 0 && t < C) ? static_cast<acc>(z[t]) : std::numeric_limits<acc>::quiet_NaN();
      lse_id[r] = lse;
      terms[r] = sub_rn(lse, zt);
    } else {
      lse_ood[r - B] = lse;
      terms[r] = sub_rn(sub_rn(lse, div_rn(sz, static_cast<acc>(C))), log_c);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    loss_final_kernel(const acc_t<scalar_t>* __restrict__ terms, int64_t B, int64_t B2, acc_t<scalar_t> w,
                      scalar_t* __restrict__ loss) {
  using acc = acc_t<scalar_t>;
  ASCOOD_SHARED(acc[32], sh);
  acc ce = acc(0), kl = acc(0);
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) ce += terms[i];
  for (int64_t i = threadIdx.x; i < B2; i += blockDim.x) kl += terms[B + i];
  ce = block_sum(ce, sh);
  kl = block_sum(kl, sh);
  if (threadIdx.x == 0) {
    const acc ce_mean = div_rn(ce, static_cast<acc>(B > 0 ? B : 1));
    const acc kl_mean = div_rn(kl, static_cast<acc>(B2 > 0 ? B2 : 1));
    *loss = static_cast<scalar_t>(add_rn(ce_mean, mul_rn(w, kl_mean)));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    loss_bwd_kernel(const acc_t<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ id,
                    const int64_t* __restrict__ target, const scalar_t* __restrict__ ood,
                    const acc_t<scalar_t>* __restrict__ lse_id, const acc_t<scalar_t>* __restrict__ lse_ood,
                    scalar_t* __restrict__ d_id, scalar_t* __restrict__ d_ood, int64_t B, int64_t B2, int64_t C,
                    acc_t<scalar_t> w, acc_t<scalar_t> inv_c) {
  using acc = acc_t<scalar_t>;
  const acc g = *grad;
  const acc gw = mul_rn(g, w);
  const acc fb = static_cast<acc>(B > 0 ? B : 1);
  const acc fb2 = static_cast<acc>(B2 > 0 ? B2 : 1);
  const int64_t nid = B * C;
  const int64_t total = nid + B2 * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    if (i < nid) {
      const int64_t r = i / C;
      const int64_t j = i - r * C;
      const acc p = acc_exp(sub_rn(static_cast<acc>(id[i]), lse_id[r]));
      const int64_t t = target[r];
      // The forward asserts too, but the backward op can be called on its own
      // (the CPU kernel checks the range there as well).
      CUDA_KERNEL_ASSERT(t >= 0 && t < C);
      const acc onehot = t == j ? acc(1) : acc(0);
      d_id[i] = static_cast<scalar_t>(div_rn(mul_rn(g, sub_rn(p, onehot)), fb));
    } else {
      const int64_t i2 = i - nid;
      const int64_t r = i2 / C;
      const acc q = acc_exp(sub_rn(static_cast<acc>(ood[i2]), lse_ood[r]));
      d_ood[i2] = static_cast<scalar_t>(div_rn(mul_rn(gw, sub_rn(q, inv_c)), fb2));
    }
  }
}

void check_logits(const Tensor& id_logits, const Tensor& target, const Tensor& ood_logits) {
  check_cuda_float(id_logits, "id_logits");
  check_cuda_float(ood_logits, "ood_logits");
  ASCOOD_CHECK(id_logits.dim() == 2, "id_logits must be (B, C), got shape ", id_logits.sizes());
  ASCOOD_CHECK(ood_logits.dim() == 2 && ood_logits.size(1) == id_logits.size(1), "ood_logits must be (B2, ",
              id_logits.size(1), "), got shape ", ood_logits.sizes());
  check_like(id_logits, "id_logits", ood_logits, "ood_logits", /*shape=*/false);
  ASCOOD_CHECK(id_logits.size(1) >= 1, "id_logits must have at least one class, got shape ", id_logits.sizes());
  ASCOOD_CHECK(target.defined() && target.device() == id_logits.device(), "target must be on id_logits' device ",
              id_logits.device());
  ASCOOD_CHECK(target.scalar_type() == kLong || target.scalar_type() == kInt,
              "target must be an int64 class-index tensor, got ", target.scalar_type());
  ASCOOD_CHECK(target.dim() == 1 && target.size(0) == id_logits.size(0), "target must have shape (",
              id_logits.size(0), ",), got ", target.sizes());
}

int64_t elementwise_blocks(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, 256), 32LL * num_sms()));
}

std::tuple<Tensor, Tensor, Tensor> ascood_loss_cuda(const Tensor& id_logits, const Tensor& target,
                                                    const Tensor& ood_logits, double w) {
  check_logits(id_logits, target, ood_logits);
  KernelDeviceGuard guard(id_logits.get_device_index());
  const auto acc_type = acc_scalar_type(id_logits.scalar_type());
  const int64_t B = id_logits.size(0), B2 = ood_logits.size(0), C = id_logits.size(1);
  auto loss = empty_on(id_logits, {}, id_logits.scalar_type());
  auto lse_id = empty_on(id_logits, {B}, acc_type);
  auto lse_ood = empty_on(id_logits, {B2}, acc_type);
  auto terms = empty_on(id_logits, {B + B2}, acc_type);
  const auto idc = as_contiguous(id_logits);
  const auto oodc = as_contiguous(ood_logits);
  const auto tc = as_contiguous(to_dtype(target, kLong));
  const cudaStream_t stream = current_stream();
  ASCOOD_DISPATCH_FLOATING(id_logits.scalar_type(), "ascood_loss_cuda", [&] {
    using acc = acc_t<scalar_t>;
    if (B + B2 > 0) {
      const unsigned blocks = static_cast<unsigned>(ceil_div(B + B2, kRowsPerBlock));
      ASCOOD_LAUNCH(loss_rows_kernel<scalar_t>, blocks, kRowThreads, 0, stream, idc.const_data_ptr<scalar_t>(),
                    tc.const_data_ptr<int64_t>(), oodc.const_data_ptr<scalar_t>(), B, B2, C,
                    lse_id.mutable_data_ptr<acc>(), lse_ood.mutable_data_ptr<acc>(), terms.mutable_data_ptr<acc>(),
                    static_cast<acc>(std::log(static_cast<double>(C))));
    }
    ASCOOD_LAUNCH(loss_final_kernel<scalar_t>, 1, 256, 0, stream, terms.const_data_ptr<acc>(), B, B2,
                  static_cast<acc>(w), loss.mutable_data_ptr<scalar_t>());
  });
  return {loss, lse_id, lse_ood};
}

std::tuple<Tensor, Tensor> ascood_loss_backward_cuda(const Tensor& grad, const Tensor& id_logits,
                                                     const Tensor& target, const Tensor& ood_logits,
                                                     double w, const Tensor& lse_id,
                                                     const Tensor& lse_ood) {
  check_logits(id_logits, target, ood_logits);
  const auto acc_type = acc_scalar_type(id_logits.scalar_type());
  const int64_t B = id_logits.size(0), B2 = ood_logits.size(0), C = id_logits.size(1);
  ASCOOD_CHECK(grad.defined() && grad.numel() == 1, "grad must be a one-element (0-dim) tensor");
  ASCOOD_CHECK(grad.device() == id_logits.device(), "grad must be on id_logits' device ", id_logits.device(),
              ", got ", grad.device());
  ASCOOD_CHECK(is_floating_type(grad.scalar_type()), "grad must be a floating tensor, got ", grad.scalar_type());
  const char* names[2] = {"lse_id", "lse_ood"};
  const Tensor* lses[2] = {&lse_id, &lse_ood};
  const int64_t rows[2] = {B, B2};
  for (int j = 0; j < 2; ++j) {
    const Tensor& s = *lses[j];
    ASCOOD_CHECK(s.defined() && s.device() == id_logits.device(), names[j], " must be on id_logits' device ",
                id_logits.device());
    ASCOOD_CHECK(s.scalar_type() == acc_type, names[j], " must have dtype ", acc_type, ", got ", s.scalar_type());
    ASCOOD_CHECK(s.dim() == 1 && s.size(0) == rows[j], names[j], " must have shape (", rows[j], ",), got ",
                s.sizes());
  }
  KernelDeviceGuard guard(id_logits.get_device_index());
  auto d_id = empty_on(id_logits, id_logits.sizes(), id_logits.scalar_type());
  auto d_ood = empty_on(ood_logits, ood_logits.sizes(), ood_logits.scalar_type());
  const int64_t total = (B + B2) * C;
  if (total == 0) return {d_id, d_ood};
  const auto gc = as_contiguous(to_dtype(torch::stable::reshape(grad, {1}), acc_type));
  const auto idc = as_contiguous(id_logits);
  const auto oodc = as_contiguous(ood_logits);
  const auto tc = as_contiguous(to_dtype(target, kLong));
  const auto lic = as_contiguous(lse_id);
  const auto loc = as_contiguous(lse_ood);
  const cudaStream_t stream = current_stream();
  const unsigned blocks = static_cast<unsigned>(elementwise_blocks(total));
  ASCOOD_DISPATCH_FLOATING(id_logits.scalar_type(), "ascood_loss_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    ASCOOD_LAUNCH(loss_bwd_kernel<scalar_t>, blocks, 256, 0, stream, gc.const_data_ptr<acc>(),
                  idc.const_data_ptr<scalar_t>(), tc.const_data_ptr<int64_t>(), oodc.const_data_ptr<scalar_t>(),
                  lic.const_data_ptr<acc>(), loc.const_data_ptr<acc>(), d_id.mutable_data_ptr<scalar_t>(),
                  d_ood.mutable_data_ptr<scalar_t>(), B, B2, C, static_cast<acc>(w),
                  static_cast<acc>(1.0 / static_cast<double>(C)));
  });
  return {d_id, d_ood};
}

}  // namespace
}  // namespace cuda
}  // namespace ascood

ASCOOD_CUDA_OPS_IMPL(m) {
  m.impl("ascood_loss", TORCH_BOX(&ascood::cuda::ascood_loss_cuda));
  m.impl("ascood_loss_backward", TORCH_BOX(&ascood::cuda::ascood_loss_backward_cuda));
}
