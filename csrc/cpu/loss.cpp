// ascood_loss and ascood_loss_backward on the CPU (docs/OPS.md):
// loss = mean CE(id_logits, target) + w * mean KL(U || softmax(ood_logits)),
// with KL(U || p) = lse - mean_j(z_j) - log C. Per-row terms are computed in
// parallel, then summed pairwise (deterministic for any thread count).
// float32 rows use the AVX2 (Sleef) exp of vec_rows.h when the CPU has it;
// the other dtypes, and CPUs without AVX2, use the scalar loops here.
#include "common.h"
#include "convert.h"
#include "reduce.h"
#include "vec_rows.h"


#include <cmath>
#include <limits>
#include <type_traits>

namespace ascood {
namespace cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 14;

// log(sum_j exp(z_j)) in acc, shifted by the row max for range. A +-inf max
// is replaced by 0, as torch.logsumexp does, so all -inf rows give -inf and
// +inf rows give +inf instead of NaN from inf - inf.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
acc row_logsumexp(const scalar_t* z, int64_t C) {
  acc mx = -std::numeric_limits<acc>::infinity();
  for (int64_t j = 0; j < C; ++j) {
    const acc v = to_acc<acc>(z[j]);
    mx = (v > mx || v != v) ? v : mx;  // a NaN sticks and poisons the row, as in torch
  }
  const acc shift = std::isinf(mx) ? acc(0) : mx;
  const acc s = lane_sum<acc>(C, [&](int64_t j) { return std::exp(to_acc<acc>(z[j]) - shift); });
  return std::log(s) + shift;
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
acc row_mean(const scalar_t* z, int64_t C) {
  return lane_sum<acc>(C, [&](int64_t j) { return to_acc<acc>(z[j]); }) / static_cast<acc>(C);
}

// The vectorised float32 rows (vec_rows.h): only instantiated for float, the
// other dtypes never take them (use_vec_rows is false).
template <typename scalar_t>
bool use_vec_rows() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return vec_rows::available();
  } else {
    return false;
  }
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
acc vec_rows_logsumexp(const scalar_t* z, int64_t C) {
  if constexpr (std::is_same_v<scalar_t, float>) return vec_rows::logsumexp(z, C);
  return acc(0);
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
acc vec_rows_sum(const scalar_t* z, int64_t C) {
  if constexpr (std::is_same_v<scalar_t, float>) return vec_rows::sum(z, C);
  return acc(0);
}

// d = g * (softmax(z) - sub) / den for a row.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
void vec_rows_backward(const scalar_t* z, acc lse, acc g, acc sub, acc den, scalar_t* d, int64_t C) {
  if constexpr (std::is_same_v<scalar_t, float>) vec_rows::scaled_softmax_minus(z, lse, g, sub, den, d, C);
}

// The one-hot entry of the ID gradient: g * (p_y - 1) / den.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
void vec_rows_fix_target(const scalar_t* z, acc lse, acc g, acc den, scalar_t* d, int64_t y) {
  if constexpr (std::is_same_v<scalar_t, float>) d[y] = g * (vec_rows::softmax_at(z[y], lse) - 1.0f) / den;
}

void check_logits(const Tensor& id_logits, const Tensor& target, const Tensor& ood_logits) {
  check_float_cpu(id_logits, "id_logits", 2);
  ASCOOD_CHECK(id_logits.dim() == 2, "ascood (CPU): id_logits must be (B, C), got shape ", id_logits.sizes());
  ASCOOD_CHECK(id_logits.size(1) >= 1, "ascood (CPU): id_logits must have C >= 1 classes, got shape ",
              id_logits.sizes());
  check_like(id_logits, "id_logits", ood_logits, "ood_logits", /*shape=*/false);
  ASCOOD_CHECK(ood_logits.dim() == 2 && ood_logits.size(1) == id_logits.size(1),
              "ascood (CPU): ood_logits must be (B2, ", id_logits.size(1), "), got shape ", ood_logits.sizes());
  ASCOOD_CHECK(target.is_cpu(), "ascood (CPU): target must be a CPU tensor, got device ", target.device());
  ASCOOD_CHECK(target.scalar_type() == kLong, "ascood (CPU): target must have dtype int64, got ",
              target.scalar_type());
  ASCOOD_CHECK(target.dim() == 1 && target.size(0) == id_logits.size(0), "ascood (CPU): target must have shape (",
              id_logits.size(0), ",), got ", target.sizes());
}

void check_target_range(const int64_t* t, int64_t B, int64_t C) {
  for (int64_t b = 0; b < B; ++b) {
    ASCOOD_CHECK(t[b] >= 0 && t[b] < C, "ascood (CPU): target must hold class indices in [0, ", C, "), got ", t[b],
                " at position ", b);
  }
}

std::tuple<Tensor, Tensor, Tensor> ascood_loss_cpu(const Tensor& id_logits, const Tensor& target,
                                                   const Tensor& ood_logits, double w) {
  check_logits(id_logits, target, ood_logits);
  const int64_t B = id_logits.size(0), B2 = ood_logits.size(0), C = id_logits.size(1);
  const Tensor zi = as_contiguous(id_logits), zo = as_contiguous(ood_logits), tc = as_contiguous(target);
  const int64_t* td = tc.const_data_ptr<int64_t>();
  check_target_range(td, B, C);
  const auto acc_type = acc_scalar_type(id_logits.scalar_type());
  Tensor lse_id = empty_on(id_logits, {B}, acc_type);
  Tensor lse_ood = empty_on(id_logits, {B2}, acc_type);
  Tensor loss = empty_on(id_logits, {}, id_logits.scalar_type());
  ASCOOD_DISPATCH_FLOATING(id_logits.scalar_type(), "ascood_loss_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* zid = zi.const_data_ptr<scalar_t>();
    const scalar_t* zod = zo.const_data_ptr<scalar_t>();
    acc* li = lse_id.mutable_data_ptr<acc>();
    acc* lo = lse_ood.mutable_data_ptr<acc>();
    // Per-row terms first (parallel), then one deterministic pairwise sum.
    std::vector<acc> ce(B), kl(B2);
    const acc log_c = static_cast<acc>(std::log(static_cast<double>(C)));
    const int64_t grain = std::max<int64_t>(1, kGrainElems / C);
    const bool vec = use_vec_rows<scalar_t>();
    // parallel_for runs inline (no thread pool) when the rows fit one grain.
    torch::stable::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* z = zid + b * C;
        li[b] = vec ? vec_rows_logsumexp(z, C) : row_logsumexp(z, C);
        ce[b] = li[b] - to_acc<acc>(z[td[b]]);
      }
    });
    torch::stable::parallel_for(0, B2, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* z = zod + b * C;
        lo[b] = vec ? vec_rows_logsumexp(z, C) : row_logsumexp(z, C);
        kl[b] = lo[b] - (vec ? vec_rows_sum(z, C) / static_cast<acc>(C) : row_mean(z, C)) - log_c;
      }
    });
    // An empty batch sums to 0, so its term vanishes (divide by max(B, 1)).
    const acc ce_mean = pairwise_sum(ce.data(), B) / static_cast<acc>(std::max<int64_t>(B, 1));
    const acc kl_mean = pairwise_sum(kl.data(), B2) / static_cast<acc>(std::max<int64_t>(B2, 1));
    *loss.mutable_data_ptr<scalar_t>() = from_acc<scalar_t>(ce_mean + static_cast<acc>(w) * kl_mean);
  });
  return {loss, lse_id, lse_ood};
}

std::tuple<Tensor, Tensor> ascood_loss_backward_cpu(const Tensor& grad, const Tensor& id_logits,
                                                    const Tensor& target, const Tensor& ood_logits,
                                                    double w, const Tensor& lse_id,
                                                    const Tensor& lse_ood) {
  check_logits(id_logits, target, ood_logits);
  ASCOOD_CHECK(grad.is_cpu(), "ascood (CPU): grad must be a CPU tensor, got device ", grad.device());
  ASCOOD_CHECK(grad.numel() == 1 && is_supported_float(grad.scalar_type()),
              "ascood (CPU): grad must be a one-element float tensor (the loss gradient), got shape ", grad.sizes(),
              " dtype ", grad.scalar_type());
  const int64_t B = id_logits.size(0), B2 = ood_logits.size(0), C = id_logits.size(1);
  const auto acc_type = acc_scalar_type(id_logits.scalar_type());
  for (const auto& [name, t, rows] : {std::tuple<const char*, const Tensor&, int64_t>{"lse_id", lse_id, B},
                                      {"lse_ood", lse_ood, B2}}) {
    ASCOOD_CHECK(t.is_cpu(), "ascood (CPU): ", name, " must be a CPU tensor, got device ", t.device());
    ASCOOD_CHECK(t.scalar_type() == acc_type, "ascood (CPU): ", name, " must have dtype ", acc_type, ", got ",
                t.scalar_type());
    ASCOOD_CHECK(t.dim() == 1 && t.size(0) == rows, "ascood (CPU): ", name, " must have shape (", rows, ",), got ",
                t.sizes());
  }
  const Tensor zi = as_contiguous(id_logits), zo = as_contiguous(ood_logits), tc = as_contiguous(target);
  const Tensor li = as_contiguous(lse_id), lo = as_contiguous(lse_ood);
  const int64_t* td = tc.const_data_ptr<int64_t>();
  check_target_range(td, B, C);
  Tensor d_id = empty_on(id_logits, {B, C}, id_logits.scalar_type());
  Tensor d_ood = empty_on(ood_logits, {B2, C}, ood_logits.scalar_type());
  advise_huge_pages(d_id);
  advise_huge_pages(d_ood);
  ASCOOD_DISPATCH_FLOATING(id_logits.scalar_type(), "ascood_loss_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc g = static_cast<acc>(scalar_value(grad));
    const bool vec = use_vec_rows<scalar_t>();
    const acc gw = g * static_cast<acc>(w);
    const acc inv_c = static_cast<acc>(1.0 / static_cast<double>(C));
    const acc den_id = static_cast<acc>(std::max<int64_t>(B, 1));
    const acc den_ood = static_cast<acc>(std::max<int64_t>(B2, 1));
    const scalar_t* zid = zi.const_data_ptr<scalar_t>();
    const scalar_t* zod = zo.const_data_ptr<scalar_t>();
    const acc* lid = li.const_data_ptr<acc>();
    const acc* lod = lo.const_data_ptr<acc>();
    scalar_t* did = d_id.mutable_data_ptr<scalar_t>();
    scalar_t* dod = d_ood.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainElems / C);
    // d/dz_id = grad * (softmax - onehot) / B (Proposition 1).
    torch::stable::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* z = zid + b * C;
        scalar_t* d = did + b * C;
        const acc l = lid[b];
        const int64_t y = td[b];
        if (vec) {
          vec_rows_backward(z, l, g, acc(0), den_id, d, C);
          vec_rows_fix_target(z, l, g, den_id, d, y);
          continue;
        }
        for (int64_t j = 0; j < C; ++j) {
          const acc p = std::exp(to_acc<acc>(z[j]) - l);
          d[j] = from_acc<scalar_t>(g * (p - (j == y ? acc(1) : acc(0))) / den_id);
        }
      }
    });
    // d/dz_ood = grad * w * (softmax - 1/C) / B2.
    torch::stable::parallel_for(0, B2, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* z = zod + b * C;
        scalar_t* d = dod + b * C;
        const acc l = lod[b];
        if (vec) {
          vec_rows_backward(z, l, gw, inv_c, den_ood, d, C);
          continue;
        }
        for (int64_t j = 0; j < C; ++j) {
          const acc q = std::exp(to_acc<acc>(z[j]) - l);
          d[j] = from_acc<scalar_t>(gw * (q - inv_c) / den_ood);
        }
      }
    });
  });
  return {d_id, d_ood};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ascood, CPU, m) {
  m.impl("ascood_loss", TORCH_BOX(&ascood_loss_cpu));
  m.impl("ascood_loss_backward", TORCH_BOX(&ascood_loss_backward_cpu));
}

}  // namespace cpu
}  // namespace ascood
