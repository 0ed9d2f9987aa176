// Kernels that check the emulator itself against the CUDA programming guide's
// definitions (tests/test_cuda_emulator.py): the intrinsics, the warp exchanges,
// barriers, atomics, shared memory, the launch limits, and the named failures
// of code that would hang or misbehave on a GPU. Emulated build only.
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <stdexcept>

#include "../common.cuh"

namespace ascood {
namespace cuda {
namespace {

// One thread: integer intrinsics and reinterpretations on fixed inputs.
__global__ void intrinsics_kernel(int64_t* out) {
  const unsigned u[] = {0u, 1u, 0x80000000u, 0xffffffffu, 0x00f0f000u};
  int o = 0;
  for (unsigned v : u) {
    out[o++] = __popc(v);
    out[o++] = __ffs(static_cast<int>(v));
    out[o++] = __clz(static_cast<int>(v));
  }
  const unsigned long long w[] = {0ull, 1ull << 40, ~0ull};
  for (unsigned long long v : w) {
    out[o++] = __popcll(v);
    out[o++] = __ffsll(static_cast<long long>(v));
    out[o++] = __clzll(static_cast<long long>(v));
  }
  out[o++] = __float_as_uint(__uint_as_float(0x3f800000u)) == 0x3f800000u && __uint_as_float(0x3f800000u) == 1.0f;
  out[o++] = __double_as_longlong(__longlong_as_double(0x4000000000000000ll)) == 0x4000000000000000ll &&
             __longlong_as_double(0x4000000000000000ll) == 2.0;
  out[o++] = __float_as_int(-0.0f) == static_cast<int>(0x80000000u) && __int_as_float(0x7f800000) == INFINITY;
  // Exactly rounded float arithmetic: 1 + 2^-24 rounds to even (1), 1 + 3 * 2^-24 rounds up.
  out[o++] = __fadd_rn(1.0f, 5.9604645e-08f) == 1.0f && __fadd_rn(1.0f, 1.7881393e-07f) == 1.0000002f;
  out[o++] = __fmul_rn(3.0f, 0.5f) == 1.5f && __fmul_rn(16777217.0f, 1.0f) == 16777216.0f;
  out[o++] = __fdiv_rn(1.0f, 3.0f) == 1.0f / 3.0f && __ddiv_rn(1.0, 3.0) == 1.0 / 3.0;
  out[o++] = __fsub_rn(1.0f, 1.0f) == 0.0f && __dsub_rn(0.5, 0.25) == 0.25 && __dadd_rn(0.5, 0.25) == 0.75 &&
             __dmul_rn(0.5, 0.25) == 0.125;
  // Device math keeps float in float; NaN handling of fmax/fmin as in C.
  out[o++] = std::is_same_v<decltype(fmax(1.0f, 2.0f)), float> && std::is_same_v<decltype(sqrt(2.0f)), float> &&
             std::is_same_v<decltype(exp(2.0f)), float> && std::is_same_v<decltype(log(2.0)), double>;
  out[o++] = fmax(NAN, 1.0f) == 1.0f && fmin(2.0f, NAN) == 2.0f && fmaxf(-1.0f, -2.0f) == -1.0f &&
             fminf(-1.0f, -2.0f) == -2.0f && min(int64_t(3), int64_t(-4)) == -4 && max(7u, 9u) == 9u;
  out[o++] = sqrt(4.0f) == 2.0f && sqrtf(9.0f) == 3.0f && expf(0.0f) == 1.0f && logf(1.0f) == 0.0f &&
             log(exp(1.0)) == 1.0;
}

// Two warps: every shuffle variant, widths, and the ballot. Row t of out:
// [shfl src=(5*lane+3), shfl width 8 src 3, shfl src -1 (mod 32), up 3, up 3 width 8, down 5, down 5 width 16,
//  xor 9, xor 6 width 4, ballot(lane % 3 == 0), double shfl xor 1, u64 shfl up 1, syncwarp survived]
__global__ void shuffles_kernel(int64_t* out) {
  const int t = threadIdx.x;
  const int lane = t & 31;
  const int v = 1000 * (t >> 5) + lane;
  int64_t* o = out + t * 13;
  o[0] = __shfl_sync(kFullMask, v, 5 * lane + 3);
  o[1] = __shfl_sync(kFullMask, v, 3, 8);
  o[2] = __shfl_sync(kFullMask, v, -1);
  o[3] = __shfl_up_sync(kFullMask, v, 3);
  o[4] = __shfl_up_sync(kFullMask, v, 3, 8);
  o[5] = __shfl_down_sync(kFullMask, v, 5);
  o[6] = __shfl_down_sync(kFullMask, v, 5, 16);
  o[7] = __shfl_xor_sync(kFullMask, v, 9);
  o[8] = __shfl_xor_sync(kFullMask, v, 6, 4);
  o[9] = static_cast<int64_t>(__ballot_sync(kFullMask, lane % 3 == 0));
  o[10] = static_cast<int64_t>(__shfl_xor_sync(kFullMask, 0.5 + v, 1) * 2.0);
  o[11] = static_cast<int64_t>(__shfl_up_sync(kFullMask, (1ull << 40) + static_cast<unsigned long long>(v), 1) -
                               (1ull << 40));
  __syncwarp();
  // Half-warp groups exchange independently (disjoint masks).
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  o[12] = __shfl_sync(half, v, lane < 16 ? 0 : 16);
}

// Barriers: `rounds` rounds of write, barrier, read a neighbour's slot, barrier.
__global__ void barrier_kernel(int64_t* out, int rounds) {
  ASCOOD_SHARED(int64_t[1024], sh);
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int64_t acc = 0;
  for (int r = 0; r < rounds; ++r) {
    sh[t] = int64_t(t) * 3 + r;
    __syncthreads();
    acc += sh[(t + 1 + r) % n];
    __syncthreads();
  }
  out[t] = acc;
}

// Atomics on shared and global memory from every thread of every block.
__global__ void atomics_kernel(int* gi, unsigned* gu, unsigned long long* gull, float* gf, double* gd, int* gmax,
                               int* gmin, unsigned* gcas) {
  ASCOOD_SHARED(unsigned, s_count);
  ASCOOD_SHARED(int, s_max);
  if (threadIdx.x == 0) {
    s_count = 0u;
    s_max = -1;
  }
  __syncthreads();
  const int t = static_cast<int>(threadIdx.x + blockIdx.x * blockDim.x);
  atomicAdd(&s_count, 2u);
  atomicMax(&s_max, t);
  atomicAdd(gi, 1);
  atomicAdd(gull, 1ull << 33);
  atomicAdd(gf, 0.5f);
  atomicAdd(gd, 0.25);
  atomicMax(gmax, t);
  atomicMin(gmin, -t);
  // Every thread takes a distinct ticket with a CAS loop (the first read is
  // atomic too: a plain read would race with the other threads' CAS).
  unsigned old = atomicAdd(gcas, 0u), seen;
  do {
    seen = old;
    old = atomicCAS(gcas, seen, seen + 1u);
  } while (old != seen);
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(gu, s_count);
    atomicExch(gi + 1, s_max);  // the last block's maximum
  }
}

// Dynamic shared memory: poisoned at block start, then used by every thread.
__global__ void dynamic_smem_kernel(int64_t* out, int words) {
  ASCOOD_DYNAMIC_SHARED(unsigned, dyn);
  const int t = threadIdx.x;
  int64_t* o = out + 2 * blockIdx.x;
  if (t == 0) o[0] = dyn[words - 1];  // not yet written: the poison
  __syncthreads();
  for (int i = t; i < words; i += blockDim.x) dyn[i] = static_cast<unsigned>(i * 7);
  __syncthreads();
  int64_t s = 0;
  for (int i = 0; i < words; ++i) s += dyn[i];
  if (t == 0) o[1] = s;
}

// Static shared memory is fresh and poisoned in every block (blocks do not
// see each other's values).
__global__ void static_smem_kernel(int64_t* out) {
  ASCOOD_SHARED(unsigned, value);
  ASCOOD_SHARED(float[4], f);
  if (threadIdx.x == 0) {
    out[3 * blockIdx.x] = value;
    out[3 * blockIdx.x + 1] = f[2] != f[2];  // poison reads as NaN
    value = 7u + blockIdx.x;
    out[3 * blockIdx.x + 2] = value;
  }
}

// Built-in variables: each thread writes its ids and the dims.
__global__ void ids_kernel(int64_t* out) {
  const int64_t b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int64_t t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int64_t* o = out + (b * blockDim.x * blockDim.y * blockDim.z + t) * 8;
  o[0] = blockIdx.x;
  o[1] = blockIdx.y;
  o[2] = blockIdx.z;
  o[3] = threadIdx.x;
  o[4] = threadIdx.y;
  o[5] = threadIdx.z;
  o[6] = gridDim.x * 100 + gridDim.y * 10 + gridDim.z;
  o[7] = blockDim.x * 100 + blockDim.y * 10 + blockDim.z + warpSize * 10000;
}

// `reps` full-mask shuffles per warp (also the measure of an exchange's cost).
__global__ void exchanges_kernel(int64_t* out, int reps) {
  int64_t v = threadIdx.x;
  for (int r = 0; r < reps; ++r) v += __shfl_xor_sync(kFullMask, v, 1 + r % 31);
  out[threadIdx.x] = v;
}

// Non-atomic read-modify-writes of one shared counter: with the threads of a
// block running concurrently some increments may be lost (returned: the total).
__global__ void nonatomic_kernel(int64_t* out, int reps) {
  ASCOOD_SHARED(unsigned, counter);
  if (threadIdx.x == 0) counter = 0u;
  __syncthreads();
  for (int r = 0; r < reps; ++r) {
    const unsigned v = counter;
    counter = v + 1u;
  }
  __syncthreads();
  if (threadIdx.x == 0) out[0] = counter;
}

// ---- code that is wrong on a GPU; each must fail with a named error -------
__global__ void divergent_shfl_exit_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  if (lane >= 16) return;  // lanes 16-31 leave; the others wait for them in a full-mask shuffle
  out[threadIdx.x] = __shfl_sync(kFullMask, lane, 0);
}

__global__ void divergent_shfl_deadlock_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  int v = lane;
  if (lane < 16) v = __shfl_sync(kFullMask, v, 0);  // hangs a GPU: lanes 16-31 never come
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void divergent_syncthreads_kernel(int* out) {
  if (threadIdx.x >= 64) return;  // an early return before a barrier of the others
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void different_barriers_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void mask_mismatch_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  const unsigned mask = lane == 5 ? 0x0000ffffu : kFullMask;
  out[threadIdx.x] = __shfl_sync(mask, lane, 0);
}

__global__ void op_mismatch_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  out[threadIdx.x] = lane < 8 ? static_cast<int>(__ballot_sync(kFullMask, 1)) : __shfl_sync(kFullMask, lane, 0);
}

__global__ void mask_without_self_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, 3, 0);  // lanes 1-31 call with a mask naming only lane 0
}

__global__ void read_inactive_lane_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  if (lane < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, lane, 20);  // lane 20 does not take part
}

__global__ void partial_warp_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(kFullMask, 1, 1);  // block of 40: warp 1 has 8 lanes
}

__global__ void device_assert_kernel(const int64_t* v) {
  const int64_t x = v[threadIdx.x];
  CUDA_KERNEL_ASSERT(x >= 0);
}

__global__ void static_smem_over_kernel(int* out) {
  ASCOOD_SHARED(int[8192], big);  // 32 KiB, launched with 20 KiB dynamic
  big[threadIdx.x] = 1;
  out[threadIdx.x] = big[threadIdx.x];
}

__global__ void smem_overflow_kernel(int* out, int words) {
  ASCOOD_DYNAMIC_SHARED(int, dyn);
  if (threadIdx.x == 0) dyn[words] = 1;  // one past the end
  out[threadIdx.x] = 0;
}

__global__ void empty_kernel(int* out) { out[0] = 0; }

// Thread 0 of every block writes the same element: a race between blocks.
__global__ void two_blocks_write_kernel(int* out) {
  if (threadIdx.x == 0) out[0] = static_cast<int>(blockIdx.x);
}

at::Tensor ints(int64_t n) { return at::full({n}, -1, at::TensorOptions().dtype(at::kInt)); }

at::Tensor longs(int64_t n) { return at::full({n}, -1, at::TensorOptions().dtype(at::kLong)); }

}  // namespace
}  // namespace cuda

namespace emu {

// Runs self-test `name`; `arg` is a size or count where the test takes one.
at::Tensor selftest(std::string name, int64_t arg) {
  using namespace ::ascood::cuda;
  const cudaStream_t s = nullptr;
  if (name == "intrinsics") {
    auto out = longs(64);
    ASCOOD_LAUNCH(intrinsics_kernel, 1, 1, 0, s, out.data_ptr<int64_t>());
    return out;
  }
  if (name == "shuffles") {
    auto out = longs(64 * 13);
    ASCOOD_LAUNCH(shuffles_kernel, 1, 64, 0, s, out.data_ptr<int64_t>());
    return out.view({64, 13});
  }
  if (name == "barrier") {  // arg: threads per block (any count up to 1024), as (x, 2) when even
    auto out = longs(arg);
    const dim3 block = arg % 2 == 0 ? dim3(static_cast<unsigned>(arg / 2), 2) : dim3(static_cast<unsigned>(arg));
    ASCOOD_LAUNCH(barrier_kernel, 1, block, 0, s, out.data_ptr<int64_t>(), 20);
    return out;
  }
  if (name == "atomics") {  // arg: blocks of 96 threads
    auto i = at::zeros({2}, at::kInt), u = at::zeros({1}, at::kInt), ull = at::zeros({1}, at::kLong);
    auto f = at::zeros({1}, at::kFloat), d = at::zeros({1}, at::kDouble);
    auto mx = at::full({1}, -5, at::kInt), mn = at::full({1}, 5, at::kInt), cas = at::zeros({1}, at::kInt);
    ASCOOD_LAUNCH(atomics_kernel, static_cast<unsigned>(arg), 96, 0, s, i.data_ptr<int>(),
                  reinterpret_cast<unsigned*>(u.data_ptr<int>()),
                  reinterpret_cast<unsigned long long*>(ull.data_ptr<int64_t>()), f.data_ptr<float>(),
                  d.data_ptr<double>(), mx.data_ptr<int>(), mn.data_ptr<int>(),
                  reinterpret_cast<unsigned*>(cas.data_ptr<int>()));
    return at::cat({i.to(at::kDouble), u.to(at::kDouble), ull.to(at::kDouble), f.to(at::kDouble), d,
                    mx.to(at::kDouble), mn.to(at::kDouble), cas.to(at::kDouble)});
  }
  if (name == "dynamic_smem") {  // arg: 32-bit words of dynamic shared memory; [poison, sum] per block
    auto out = longs(4);
    ASCOOD_LAUNCH(dynamic_smem_kernel, 2, 128, static_cast<size_t>(arg) * 4, s, out.data_ptr<int64_t>(),
                  static_cast<int>(arg));
    return out;
  }
  if (name == "static_smem") {
    auto out = longs(9);
    ASCOOD_LAUNCH(static_smem_kernel, 3, 32, 0, s, out.data_ptr<int64_t>());
    return out;
  }
  if (name == "ids") {
    auto out = longs(3 * 2 * 2 * 5 * 3 * 2 * 8);
    ASCOOD_LAUNCH(ids_kernel, dim3(3, 2, 2), dim3(5, 3, 2), 0, s, out.data_ptr<int64_t>());
    return out.view({-1, 8});
  }
  if (name == "exchanges") {  // arg: shuffles per warp (512 threads)
    auto out = longs(512);
    ASCOOD_LAUNCH(exchanges_kernel, 1, 512, 0, s, out.data_ptr<int64_t>(), static_cast<int>(arg));
    return out;
  }
  if (name == "nonatomic") {  // arg: increments per thread (512 threads)
    auto out = longs(1);
    ASCOOD_LAUNCH(nonatomic_kernel, 1, 512, 0, s, out.data_ptr<int64_t>(), static_cast<int>(arg));
    return out;
  }
  auto o = ints(1024);
  int* op = o.data_ptr<int>();
  if (name == "divergent_shfl_exit") {
    ASCOOD_LAUNCH(divergent_shfl_exit_kernel, 1, 64, 0, s, op);
  } else if (name == "divergent_shfl_deadlock") {
    ASCOOD_LAUNCH(divergent_shfl_deadlock_kernel, 1, 64, 0, s, op);
  } else if (name == "divergent_syncthreads") {
    ASCOOD_LAUNCH(divergent_syncthreads_kernel, 1, 128, 0, s, op);
  } else if (name == "different_barriers") {
    ASCOOD_LAUNCH(different_barriers_kernel, 1, 64, 0, s, op);
  } else if (name == "mask_mismatch") {
    ASCOOD_LAUNCH(mask_mismatch_kernel, 1, 32, 0, s, op);
  } else if (name == "op_mismatch") {
    ASCOOD_LAUNCH(op_mismatch_kernel, 1, 32, 0, s, op);
  } else if (name == "mask_without_self") {
    ASCOOD_LAUNCH(mask_without_self_kernel, 1, 32, 0, s, op);
  } else if (name == "read_inactive_lane") {
    ASCOOD_LAUNCH(read_inactive_lane_kernel, 1, 32, 0, s, op);
  } else if (name == "partial_warp") {
    ASCOOD_LAUNCH(partial_warp_kernel, 1, 40, 0, s, op);
  } else if (name == "device_assert") {
    auto v = at::arange(64, at::kLong).sub_(arg);  // negative for the first `arg` threads
    ASCOOD_LAUNCH(device_assert_kernel, 1, 64, 0, s, v.const_data_ptr<int64_t>());
  } else if (name == "static_smem_over") {
    ASCOOD_LAUNCH(static_smem_over_kernel, 1, 32, 20 * 1024, s, op);
  } else if (name == "smem_overflow") {
    ASCOOD_LAUNCH(smem_overflow_kernel, 1, 32, 64, s, op, 16);
  } else if (name == "too_many_threads") {
    ASCOOD_LAUNCH(empty_kernel, 1, 2048, 0, s, op);
  } else if (name == "too_much_smem") {
    ASCOOD_LAUNCH(empty_kernel, 1, 32, 64 * 1024, s, op);
  } else if (name == "two_blocks_write") {
    ASCOOD_LAUNCH(two_blocks_write_kernel, 2, 32, 0, s, op);
  } else if (name == "grid_too_large") {
    ASCOOD_LAUNCH(empty_kernel, dim3(1, 70000), 32, 0, s, op);
  } else {
    throw std::invalid_argument("unknown emulator self-test '" + name + "'");
  }
  return o;
}

}  // namespace emu
}  // namespace ascood
