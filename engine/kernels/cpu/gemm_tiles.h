// Register tiles for the small-batch linears from 8 rows of x on (AVX-512 builds): fp32 with FMAs,
// and bf16 with AVX512-BF16's dot products where the CPU has them. gemv.cpp serves fewer rows a
// weight row at a time, and the rows past a piece's last whole tile.

#pragma once

#include "small_batch.h"

namespace small_batch {

#if defined(CPU_CAPABILITY_AVX512)
// From 8 rows of x on, fp32: gemv.cpp's row-at-a-time loop loads a vector of x for every
// multiply-add, and the loads, not the read of the weights, bound it. A tile of kTileN weight rows
// x kTileM rows of x keeps 24 sums in registers instead (29 of the 32 with the 4 weight vectors and
// one of x): per 16 weights along K, 10 loads feed 24 multiply-adds. Each thread's weight rows go
// in pieces of kWeightRowsPerTask that stay in L2 while every chunk of x passes them, and the next
// piece is asked into L2 a slice at a time meanwhile, or the first chunk waits on memory. SmolLM2's
// fp32 linears, Zen 4, 2 threads, a standalone harness (median of 7): 8 / 16 / 32 rows 24.0 / 47.3
// / 90.6 ms a row at a time, 21.9 / 30.6 / 50.9 ms in tiles; 6 rows in one chunk of tiles were
// slower (27.7 against 20.3 ms), hence kTiledFromRows. Tiles of 4 x 4, 6 x 4, 5 x 5 or 3 x 8,
// chunks of x balanced, pieces of 8, 32 or 64 rows, and L1 hints were each no better.
// bench/linear_rows.py, tiles / oneDNN: 16 / 32 / 64 rows 33.1 / 43.2, 58.4 / 69.0, 102.7 / 129.5
// ms; 8 rows in tiles equal 7 a row at a time (25-26 ms).
constexpr int kTileN = 4, kTileM = 6;
constexpr int64_t kTiledFromRows = 8;

// The sums of the lanes of a, b, c and d, in that order: a transposing tree of 8 adds and
// shuffles, where a reduction each costs 4 of both.
inline __m128 reduce_add_4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3], likewise for c, d
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // per 128-bit lane: [a, b, c, d], each a quarter of the sum
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// sums[m] = x[m] . w[0:4] for the MR rows of x; k_size a multiple of 16.
// Inlined, so that the sums stay in registers (out of line it was ~10% slower at 32 rows).
template <int MR>
__attribute__((always_inline)) inline void dot_tile(const float* x, const float* w, int64_t k_size,
                                                    __m128 (&sums)[MR]) {
  __m512 acc[kTileN][MR];
  for (int n = 0; n < kTileN; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_size; k += 16) {
    __m512 wv[kTileN];
    for (int n = 0; n < kTileN; ++n) wv[n] = _mm512_loadu_ps(w + n * k_size + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * k_size + k);
      for (int n = 0; n < kTileN; ++n) acc[n][m] = _mm512_fmadd_ps(xv, wv[n], acc[n][m]);
    }
  }
  for (int m = 0; m < MR; ++m) sums[m] = reduce_add_4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]);
}

// The same for bf16 x and w through AVX512-BF16's dot instruction (32 products an instruction,
// each exact in fp32, twice an FMA's); k_size a multiple of 32. Taken only where the CPU has it.
template <int MR>
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq"))) void dot_tile_bf16(
    const c10::BFloat16* x, const c10::BFloat16* w, int64_t k_size, __m128 (&sums)[MR]) {
  __m512 acc[kTileN][MR];
  for (int n = 0; n < kTileN; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_size; k += 32) {
    __m512bh wv[kTileN];
    for (int n = 0; n < kTileN; ++n) wv[n] = (__m512bh)_mm512_loadu_si512(w + n * k_size + k);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * k_size + k);
      for (int n = 0; n < kTileN; ++n) acc[n][m] = _mm512_dpbf16_ps(acc[n][m], xv, wv[n]);
    }
  }
  for (int m = 0; m < MR; ++m) sums[m] = reduce_add_4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]);
}

// out[0:4] = sums (+ bias[0:4]), in O.
template <typename O>
inline void store_4(O* out, __m128 sums, const O* bias) {
  if constexpr (std::is_same_v<O, float>) {
    _mm_storeu_ps(out, bias ? _mm_add_ps(sums, _mm_loadu_ps(bias)) : sums);
  } else {
    alignas(16) float s[4];
    _mm_store_ps(s, sums);
    for (int n = 0; n < 4; ++n)
      out[n] = static_cast<O>(bias ? s[n] + static_cast<float>(bias[n]) : s[n]);
  }
}

// y [rows, N] = x W^T + b in tiles (above): T fp32 (out fp32) or bf16 (out bf16 or fp32). The
// weight rows past the last whole tile of a piece go to rest(rows, x_chunk, n_begin, n_end,
// y_chunk), rows() a compile-time count of rows of x: the caller's row-at-a-time loop.
template <typename T, typename O, typename Rest>
void gemm_tiles(const T* x, int64_t num_rows, const T* weight, const O* bias, int64_t k_size,
                int64_t n_size, O* y, const Rest& rest) {
  const int64_t num_chunks = (num_rows + kTileM - 1) / kTileM;
  const int64_t piece_lines = kWeightRowsPerTask * k_size * sizeof(T) / 64;
  const int64_t calls_per_piece = num_chunks * (kWeightRowsPerTask / kTileN);
  const int64_t lines_per_call = (piece_lines + calls_per_piece - 1) / calls_per_piece;
  parallel_rows(n_size, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += kWeightRowsPerTask) {
      const int64_t n1 = std::min(n0 + kWeightRowsPerTask, end);
      const char* next = reinterpret_cast<const char*>(weight + n1 * k_size);  // next piece
      const char* next_end =
          reinterpret_cast<const char*>(weight + std::min(end, n1 + kWeightRowsPerTask) * k_size);
      for (int64_t m0 = 0; m0 < num_rows; m0 += kTileM) {
        with_count<kTileM>(std::min<int64_t>(kTileM, num_rows - m0), [&](auto rows) {
          constexpr int kRows = decltype(rows)::value;
          const T* xm = x + m0 * k_size;
          O* ym = y + m0 * n_size;
          int64_t n = n0;
          for (; n + kTileN <= n1; n += kTileN) {
            for (int64_t line = 0; line < lines_per_call && next < next_end; ++line, next += 64)
              __builtin_prefetch(next, 0, 2);
            __m128 sums[kRows];
            if constexpr (std::is_same_v<T, float>) {
              dot_tile<kRows>(xm, weight + n * k_size, k_size, sums);
            } else {
              dot_tile_bf16<kRows>(xm, weight + n * k_size, k_size, sums);
            }
            for (int m = 0; m < kRows; ++m)
              store_4(ym + m * n_size + n, sums[m], bias ? bias + n : nullptr);
          }
          rest(rows, xm, n, n1, ym);
        });
      }
    }
  });
}
#endif

}  // namespace small_batch
