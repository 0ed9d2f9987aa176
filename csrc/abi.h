// The one header through which the kernels' glue reaches torch: the LibTorch
// stable ABI (torch/csrc/stable: C shims behind small inline C++ wrappers) and
// the header-only API (torch/headeronly: ScalarType, Half, BFloat16, dispatch).
// Nothing here links against libtorch's C++ ABI (at::, c10::), so one binary
// loads under every torch >= TORCH_TARGET_VERSION (set by setup.py; see
// docs/OPS.md "Build and ABI").
//
// The stable surface lacks a few things the kernels used from ATen/c10; the
// small header-only pieces below replace them:
//   ASCOOD_CHECK        TORCH_CHECK (same message text: no "func, file:line"
//                       prefix as STD_TORCH_CHECK adds; a std::runtime_error,
//                       which Python sees as RuntimeError like c10::Error);
//   operator<< for sizes and devices  c10's printing of IntArrayRef / Device;
//   is_channels_last_contiguous        Tensor::is_contiguous(ChannelsLast);
//   ASCOOD_DISPATCH_FLOATING           AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16);
//   is_floating_type                   c10::isFloatingType;
//   empty_on / as_contiguous / to_dtype / copy_into / zero
//                                      at::empty(options) / Tensor::contiguous / to / copy_ / zero_
//                                      (cpu/common.h adds nbytes and scalar_value: nbytes(), item()).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ascood {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using MemoryFormat = torch::headeronly::MemoryFormat;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kInt = ScalarType::Int;
constexpr ScalarType kBool = ScalarType::Bool;

// Shapes print as c10 prints them: [2, 3, 4].
inline std::ostream& operator<<(std::ostream& os, IntArrayRef sizes) {
  os << '[';
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  return os << ']';
}

// Devices print as c10 prints them: cpu, cuda:0.
inline std::ostream& operator<<(std::ostream& os, const torch::stable::Device& d) {
  if (d.is_cpu()) return os << "cpu";
  if (d.is_cuda()) os << "cuda";
  else os << "device_type_" << static_cast<int>(d.type());
  if (d.has_index()) os << ':' << static_cast<int>(d.index());
  return os;
}

namespace detail {
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream oss;
  ((oss << args), ...);
  return std::move(oss).str();
}
}  // namespace detail

}  // namespace ascood

// TORCH_CHECK's replacement: the message alone, built only on failure.
#define ASCOOD_CHECK(cond, ...)                                              \
  do {                                                                       \
    if (__builtin_expect(!(cond), 0)) {                                      \
      throw std::runtime_error(::ascood::detail::cat(__VA_ARGS__));          \
    }                                                                        \
  } while (0)

// AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, TYPE, NAME, lambda):
// `scalar_t` is float, double, Half or BFloat16 inside the lambda.
#define ASCOOD_DISPATCH_FLOATING(TYPE, NAME, ...)                                   \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                   \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__)  \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Double, __VA_ARGS__) \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__)   \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__))

namespace ascood {

// Tensor::is_contiguous(MemoryFormat::ChannelsLast) of c10 for a 4-D tensor
// (c10's compute_channels_last_contiguous_2d): dims of size 1 are skipped.
inline bool is_channels_last_contiguous(const Tensor& t) {
  if (t.dim() != 4) return false;
  int64_t expected = 1;
  for (const int d : {1, 3, 2, 0}) {
    const int64_t size = t.size(d);
    if (size != 1) {
      if (t.stride(d) != expected) return false;
      expected *= size;
    }
  }
  return true;
}

// c10::isFloatingType (not in the header-only API).
inline bool is_floating_type(ScalarType t) {
  switch (t) {
    case ScalarType::Float:
    case ScalarType::Double:
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fnuz:
    case ScalarType::Float8_e8m0fnu:
      return true;
    default:
      return false;
  }
}

namespace detail {

// Throws when a stable C shim reports an error (its message went to stderr).
inline void check_shim(AOTITorchError err, const char* what) {
  ASCOOD_CHECK(err == AOTI_TORCH_SUCCESS, "ascood: torch's ", what, " failed");
}

// The shims' dtype code of the output dtypes the kernels create.
inline int32_t shim_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float:
      return aoti_torch_dtype_float32();
    case ScalarType::Double:
      return aoti_torch_dtype_float64();
    case ScalarType::Half:
      return aoti_torch_dtype_float16();
    case ScalarType::BFloat16:
      return aoti_torch_dtype_bfloat16();
    case ScalarType::Bool:
      return aoti_torch_dtype_bool();
    case ScalarType::Int:
      return aoti_torch_dtype_int32();
    case ScalarType::Long:
      return aoti_torch_dtype_int64();
    default:
      ASCOOD_CHECK(false, "ascood: no output of dtype ", t);
  }
  return 0;
}

}  // namespace detail

// at::empty(sizes, like.options().dtype(dtype).memory_format(fmt)): the strides
// of c10's contiguous / channels-last layouts (get_channels_last_strides_2d),
// made by the aoti_torch_empty_strided shim. torch::stable::empty would do the
// same through torch_call_dispatcher, which looks the op up by name on every
// call: a microsecond that the tiny inputs of the ops noticed.
inline Tensor empty_on(const Tensor& like, IntArrayRef sizes, ScalarType dtype,
                       MemoryFormat fmt = MemoryFormat::Contiguous) {
  const int64_t ndim = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> strides(static_cast<size_t>(ndim));
  if (fmt == MemoryFormat::ChannelsLast) {
    ASCOOD_CHECK(ndim == 4, "ascood: a channels-last output needs 4 dims, got ", sizes);
    strides[1] = 1;
    strides[3] = sizes[1];
    strides[2] = strides[3] * sizes[3];
    strides[0] = strides[2] * sizes[2];
  } else {
    ASCOOD_CHECK(fmt == MemoryFormat::Contiguous, "ascood: unsupported output memory format");
    int64_t stride = 1;
    for (int64_t d = ndim - 1; d >= 0; --d) {
      strides[d] = stride;
      stride *= std::max<int64_t>(sizes[d], 1);
    }
  }
  int32_t device_type = 0, device_index = 0;
  detail::check_shim(aoti_torch_get_device_type(like.get(), &device_type), "get_device_type");
  detail::check_shim(aoti_torch_get_device_index(like.get(), &device_index), "get_device_index");
  AtenTensorHandle out = nullptr;
  detail::check_shim(aoti_torch_empty_strided(ndim, sizes.data(), strides.data(), detail::shim_dtype(dtype),
                                              device_type, device_index, &out),
                     "empty_strided");
  return Tensor(out);
}

// t.contiguous(fmt): t itself when it already is (checked here, through the
// cheap shims, so the common case makes no dispatcher call).
inline Tensor as_contiguous(const Tensor& t, MemoryFormat fmt = MemoryFormat::Contiguous) {
  const bool already = fmt == MemoryFormat::Contiguous     ? t.is_contiguous()
                       : fmt == MemoryFormat::ChannelsLast ? is_channels_last_contiguous(t)
                                                           : false;
  if (already) return t;
  return torch::stable::contiguous(t, fmt);
}

// t.to(dtype): t itself when it already has it.
inline Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

// dst.copy_(src); returns dst (the aoti_torch_copy_ shim: no lookup by name).
inline Tensor copy_into(Tensor dst, const Tensor& src) {
  detail::check_shim(aoti_torch_copy_(dst.get(), src.get(), /*non_blocking=*/0), "copy_");
  return dst;
}

// t.zero_(); returns t (the aoti_torch_zero_ shim).
inline Tensor zero(Tensor t) {
  detail::check_shim(aoti_torch_zero_(t.get()), "zero_");
  return t;
}

}  // namespace ascood
