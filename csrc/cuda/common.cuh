// Shared helpers of the CUDA kernels (docs/OPS.md is the contract):
// magnitude keys, exactly rounded arithmetic, warp/block reductions, the radix
// digit search and the host-side argument checks.
#pragma once

// The launchers' glue uses only the LibTorch stable ABI (../abi.h; docs/OPS.md
// "Build and ABI"): the kernels need no libtorch / libc10_cuda C++ symbol.
#include "abi.h"

// The kernels and launchers in csrc/cuda compile two ways: with nvcc for the GPU
// (the CUDA kernels of ascood_kernels._C), and, with ASCOOD_CUDA_EMULATION, with
// a host C++ compiler against emulation/cuda_emu.h, a test-only model of the CUDA
// execution model that runs the same code on CPU tensors (the cuda-emulated
// backend of the tests). So the sources use the few portable spellings below
// instead of <<<...>>>, __shared__, the device guard and STABLE_TORCH_LIBRARY_IMPL(ascood, CUDA).
#ifdef ASCOOD_CUDA_EMULATION
#include "emulation/cuda_emu.h"
// The emulated library is test-only and built for the torch at hand
// (ascood_kernels/emulation.py): its schema registrations (register.cpp and
// the generated fault-injection variants) use torch::Library; the kernels'
// glue registers through the stable ABI as in the real build.
#include <torch/library.h>
#else
#include <torch/csrc/stable/accelerator.h>

#include <cuda_runtime.h>

// The current CUDA stream of a device: a C shim of libtorch_cuda (declared in
// aoti_torch/c/shim.h only when USE_CUDA is defined), stable since torch 2.4.
// It replaces c10::cuda::getCurrentCUDAStream (libc10_cuda's C++ ABI);
// Stream::nativeHandle of torch/csrc/stable/accelerator.h would need 2.13.
extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);
#endif

#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

namespace ascood {
namespace cuda {

// The stable-ABI glue (abi.h), named from the global namespace: a copy of this
// file compiled inside another namespace (the emulation's fault-injection
// variants, ascood_kernels/emulation.py) must find the one ::ascood glue.
using ::ascood::as_contiguous;
using ::ascood::copy_into;
using ::ascood::empty_on;
using ::ascood::is_channels_last_contiguous;
using ::ascood::is_floating_type;
using ::ascood::kBFloat16;
using ::ascood::kBool;
using ::ascood::kDouble;
using ::ascood::kFloat;
using ::ascood::kHalf;
using ::ascood::kInt;
using ::ascood::kLong;
using ::ascood::MemoryFormat;
using ::ascood::ScalarType;
using ::ascood::Tensor;
using ::ascood::to_dtype;
using ::ascood::zero;

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------
// Portability layer (see the top of this file).
//
// ASCOOD_SHARED(T, name): a static shared variable of type T (T may be an array
//   type, e.g. unsigned[kMaxBins]); ASCOOD_DYNAMIC_SHARED(T, name): the launch's
//   dynamic shared memory as T name[]. Under emulation each block gets its own
//   fresh, poisoned copy.
// ASCOOD_LAUNCH(kernel, grid, block, smem, stream, args...): kernel<<<...>>>(args)
//   plus the launch check. A kernel template with several arguments goes in
//   parentheses: ASCOOD_LAUNCH((k<scalar_t, true>), ...).
// ASCOOD_TUNABLE(name, value): a tuning constant; the emulated build lets a
//   test lower it (emulation option `name`) to reach a path at small sizes.
// ASCOOD_PATH(path): marks a code path a test must see run (e.g. the second pass
//   of a grid-stride loop); the emulator counts the launches that reached it
//   (ascood_kernels.emulation.launch_counts); nothing in the CUDA build.
// ASCOOD_CUDA_OPS_IMPL(m): STABLE_TORCH_LIBRARY_IMPL(ascood, CUDA, m); under emulation
//   the ops register for CPU tensors in the test namespace ASCOOD_EMU_NS.
template <typename T>
using type_t = T;

#ifdef ASCOOD_CUDA_EMULATION
#ifndef ASCOOD_EMU_NS
#define ASCOOD_EMU_NS ascood_emu
#endif
#define ASCOOD_SHARED(T, name) ASCOOD_EMU_SHARED(T, name)
#define ASCOOD_DYNAMIC_SHARED(T, name) ASCOOD_EMU_DYNAMIC_SHARED(T, name)
#define ASCOOD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::ascood::emu::launch(#kernel, kernel, grid, block, smem, stream, __VA_ARGS__)
#define ASCOOD_TUNABLE(name, value) ::ascood::emu::tunable(name, value)
#define ASCOOD_PATH(path) ::ascood::emu::count_path(path)
#define ASCOOD_CUDA_OPS_IMPL(m) STABLE_TORCH_LIBRARY_IMPL(ASCOOD_EMU_NS, CPU, m)
using KernelDeviceGuard = ::ascood::emu::DeviceGuard;
constexpr const char* kKernelDevice = "CPU (cuda-emulated)";
inline bool on_kernel_device(const Tensor& t) { return t.is_cpu(); }
// CUDA's device math overloads (float stays float) instead of the host's.
using ::ascood::emu::device_math::exp;
using ::ascood::emu::device_math::expf;
using ::ascood::emu::device_math::fmax;
using ::ascood::emu::device_math::fmaxf;
using ::ascood::emu::device_math::fmin;
using ::ascood::emu::device_math::fminf;
using ::ascood::emu::device_math::log;
using ::ascood::emu::device_math::logf;
using ::ascood::emu::device_math::max;
using ::ascood::emu::device_math::min;
using ::ascood::emu::device_math::sqrt;
using ::ascood::emu::device_math::sqrtf;
#else
#define ASCOOD_SHARED(T, name) __shared__ ::ascood::cuda::type_t<T> name
#define ASCOOD_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#define ASCOOD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::ascood::cuda::launch_kernel(kernel, grid, block, smem, stream, __VA_ARGS__)
#define ASCOOD_TUNABLE(name, value) (value)
#define ASCOOD_PATH(path) ((void)0)
#define ASCOOD_CUDA_OPS_IMPL(m) STABLE_TORCH_LIBRARY_IMPL(ascood, CUDA, m)
using KernelDeviceGuard = torch::stable::accelerator::DeviceGuard;
constexpr const char* kKernelDevice = "CUDA";
inline bool on_kernel_device(const Tensor& t) { return t.is_cuda(); }

// C10_CUDA_CHECK: a CUDA runtime error becomes a RuntimeError naming it.
#define ASCOOD_CUDA_CHECK(expr)                                                              \
  do {                                                                                       \
    const cudaError_t ascood_err = (expr);                                                   \
    ASCOOD_CHECK(ascood_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(ascood_err)); \
  } while (0)

template <typename... KArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  ASCOOD_CUDA_CHECK(cudaGetLastError());
}
#endif

// ---------------------------------------------------------------------------
// Accumulation type: float for float/half/bfloat16, double for double.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// ---------------------------------------------------------------------------
// Magnitude keys (docs/OPS.md "Magnitude keys"). bits_t is the stored integer
// type (what is loaded from memory), wide_t the type keys are compared in.
// EFF is the number of key bits (sign bit cleared), INF the key of +inf and
// NANK the canonical key every NaN maps to (> INF).
template <typename scalar_t>
struct KeyTraits;

template <>
struct KeyTraits<float> {
  using bits_t = unsigned int;
  using wide_t = unsigned int;
  static constexpr int EFF = 31;
  static constexpr wide_t INF = 0x7F800000u;
  static constexpr wide_t NANK = 0x7FC00000u;
  static __device__ __forceinline__ float to_scalar(bits_t b) { return __uint_as_float(b); }
};

template <>
struct KeyTraits<double> {
  using bits_t = unsigned long long;
  using wide_t = unsigned long long;
  static constexpr int EFF = 63;
  static constexpr wide_t INF = 0x7FF0000000000000ull;
  static constexpr wide_t NANK = 0x7FF8000000000000ull;
  static __device__ __forceinline__ double to_scalar(bits_t b) {
    return __longlong_as_double(static_cast<long long>(b));
  }
};

template <>
struct KeyTraits<c10::Half> {
  using bits_t = unsigned short;
  using wide_t = unsigned int;
  static constexpr int EFF = 15;
  static constexpr wide_t INF = 0x7C00u;
  static constexpr wide_t NANK = 0x7E00u;
  static __device__ __forceinline__ c10::Half to_scalar(bits_t b) {
    return c10::Half(b, c10::Half::from_bits());
  }
};

template <>
struct KeyTraits<c10::BFloat16> {
  using bits_t = unsigned short;
  using wide_t = unsigned int;
  static constexpr int EFF = 15;
  static constexpr wide_t INF = 0x7F80u;
  static constexpr wide_t NANK = 0x7FC0u;
  static __device__ __forceinline__ c10::BFloat16 to_scalar(bits_t b) {
    return c10::BFloat16(b, c10::BFloat16::from_bits());
  }
};

template <typename scalar_t>
__device__ __forceinline__ typename KeyTraits<scalar_t>::wide_t key_of(typename KeyTraits<scalar_t>::bits_t b) {
  using Tr = KeyTraits<scalar_t>;
  using wide_t = typename Tr::wide_t;
  const wide_t k = static_cast<wide_t>(b) & ((static_cast<wide_t>(1) << Tr::EFF) - 1);
  return k > static_cast<wide_t>(Tr::INF) ? static_cast<wide_t>(Tr::NANK) : k;
}

// Radix digits: 11 bits, most significant first. Pass p covers key bits
// [lo(p), hi(p)) with hi(0) = EFF; the last pass may be narrower.
constexpr int kDigitBits = 11;
constexpr int kMaxBins = 1 << kDigitBits;  // 2048

template <typename scalar_t>
struct RadixGeometry {
  static constexpr int EFF = KeyTraits<scalar_t>::EFF;
  static constexpr int PASSES = (EFF + kDigitBits - 1) / kDigitBits;
  static __host__ __device__ __forceinline__ int hi(int p) { return EFF - p * kDigitBits; }
  static __host__ __device__ __forceinline__ int lo(int p) {
    const int l = hi(p) - kDigitBits;
    return l > 0 ? l : 0;
  }
  static __host__ __device__ __forceinline__ int bins(int p) { return 1 << (hi(p) - lo(p)); }
};

// ---------------------------------------------------------------------------
// Exactly rounded arithmetic (no fma contraction), matching torch's separate
// elementwise kernels.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// ---------------------------------------------------------------------------
// Reductions. Every block size used is a multiple of 32 (<= 1024), so every
// warp is full. The results are deterministic for a fixed block size.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Sum over the block; every thread gets the same value. `sh` holds >= 32
// elements; the leading barrier makes back-to-back calls with one `sh` safe.
// Must be called by every thread of the block.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* sh) {
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  const int nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  T r = T(0);
  for (int w = 0; w < nw; ++w) r += sh[w];
  return r;
}

// ---------------------------------------------------------------------------
// Radix digit search, run by one full warp. hist[0..nbins) holds the counts of
// the candidates' current digit, krem >= 1 how many of the largest candidates
// are still wanted, and the counts sum to >= krem. Finds the digit d of the
// krem-th largest candidate and `above`, the number of candidates with a
// digit > d (so krem - above >= 1 of the candidates with digit d are wanted).
// Lane 0 owns the highest bins, lane 31 the lowest.
__device__ __forceinline__ void find_digit(const unsigned* hist, int nbins, unsigned krem, unsigned& digit,
                                           unsigned& above) {
  const int lane = threadIdx.x & 31;
  const int per_lane = (nbins + 31) >> 5;
  int hi = nbins - lane * per_lane;
  if (hi < 0) hi = 0;
  int lo = hi - per_lane;
  if (lo < 0) lo = 0;
  unsigned s = 0;
  for (int d = lo; d < hi; ++d) s += hist[d];
  unsigned incl = s;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned v = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += v;
  }
  const unsigned excl = incl - s;
  const unsigned ballot = __ballot_sync(kFullMask, incl >= krem);
  unsigned d_out = 0, a_out = 0;
  if (ballot != 0u) {
    const int src = __ffs(static_cast<int>(ballot)) - 1;
    if (lane == src) {
      unsigned run = excl;
      for (int d = hi - 1; d >= lo; --d) {
        const unsigned c = hist[d];
        if (run + c >= krem) {
          d_out = static_cast<unsigned>(d);
          a_out = run;
          break;
        }
        run += c;
      }
    }
    d_out = __shfl_sync(kFullMask, d_out, src);
    a_out = __shfl_sync(kFullMask, a_out, src);
  }
  digit = d_out;
  above = a_out;
}

// Block-wide exact k-th largest key of src[0..n) (generic pointer: shared or
// global memory), 1 <= k <= n. Returns the key t and `need` = how many of the
// elements with key == t belong to the k largest (1 <= need <= count(key == t)),
// i.e. k - count(key > t). Needs kMaxBins counters in `hist` (shared) and the
// two shared slots. Called by every thread of the block; src must be readable
// by all threads (the caller syncs after filling shared memory).
template <typename scalar_t>
__device__ void block_radix_select(const typename KeyTraits<scalar_t>::bits_t* src, int64_t n, unsigned k,
                                   unsigned* hist, typename KeyTraits<scalar_t>::wide_t* s_prefix,
                                   unsigned* s_krem, typename KeyTraits<scalar_t>::wide_t& t, unsigned& need) {
  using G = RadixGeometry<scalar_t>;
  using wide_t = typename KeyTraits<scalar_t>::wide_t;
  wide_t prefix = 0;
  unsigned krem = k;
  for (int p = 0; p < G::PASSES; ++p) {
    const int hi = G::hi(p), lo = G::lo(p), nb = G::bins(p);
    for (int i = threadIdx.x; i < nb; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    // 64-bit index: with n up to 2^31 - 1, i + blockDim.x would overflow an int.
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const wide_t key = key_of<scalar_t>(src[i]);
      if ((key >> hi) == (prefix >> hi)) {
        atomicAdd(&hist[static_cast<int>((key >> lo) & static_cast<wide_t>(nb - 1))], 1u);
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      unsigned d, above;
      find_digit(hist, nb, krem, d, above);
      if (threadIdx.x == 0) {
        *s_prefix = prefix | (static_cast<wide_t>(d) << lo);
        *s_krem = krem - above;
      }
    }
    __syncthreads();
    prefix = *s_prefix;
    krem = *s_krem;
  }
  t = prefix;
  need = krem;
}

// ---------------------------------------------------------------------------
// Host side.
inline MemoryFormat image_output_format(const Tensor& t) {
  if (t.dim() == 4 && is_channels_last_contiguous(t) && !t.is_contiguous()) {
    return MemoryFormat::ChannelsLast;
  }
  return MemoryFormat::Contiguous;
}

inline void check_cuda_float(const Tensor& t, const char* name) {
  ASCOOD_CHECK(t.defined(), name, " must be a defined tensor");
  ASCOOD_CHECK(on_kernel_device(t), name, " must be a ", kKernelDevice, " tensor, got device ", t.device());
  const auto st = t.scalar_type();
  ASCOOD_CHECK(st == kFloat || st == kHalf || st == kBFloat16 || st == kDouble, name,
              " must have dtype float32, float16, bfloat16 or float64, got ", st);
}

inline void check_like(const Tensor& a, const char* name_a, const Tensor& b, const char* name_b,
                       bool shape = true) {
  ASCOOD_CHECK(b.device() == a.device(), name_b, " must be on ", name_a, "'s device ", a.device(), ", got ",
              b.device());
  ASCOOD_CHECK(b.scalar_type() == a.scalar_type(), name_b, " must have ", name_a, "'s dtype ", a.scalar_type(),
              ", got ", b.scalar_type());
  if (shape) {
    ASCOOD_CHECK(b.sizes() == a.sizes(), name_b, " must have the shape of ", name_a, " ", a.sizes(), ", got ",
                b.sizes());
  }
}

inline ScalarType acc_scalar_type(ScalarType st) { return st == kDouble ? kDouble : kFloat; }

// Number of SMs of the current device (call under the op's device guard). The
// emulation has none: option num_sms (default 4) stands in, so a test can vary
// how many blocks the multi-block paths split a row into.
#ifdef ASCOOD_CUDA_EMULATION
inline int num_sms() { return static_cast<int>(ASCOOD_TUNABLE("num_sms", 4)); }

inline cudaStream_t current_stream() { return nullptr; }
#else
inline int num_sms() {
  int dev = 0;
  ASCOOD_CUDA_CHECK(cudaGetDevice(&dev));
  int sms = 0;
  ASCOOD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms > 0 ? sms : 1;
}

// The current stream of the current device (the op's device guard set it).
inline cudaStream_t current_stream() {
  int dev = 0;
  ASCOOD_CUDA_CHECK(cudaGetDevice(&dev));
  void* stream = nullptr;
  ASCOOD_CHECK(aoti_torch_get_current_cuda_stream(dev, &stream) == AOTI_TORCH_SUCCESS,
               "ascood: could not get the current CUDA stream of device ", dev);
  return static_cast<cudaStream_t>(stream);
}
#endif

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace ascood
