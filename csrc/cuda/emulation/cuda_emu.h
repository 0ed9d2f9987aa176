// Emulation of the CUDA execution model on the host, for tests only.
//
// With ASCOOD_CUDA_EMULATION defined, csrc/cuda/common.cuh includes this header
// instead of the CUDA runtime, and the unchanged kernel sources (csrc/cuda/*.cu:
// kernels and their launchers) compile with a host C++ compiler into a test
// extension that runs them on CPU tensors (ascood_kernels/emulation.py builds it;
// it is never part of the shipped ascood_kernels._C). Definitions follow the
// CUDA C++ Programming Guide:
//
// * built-in variables gridDim, blockDim, blockIdx, threadIdx; threads are
//   numbered x fastest, warps are consecutive groups of 32 linear thread ids;
// * the blocks of a grid run one after another; the threads of a block run
//   concurrently as real OS threads, so a missing barrier shows up as a race;
// * __syncthreads is a block barrier that every thread of the block must reach
//   (the same one: the call site is checked); a thread that exits while others
//   wait there, or that waits where others exited, is an error;
// * __syncwarp, __shfl*_sync and __ballot_sync are warp exchanges: every lane
//   named in the mask must arrive at the same intrinsic with the same mask. A
//   divergent call, which hangs a GPU, fails here with a named error: at once
//   when a named lane has exited, else when the block made no progress for
//   the deadlock timeout (option deadlock_timeout_ms);
// * static __shared__ memory (ASCOOD_SHARED) and dynamic shared memory
//   (ASCOOD_DYNAMIC_SHARED) are per block, fresh for each block and filled
//   with a poison byte (0xff: NaN floats, all-ones integers) so a read before a
//   write is visible; static + dynamic is limited to the 48 KiB a launch may
//   use without opting in, and writes past the dynamic size are detected;
// * atomics (global and shared) are std::atomic_ref operations;
// * the launch checks the configuration limits of compute capability >= 7.0;
// * option race_check: the kernels are compiled with GCC's -fsanitize=thread
//   instrumentation, whose hooks runtime.cpp implements as a data-race check of
//   shared and global memory (ordered only by __syncthreads, full-mask
//   __syncwarp, atomics and kernel boundaries; the blocks of a launch are
//   unordered, as on a GPU, although here they run one after another).
//
// * outputs: while an op of an emulated library runs, fresh CPU tensors are
//   filled with 0xff bytes (poison.cpp), so an element a kernel leaves
//   unwritten reads as NaN / all-ones and fails the comparison;
// * launch counts per kernel and per ASCOOD_PATH (runtime.cpp), so a test can
//   assert that a GPU-size path (grid-stride pass >= 2, multi-block select) ran.
//
// What it cannot show: timing, occupancy, register use, out-of-bounds global
// accesses (the ASan build, ASCOOD_EMU_FLAVOUR=asan, shows those), and
// memory-ordering effects beyond the race check's model (while running, every
// exchange here orders memory like __syncwarp; partial-mask __syncwarp is not
// modelled by the race check).
#pragma once

#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------
// Function and variable qualifiers: plain host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// Kernels must use ASCOOD_SHARED / ASCOOD_DYNAMIC_SHARED (common.cuh) for
// shared memory; a bare __shared__ would not be per block here.
#define __shared__ static_assert(false, "use ASCOOD_SHARED for shared memory (csrc/cuda/common.cuh)");

// Device-side assert: fails the launch with the condition and where it failed
// (on a GPU: "device-side assert triggered" at the next synchronisation).
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                     \
  do {                                                                               \
    if (!(cond)) ::ascood::emu::device_assert_fail(#cond, __FILE__, __LINE__);      \
  } while (0)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct ascood_emu_stream*;

// Built-in variables. threadIdx is per OS thread; the others are set by the
// launcher before each block starts (one launch runs at a time).
extern thread_local uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

namespace ascood {
namespace emu {

template <typename T>
using type_t = T;

enum class WarpOp : int { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kSyncWarp };

// Runtime (runtime.cpp).
void block_barrier(const std::source_location& where);
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const std::source_location& where);
void* block_shared(const void* key, const char* name, std::size_t bytes, std::size_t align);
void* dynamic_shared();
[[noreturn]] void device_assert_fail(const char* cond, const char* file, unsigned line);
void run_grid(const char* kernel, dim3 grid, dim3 block, std::size_t smem, const std::function<void()>& thread_body);
// Tuning constants a test may lower to reach a code path at small sizes, and
// the emulator's own options; set from Python through ascood_emu::_emu_option.
int64_t tunable(const char* name, int64_t default_value);
int64_t set_option(const std::string& name, int64_t value);
// ASCOOD_PATH: the running launch reached `path` (a string literal); counted
// once per launch, per kernel (see launch_counts in runtime.cpp).
void count_path(const char* path);
// Poison fresh CPU tensors while an op of torch.ops namespace `ns` runs (poison.cpp).
bool poison_outputs_of(const char* ns);

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp exchanges move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// kernel<<<grid, block, smem, stream>>>(args...): the arguments are converted
// to the kernel's parameter types once (as a launch copies them), then every
// thread of every block calls the kernel with them.
template <typename... KArgs, typename... Args>
void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t,
            Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "wrong number of kernel arguments");
  const std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  run_grid(name, grid, block, smem, [&] { std::apply(kernel, params); });
}

// No devices or streams here: the op's tensors are CPU tensors.
struct DeviceGuard {
  template <typename D>
  explicit DeviceGuard(const D&) {}
};

// Device math: CUDA's overloads for float and double (float stays float).
namespace device_math {
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline double fmax(double a, double b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
inline double fmin(double a, double b) { return std::fmin(a, b); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float sqrt(float a) { return std::sqrt(a); }
inline double sqrt(double a) { return std::sqrt(a); }
inline float sqrtf(float a) { return std::sqrt(a); }
inline float exp(float a) { return std::exp(a); }
inline double exp(double a) { return std::exp(a); }
inline float expf(float a) { return std::exp(a); }
inline float log(float a) { return std::log(a); }
inline double log(double a) { return std::log(a); }
inline float logf(float a) { return std::log(a); }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline T max(T a, T b) { return a < b ? b : a; }
}  // namespace device_math

}  // namespace emu
}  // namespace ascood

// Static shared memory of a kernel: a reference to this block's copy. The key
// (a static per declaration and template instance) names the variable.
#define ASCOOD_EMU_SHARED(T, name)                                                                       \
  static const char ascood_emu_key_##name = 0;                                                          \
  ::ascood::emu::type_t<T>& name = *static_cast<::ascood::emu::type_t<T>*>(::ascood::emu::block_shared( \
      &ascood_emu_key_##name, #name, sizeof(::ascood::emu::type_t<T>), alignof(::ascood::emu::type_t<T>)))
#define ASCOOD_EMU_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::ascood::emu::dynamic_shared())

// ---------------------------------------------------------------------------
// Synchronisation and warp intrinsics. The defaulted source_location records
// the call site for the same-barrier check and for error messages.
inline void __syncthreads(std::source_location where = std::source_location::current()) {
  ::ascood::emu::block_barrier(where);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location where = std::source_location::current()) {
  ::ascood::emu::warp_exchange(::ascood::emu::WarpOp::kSyncWarp, mask, 0, 0, 32, where);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location where = std::source_location::current()) {
  return static_cast<unsigned>(
      ::ascood::emu::warp_exchange(::ascood::emu::WarpOp::kBallot, mask, predicate != 0, 0, 32, where));
}

#define ASCOOD_EMU_SHUFFLE(fn, op)                                                                       \
  template <typename T>                                                                                 \
  inline T fn(unsigned mask, T var, int arg, int width = 32,                                            \
              std::source_location where = std::source_location::current()) {                           \
    return ::ascood::emu::from_bits<T>(                                                                 \
        ::ascood::emu::warp_exchange(op, mask, ::ascood::emu::to_bits(var), arg, width, where));        \
  }
ASCOOD_EMU_SHUFFLE(__shfl_sync, ::ascood::emu::WarpOp::kShfl)
ASCOOD_EMU_SHUFFLE(__shfl_up_sync, ::ascood::emu::WarpOp::kShflUp)
ASCOOD_EMU_SHUFFLE(__shfl_down_sync, ::ascood::emu::WarpOp::kShflDown)
ASCOOD_EMU_SHUFFLE(__shfl_xor_sync, ::ascood::emu::WarpOp::kShflXor)
#undef ASCOOD_EMU_SHUFFLE

// ---------------------------------------------------------------------------
// Integer intrinsics.
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned>(x)) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned long long>(x)) + 1; }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }

// Reinterpretation and exactly rounded arithmetic (round to nearest even). The
// default build uses -ffp-contract=off, so nothing is fused. The FMA flavour
// (-ffp-contract=fast, as nvcc contracts plain a * b + c) defines
// ASCOOD_EMU_FP_CONTRACT: nvcc never fuses a *_rn intrinsic, so their operands
// and products pass an optimisation barrier that GCC cannot contract across.
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
namespace ascood {
namespace emu {
template <typename T>
inline T rounded(T v) {
#ifdef ASCOOD_EMU_FP_CONTRACT
  __asm__("" : "+g"(v));  // v is materialised, rounded to T: no FMA across this point
#endif
  return v;
}
}  // namespace emu
}  // namespace ascood
inline float __fadd_rn(float a, float b) { return ::ascood::emu::rounded(a) + ::ascood::emu::rounded(b); }
inline float __fsub_rn(float a, float b) { return ::ascood::emu::rounded(a) - ::ascood::emu::rounded(b); }
inline float __fmul_rn(float a, float b) { return ::ascood::emu::rounded(a * b); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return ::ascood::emu::rounded(a) + ::ascood::emu::rounded(b); }
inline double __dsub_rn(double a, double b) { return ::ascood::emu::rounded(a) - ::ascood::emu::rounded(b); }
inline double __dmul_rn(double a, double b) { return ::ascood::emu::rounded(a * b); }
inline double __ddiv_rn(double a, double b) { return a / b; }

// ---------------------------------------------------------------------------
// Atomics on global or shared memory (returning the old value, as CUDA's do).
// The value's type follows the pointer, as with CUDA's overloads.
template <typename T>
inline T atomicAdd(T* address, std::type_identity_t<T> val) {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned> || std::is_same_v<T, unsigned long long> ||
                    std::is_same_v<T, float> || std::is_same_v<T, double>,
                "atomicAdd: CUDA has no overload for this type");
  return std::atomic_ref<T>(*address).fetch_add(val);
}

template <typename T>
inline T atomicExch(T* address, std::type_identity_t<T> val) {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned> || std::is_same_v<T, unsigned long long> ||
                    std::is_same_v<T, float>,
                "atomicExch: CUDA has no overload for this type");
  return std::atomic_ref<T>(*address).exchange(val);
}

template <typename T>
inline T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> val) {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, unsigned> || std::is_same_v<T, unsigned long long>,
                "atomicCAS: CUDA has no overload for this type");
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, val);
  return compare;  // the old value, whether or not it was replaced
}

template <typename T>
inline T atomicMax(T* address, std::type_identity_t<T> val) {
  static_assert(std::is_integral_v<T>, "atomicMax: integer types only");
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (old < val && !a.compare_exchange_weak(old, val)) {
  }
  return old;
}

template <typename T>
inline T atomicMin(T* address, std::type_identity_t<T> val) {
  static_assert(std::is_integral_v<T>, "atomicMin: integer types only");
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (val < old && !a.compare_exchange_weak(old, val)) {
  }
  return old;
}
