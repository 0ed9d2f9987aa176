// random_permutations on the CPU (docs/OPS.md): one Fisher-Yates shuffle per
// row, driven by a counter-based hash of (seed, i) instead of a random
// stream, so the reference (plain PyTorch) and this kernel give the same
// permutation for one seed and rows run in parallel without sharing state.
// It replaces `torch.rand(B, n).argsort(1)` in the shuffle op's wrapper: a
// comparison sort of B rows of random keys cost 40% of the shuffle call at
// 64x3x224x224 (BENCHMARKS.md, round 2).
#include "common.h"


#include <numeric>

namespace ascood {
namespace cpu {
namespace {

// C. Wellons' lowbias32 (improved constants): a bijective 32-bit hash.
C10_ALWAYS_INLINE uint32_t mix32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x21F0AAADu;
  v ^= v >> 15;
  v *= 0x735A2D97u;
  v ^= v >> 15;
  return v;
}

Tensor random_permutations_cpu(const Tensor& seeds, int64_t n) {
  ASCOOD_CHECK(seeds.is_cpu(), "ascood (CPU): seeds must be a CPU tensor, got device ", seeds.device());
  ASCOOD_CHECK(seeds.scalar_type() == kLong && seeds.dim() == 1,
              "ascood (CPU): seeds must be a 1-D int64 tensor, got ", seeds.scalar_type(), " of shape ",
              seeds.sizes());
  ASCOOD_CHECK(n >= 0, "ascood (CPU): n must be >= 0, got ", n);
  const int64_t R = seeds.size(0);
  Tensor out = empty_on(seeds, {R, n}, kLong);
  const Tensor sc = as_contiguous(seeds);
  const int64_t* sd = sc.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    ASCOOD_CHECK(sd[r] >= 0 && sd[r] <= int64_t{0xFFFFFFFF}, "ascood (CPU): seeds must hold values in [0, 2^32), "
                "got ", sd[r], " at index ", r);
  }
  ASCOOD_CHECK(n <= (int64_t{1} << 31), "ascood (CPU): n must be <= 2^31, got ", n);
  int64_t* od = out.mutable_data_ptr<int64_t>();
  // A row is n * 8 bytes of random swaps: rows in parallel, each on one thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1));
  torch::stable::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t* p = od + r * n;
      std::iota(p, p + n, int64_t{0});
      const uint32_t base = mix32(static_cast<uint32_t>(sd[r]));
      for (int64_t i = n - 1; i > 0; --i) {
        const uint64_t u = mix32(base ^ static_cast<uint32_t>(i));
        const int64_t j = static_cast<int64_t>((u * static_cast<uint64_t>(i + 1)) >> 32);
        std::swap(p[i], p[j]);
      }
    }
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ascood, CPU, m) {
  m.impl("random_permutations", TORCH_BOX(&random_permutations_cpu));
}

}  // namespace cpu
}  // namespace ascood
