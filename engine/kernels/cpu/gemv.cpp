// y = x W^T (+ b) for a few rows of x: the decode step's linear layers at small batch, where the
// time is reading W. Each weight row is streamed once from memory and dotted with every row of x
// (held in L1), the way llama.cpp's GEMV reads its weights. From 8 rows on, fp32 with AVX-512
// goes in register tiles (gemm_tiles), which beat oneDNN's packed GEMM up to 64 rows here;
// engine/layers/calibration.py times the two on each machine.
// Registered as torch.ops.llm_cpu.small_batch_linear; engine/kernels/cpu_ops.py builds it.

#include "small_batch.h"

namespace {

using namespace small_batch;  // NOLINT: this file's helpers

// 2 x Vec::size() consecutive weights as floats.
inline void load_floats(const float* p, Vec& lo, Vec& hi) {
  lo = Vec::loadu(p);
  hi = Vec::loadu(p + Vec::size());
}
template <typename T>
inline void load_floats(const T* p, Vec& lo, Vec& hi) {
  std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
}

// The cache lines of kBytes (one step of a loop) ahead of `p` in the weight stream, asked for
// now: into L1 1 KiB ahead and into L2 4 KiB ahead. A core's own misses to L1 are few at a time,
// and they bounded the read (SmolLM2's fp32 linears at one row, 540 MB in huge pages, Sapphire
// Rapids, 2 threads: the hardware's prefetchers alone ~22 ms; with L1 hints 512 / 1,024 /
// 1,536 / 2,048 bytes ahead 18.9 / 18.2-18.7 / 18.0-18.6 / 18.2-18.5 ms); the L2 hints go
// through L2's deeper queue (5 alternating runs, 1 / 2 / 4 rows: 18.0 / 19.2 / 21.4 ->
// 16.8 / 18.1 / 19.1 ms; 3 or 6 KiB ahead, or to L3, gained less). Past the end of the
// weights they ask for nothing harmful.
constexpr int64_t kL1PrefetchBytes = 1024, kL2PrefetchBytes = 4096;
template <int64_t kBytes, typename W>
inline void prefetch_ahead(const W* p) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t line = 0; line < kBytes; line += 64) {
    __builtin_prefetch(bytes + kL1PrefetchBytes + line, 0, 3);
    __builtin_prefetch(bytes + kL2PrefetchBytes + line, 0, 2);
  }
}

// M rows of x (fp32, [M, K]) against weight rows [n_begin, n_end): each weight row is read once.
// (Interleaving several weight rows measured slower: more streams for the prefetcher.) The output
// (and bias) in O: the weights' type, or fp32 for bf16 weights under fp32 x (`mixed_gemv`).
template <typename W, int M, typename O = W>
void gemv_rows(const float* x, const W* weight, const O* bias, int64_t k_size, int64_t n_begin,
               int64_t n_end, O* out, int64_t out_stride) {
  constexpr int64_t kStep = 2 * Vec::size();
  const int64_t k_main = k_size / kStep * kStep;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* w = weight + n * k_size;
    Vec acc[M];
    for (int m = 0; m < M; ++m) acc[m] = Vec(0.f);
    for (int64_t k = 0; k < k_main; k += kStep) {
      prefetch_ahead<kStep * sizeof(W)>(w + k);
      Vec w_lo, w_hi;
      load_floats(w + k, w_lo, w_hi);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * k_size + k;
        acc[m] = at::vec::fmadd(Vec::loadu(xm + Vec::size()), w_hi,
                                at::vec::fmadd(Vec::loadu(xm), w_lo, acc[m]));
      }
    }
    for (int m = 0; m < M; ++m) {
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[m]);
      for (int64_t k = k_main; k < k_size; ++k) sum += x[m * k_size + k] * static_cast<float>(w[k]);
      out[m * out_stride + n] = static_cast<O>(bias ? sum + static_cast<float>(bias[n]) : sum);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// bf16 x bf16 -> fp32 with AVX512-BF16's dot instruction: 32 products per instruction, x kept in
// bf16 (it is bf16 already in a bf16 model), twice the work per load of the shift-and-FMA path.
// Compiled for AVX512 builds and taken only where the CPU reports the extension.
// Out (and bias) in O: bf16, or fp32 for the greedy head's first pass (`bf16_dot_linear`).
template <int M, typename O>
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl"))) void gemv_rows_dpbf16(
    const c10::BFloat16* x, const c10::BFloat16* weight, const O* bias, int64_t k_size,
    int64_t n_begin, int64_t n_end, O* out, int64_t out_stride) {
  constexpr int64_t kStep = 64;  // two vectors of 32: two accumulators per row of x
  const int64_t k_main = k_size / kStep * kStep;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const c10::BFloat16* w = weight + n * k_size;
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_main; k += kStep) {
      prefetch_ahead<kStep * sizeof(c10::BFloat16)>(w + k);
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
      for (int m = 0; m < M; ++m) {
        const c10::BFloat16* xm = x + m * k_size + k;
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(xm));
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, (__m512bh)_mm512_loadu_si512(xm + 32));
      }
    }
    for (int m = 0; m < M; ++m) {
      float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
      for (int64_t k = k_main; k < k_size; ++k)
        sum += static_cast<float>(x[m * k_size + k]) * static_cast<float>(w[k]);
      if (bias) sum += static_cast<float>(bias[n]);
      out[m * out_stride + n] = static_cast<O>(sum);
    }
  }
}

bool has_avx512_bf16() {
  static const bool found = __builtin_cpu_supports("avx512bf16");
  return found;
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// From 8 rows of x on, fp32: the loop above loads a vector of x for every multiply-add, and the
// loads, not the read of the weights, bound it. A tile of kTileN weight rows x kTileM rows of x
// keeps 24 sums in registers instead (29 of the 32 with the 4 weight vectors and one of x): per
// 16 weights along K, 10 loads feed 24 multiply-adds. Each thread's weight rows go in pieces of
// kWeightRowsPerTask that stay in L2 while every chunk of x passes them, and the next piece is
// asked into L2 a slice at a time meanwhile, or the first chunk waits on memory. SmolLM2's fp32
// linears, Zen 4, 2 threads, a standalone harness (median of 7): 8 / 16 / 32 rows 24.0 / 47.3 /
// 90.6 ms a row at a time, 21.9 / 30.6 / 50.9 ms in tiles; 6 rows in one chunk of tiles were
// slower (27.7 against 20.3 ms), hence kTiledFromRows. Tiles of 4 x 4, 6 x 4, 5 x 5 or 3 x 8,
// chunks of x balanced, pieces of 8, 32 or 64 rows, and L1 hints were each no better.
// bench/linear_rows.py, tiles / oneDNN: 16 / 32 / 64 rows 33.1 / 43.2, 58.4 / 69.0, 102.7 /
// 129.5 ms; 8 rows in tiles equal 7 a row at a time (25-26 ms).
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

// y [rows, N] = x W^T + b in tiles (above): T fp32 (out fp32) or bf16 (out bf16 or fp32).
template <typename T, typename O>
void gemm_tiles(const T* x, int64_t num_rows, const T* weight, const O* bias, int64_t k_size,
                int64_t n_size, O* y) {
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
          if constexpr (std::is_same_v<T, float>) {  // the rest
            gemv_rows<float, kRows>(xm, weight, bias, k_size, n, n1, ym, n_size);
          } else {
            gemv_rows_dpbf16<kRows, O>(xm, weight, bias, k_size, n, n1, ym, n_size);
          }
        });
      }
    }
  });
}
#endif


#if defined(CPU_CAPABILITY_AVX512)
// y [rows, N] = x W^T + b for bf16 x and W through AVX512-BF16's dots, y (and b) in O: from
// kTiledFromRows rows on in register tiles. SmolLM2's head [49,152, 576], Zen 4, 2 threads, ms,
// a row at a time / tiles: 8 rows 2.24 / TODO, 16 rows 4.29 / TODO, 32 rows 8.17 / TODO.
template <typename O>
void dpbf16_linear(const c10::BFloat16* x, int64_t num_rows, const c10::BFloat16* weight,
                   const O* bias, int64_t k_size, int64_t n_size, O* y) {
  if (num_rows >= kTiledFromRows && k_size % 32 == 0) {
    gemm_tiles(x, num_rows, weight, bias, k_size, n_size, y);
    return;
  }
  parallel_tiles(num_rows, n_size, [&](auto rows, int64_t m0, int64_t n0, int64_t n1) {
    gemv_rows_dpbf16<rows()>(x + m0 * k_size, weight, bias, k_size, n0, n1, y + m0 * n_size,
                             n_size);
  });
}
#endif

// y [rows, N] = x W^T + b, all of dtype T (the sums in fp32, rounded once).
template <typename T>
void gemv(const T* x, int64_t num_rows, const T* weight, const T* bias, int64_t k_size,
          int64_t n_size, T* y) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (has_avx512_bf16()) {
      dpbf16_linear(x, num_rows, weight, bias, k_size, n_size, y);
      return;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    if (num_rows >= kTiledFromRows && k_size % 16 == 0) {
      gemm_tiles(x, num_rows, weight, bias, k_size, n_size, y);
      return;
    }
  }
#endif
  const float* x_float = nullptr;  // x as fp32, read from cache by every weight row
  std::vector<float> converted;
  if constexpr (std::is_same_v<T, float>) {
    x_float = x;
  } else {
    converted.assign(x, x + num_rows * k_size);
    x_float = converted.data();
  }
  parallel_tiles(num_rows, n_size, [&](auto rows, int64_t m0, int64_t n0, int64_t n1) {
    gemv_rows<T, rows()>(x_float + m0 * k_size, weight, bias, k_size, n0, n1, y + m0 * n_size,
                         n_size);
  });
}

// y [rows, N] fp32 = x W^T for fp32 x and bf16 W: each weight widened exactly to fp32, so the only
// error against fp32 weights is what bf16 dropped from them. The greedy head's first pass
// (engine/layers/greedy_head.py) over the fp32 head's upper halves: half the bytes at few rows.
at::Tensor mixed_gemv(const at::Tensor& x, const at::Tensor& weight) {
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  const float* xp = x.data_ptr<float>();
  const auto* wp = weight.data_ptr<c10::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t k_size = weight.size(1), n_size = weight.size(0);
  parallel_tiles(x.size(0), n_size, [&](auto rows, int64_t m0, int64_t n0, int64_t n1) {
    gemv_rows<c10::BFloat16, rows(), float>(xp + m0 * k_size, wp, nullptr, k_size, n0, n1,
                                             yp + m0 * n_size, n_size);
  });
  return y;
}

// y [rows, N] fp32 = x W^T for bf16 x and W: each product exact in fp32, the sums in fp32. The
// greedy head's first pass from 8 rows on, where its fp32 rows rounded to bf16 double the
// multiply-adds an instruction does (AVX512-BF16); without the extension, x widened and the
// weights through `mixed_gemv`'s loop: the same products.
at::Tensor bf16_dot_linear(const at::Tensor& input, const at::Tensor& weight) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "input [rows, in] and weight [out, in] expected");
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "bf16 input and weight expected");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options().dtype(at::kFloat));
  const int64_t k_size = weight.size(1), n_size = weight.size(0);
#if defined(CPU_CAPABILITY_AVX512)
  if (has_avx512_bf16()) {
    dpbf16_linear<float>(x.data_ptr<c10::BFloat16>(), x.size(0),
                         weight.data_ptr<c10::BFloat16>(), nullptr, k_size, n_size,
                         y.data_ptr<float>());
    return y;
  }
#endif
  return mixed_gemv(x.to(at::kFloat), weight);
}

at::Tensor small_batch_linear(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "input [rows, in] and weight [out, in] expected");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  if (input.scalar_type() == at::kFloat && weight.scalar_type() == at::kBFloat16 &&
      !bias.has_value()) {
    return mixed_gemv(input.contiguous(), weight);
  }
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == weight.size(0)),
              "bias [out] expected");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type() &&
                  (!bias.has_value() || bias->scalar_type() == weight.scalar_type()),
              "input, weight and bias must share a dtype");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({input.size(0), weight.size(0)}, input.options());
  with_float_type(weight.scalar_type(), "weights", [&](auto type) {
    using T = decltype(type);
    const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    gemv<T>(x.data_ptr<T>(), x.size(0), weight.data_ptr<T>(), b, weight.size(1), weight.size(0),
            y.data_ptr<T>());
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.def("small_batch_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("bf16_dot_linear(Tensor input, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("small_batch_linear", &small_batch_linear);
  m.impl("bf16_dot_linear", &bf16_dot_linear);
}
