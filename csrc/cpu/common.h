// Helpers shared by the CPU kernels: argument checks, accumulation types and
// the output-layout rule of docs/OPS.md ("Layout").
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace ascood {
namespace cpu {

// Arithmetic type of the elementwise maths and reductions: float32 for the
// 16-bit types (their own arithmetic is too coarse) and for float32, float64
// for float64.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Every op takes CPU tensors of one of the four float dtypes; say which
// argument is wrong and what it should have been.
inline void check_float_cpu(const at::Tensor& t, const char* name, int64_t min_rank) {
  TORCH_CHECK(t.device().is_cpu(), "ascood (CPU): ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(is_supported_float(t.scalar_type()), "ascood (CPU): ", name,
              " must have dtype float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= min_rank, "ascood (CPU): ", name, " must have rank >= ", min_rank, ", got shape ",
              t.sizes());
}

// `b` must be a CPU tensor with a's dtype (and shape, unless shape == false).
inline void check_like(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b,
                       bool shape = true) {
  TORCH_CHECK(b.device().is_cpu(), "ascood (CPU): ", name_b, " must be a CPU tensor, got device ", b.device());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "ascood (CPU): ", name_b, " must have ", name_a, "'s dtype ",
              a.scalar_type(), ", got ", b.scalar_type());
  if (shape) {
    TORCH_CHECK(b.sizes() == a.sizes(), "ascood (CPU): ", name_b, " must have the shape of ", name_a, " ",
                a.sizes(), ", got ", b.sizes());
  }
}

// Output layout of the image ops: channels-last only for a 4-D input that is
// channels-last and not also plain contiguous (so ambiguous shapes such as
// (B, C, 1, 1) stay contiguous, as in the reference).
inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// Outputs at least this large ask the kernel for transparent huge pages.
constexpr size_t kHugePageBytes = size_t{2} << 20;
constexpr size_t kAdviseHugeBytes = size_t{4} << 20;

// A large fresh output is written once, in full, right away, and every 4 KiB
// page of it costs a page fault on first touch: for a 38 MB image batch those
// faults took longer than the kernel's own work (torch's allocator does the
// same when THP_MEM_ALLOC_ENABLE=1). Marking the 2 MiB-aligned interior of the
// buffer MADV_HUGEPAGE lets it fault in 2 MiB at a time where the system's
// THP mode is "madvise". Advisory only: errors are ignored, nothing changes
// where THP is off or on other systems.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = t.nbytes();
  if (bytes < kAdviseHugeBytes) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHugePageBytes - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// A fresh output with the strides the fake (meta) kernels report:
// at::empty in `fmt`. (clone() would keep an input's odd strides on size-1
// or empty dims.)
inline at::Tensor empty_image_like(const at::Tensor& t, at::MemoryFormat fmt,
                                   c10::optional<at::ScalarType> dtype = c10::nullopt) {
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(dtype.value_or(t.scalar_type())).memory_format(fmt));
  advise_huge_pages(out);
  return out;
}

// int(p * n) in double precision, exactly as Python's int(p_inv * n).
inline int64_t count_from_fraction(double p, int64_t n) {
  return static_cast<int64_t>(p * static_cast<double>(n));
}

// Elements per sample of a batch-first tensor (the product of the non-batch
// dims, also when the batch is empty).
inline int64_t per_sample_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

}  // namespace cpu
}  // namespace ascood
