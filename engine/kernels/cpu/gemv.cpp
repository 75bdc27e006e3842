// y = x W^T (+ b) for a few rows of x: the decode step's linear layers at small batch, where the
// time is reading W. Each weight row is streamed once from memory and dotted with every row of x
// (held in L1), the way llama.cpp's GEMV reads its weights. From 8 rows on, fp32 with AVX-512
// goes in register tiles (gemm_tiles), which beat oneDNN's packed GEMM up to 64 rows here;
// engine/layers/calibration.py times the two on each machine.
// Registered as torch.ops.llm_cpu.small_batch_linear; engine/kernels/cpu_ops.py builds it.

#include "gemm_tiles.h"
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
// y [rows, N] = x W^T + b for bf16 x and W through AVX512-BF16's dots, y (and b) in O: from
// kTiledFromRows rows on in register tiles (gemm_tiles.h). All of SmolLM2's linears in bf16, Zen
// 4, 2 threads, ms, a weight row at a time / tiles (two alternating runs): 16 rows 34.6 /
// 22.8-24.2, 32 rows 61.5-64.9 / 34.0-41.8, 64 rows 85.4-119.7 / 66.3-75.3.
template <typename O>
void dpbf16_linear(const c10::BFloat16* x, int64_t num_rows, const c10::BFloat16* weight,
                   const O* bias, int64_t k_size, int64_t n_size, O* y) {
  if (num_rows >= kTiledFromRows && k_size % 32 == 0) {
    gemm_tiles(x, num_rows, weight, bias, k_size, n_size, y,
               [&](auto rows, const c10::BFloat16* xm, int64_t n0, int64_t n1, O* ym) {
                 gemv_rows_dpbf16<rows()>(xm, weight, bias, k_size, n0, n1, ym, n_size);
               });
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
      gemm_tiles(x, num_rows, weight, bias, k_size, n_size, y,
                 [&](auto rows, const float* xm, int64_t n0, int64_t n1, float* ym) {
                   gemv_rows<float, rows()>(xm, weight, bias, k_size, n0, n1, ym, n_size);
                 });
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
