// Writing large outputs with non-temporal (streaming) stores.
//
// A normal store to a line not in cache first reads that line from memory
// (read-for-ownership), so a kernel that reads two arrays and writes one
// moves four arrays' worth of bytes. When the output is far larger than the
// caches it will not be read back from cache anyway, and streaming stores
// cut that traffic by a quarter. Elements are computed into a small
// L1-resident tile (a plain loop the compiler vectorises) and the tile is
// streamed out 16 bytes at a time.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace ascood {
namespace cpu {

// Outputs at least this large are streamed (well above L2, comparable to a
// share of L3: smaller results are likely still cached when the caller reads
// them, so they are written normally).
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// out[i] = f(i) for i in [begin, end); streaming stores when `stream`.
template <typename T, typename F>
void write_elements(T* out, int64_t begin, int64_t end, bool stream, const F& f) {
  int64_t i = begin;
#if defined(__SSE2__)
  if (stream) {
    static_assert(16 % sizeof(T) == 0, "element size must divide 16 bytes");
    constexpr int64_t kTileBytes = 256;
    constexpr int64_t kTile = kTileBytes / sizeof(T);
    // Plain stores up to the first 16-byte boundary.
    for (; i < end && (reinterpret_cast<uintptr_t>(out + i) & 15) != 0; ++i) out[i] = f(i);
    alignas(16) T tile[kTile];
    for (; i + kTile <= end; i += kTile) {
      for (int64_t j = 0; j < kTile; ++j) tile[j] = f(i + j);
      auto* dst = reinterpret_cast<__m128i*>(out + i);
      const auto* src = reinterpret_cast<const __m128i*>(tile);
      for (int64_t v = 0; v < kTileBytes / 16; ++v) _mm_stream_si128(dst + v, _mm_load_si128(src + v));
    }
    for (; i < end; ++i) out[i] = f(i);
    // Streaming stores are weakly ordered: fence before another thread (or
    // the caller) can read the output.
    _mm_sfence();
    return;
  }
#else
  (void)stream;
#endif
  for (; i < end; ++i) out[i] = f(i);
}

}  // namespace cpu
}  // namespace ascood
