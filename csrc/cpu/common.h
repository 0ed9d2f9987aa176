// Helpers shared by the CPU kernels: argument checks, accumulation types and
// the output-layout rule of docs/OPS.md ("Layout").
#pragma once

#include "abi.h"

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

inline ScalarType acc_scalar_type(ScalarType t) {
  return t == kDouble ? kDouble : kFloat;
}

inline bool is_supported_float(ScalarType t) {
  return t == kFloat || t == kHalf || t == kBFloat16 || t == kDouble;
}

// Every op takes CPU tensors of one of the four float dtypes; say which
// argument is wrong and what it should have been.
inline void check_float_cpu(const Tensor& t, const char* name, int64_t min_rank) {
  ASCOOD_CHECK(t.is_cpu(), "ascood (CPU): ", name, " must be a CPU tensor, got device ", t.device());
  ASCOOD_CHECK(is_supported_float(t.scalar_type()), "ascood (CPU): ", name,
              " must have dtype float32, float16, bfloat16 or float64, got ", t.scalar_type());
  ASCOOD_CHECK(t.dim() >= min_rank, "ascood (CPU): ", name, " must have rank >= ", min_rank, ", got shape ",
              t.sizes());
}

// `b` must be a CPU tensor with a's dtype (and shape, unless shape == false).
inline void check_like(const Tensor& a, const char* name_a, const Tensor& b, const char* name_b,
                       bool shape = true) {
  ASCOOD_CHECK(b.is_cpu(), "ascood (CPU): ", name_b, " must be a CPU tensor, got device ", b.device());
  ASCOOD_CHECK(b.scalar_type() == a.scalar_type(), "ascood (CPU): ", name_b, " must have ", name_a, "'s dtype ",
              a.scalar_type(), ", got ", b.scalar_type());
  if (shape) {
    ASCOOD_CHECK(b.sizes() == a.sizes(), "ascood (CPU): ", name_b, " must have the shape of ", name_a, " ",
                a.sizes(), ", got ", b.sizes());
  }
}

// Output layout of the image ops: channels-last only for a 4-D input that is
// channels-last and not also plain contiguous (so ambiguous shapes such as
// (B, C, 1, 1) stay contiguous, as in the reference).
inline MemoryFormat output_memory_format(const Tensor& t) {
  if (t.dim() == 4 && is_channels_last_contiguous(t) && !t.is_contiguous()) {
    return MemoryFormat::ChannelsLast;
  }
  return MemoryFormat::Contiguous;
}

// Bytes of t's elements (Tensor::nbytes()).
inline size_t nbytes(const Tensor& t) { return static_cast<size_t>(t.numel()) * t.element_size(); }

// The value of a one-element CPU float tensor as a double (Tensor::item<double>()),
// read in place: its one element is at data_ptr() whatever its strides.
inline double scalar_value(const Tensor& t) {
  const void* p = t.const_data_ptr();
  switch (t.scalar_type()) {
    case kFloat:
      return *static_cast<const float*>(p);
    case kDouble:
      return *static_cast<const double*>(p);
    case kHalf:
      return static_cast<double>(static_cast<float>(*static_cast<const c10::Half*>(p)));
    case kBFloat16:
      return static_cast<double>(static_cast<float>(*static_cast<const c10::BFloat16*>(p)));
    default:
      ASCOOD_CHECK(false, "ascood (CPU): expected a float tensor, got ", t.scalar_type());
  }
  return 0.0;
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
inline void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = nbytes(t);
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
// empty in `fmt`. (clone() would keep an input's odd strides on size-1
// or empty dims.)
inline Tensor empty_image_like(const Tensor& t, MemoryFormat fmt,
                                   std::optional<ScalarType> dtype = std::nullopt) {
  Tensor out = empty_on(t, t.sizes(), dtype.value_or(t.scalar_type()), fmt);
  advise_huge_pages(out);
  return out;
}

// int(p * n) in double precision, exactly as Python's int(p_inv * n).
inline int64_t count_from_fraction(double p, int64_t n) {
  return static_cast<int64_t>(p * static_cast<double>(n));
}

// Elements per sample of a batch-first tensor (the product of the non-batch
// dims, also when the batch is empty).
inline int64_t per_sample_numel(const Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

}  // namespace cpu
}  // namespace ascood
