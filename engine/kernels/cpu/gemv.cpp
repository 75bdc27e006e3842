// y = x W^T (+ b) for a few rows of x: the decode step's linear layers at small batch, where the
// time is reading W. Each weight row is streamed once from memory and dotted with every row of x
// (held in L1), the way llama.cpp's GEMV reads its weights; oneDNN keeps the larger batches.
// Registered as torch.ops.llm_cpu.small_batch_linear; engine/kernels/cpu_ops.py builds it.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kMaxRows = 8;  // rows of x dotted with a weight row at once (more: in chunks)
constexpr int64_t kWeightRowsPerTask = 16;

// 2 x Vec::size() consecutive weights as floats.
inline void load_floats(const float* p, Vec& lo, Vec& hi) {
  lo = Vec::loadu(p);
  hi = Vec::loadu(p + Vec::size());
}
template <typename T>
inline void load_floats(const T* p, Vec& lo, Vec& hi) {
  std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
}

// M rows of x (fp32, [M, K]) against weight rows [n_begin, n_end): each weight row is read once.
// (Interleaving several weight rows measured slower: more streams for the prefetcher.)
template <typename W, int M>
void gemv_rows(const float* x, const W* weight, const W* bias, int64_t k_size, int64_t n_begin,
               int64_t n_end, W* out, int64_t out_stride) {
  constexpr int64_t kStep = 2 * Vec::size();
  const int64_t k_main = k_size / kStep * kStep;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* w = weight + n * k_size;
    Vec acc[M];
    for (int m = 0; m < M; ++m) acc[m] = Vec(0.f);
    for (int64_t k = 0; k < k_main; k += kStep) {
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
      out[m * out_stride + n] = static_cast<W>(bias ? sum + static_cast<float>(bias[n]) : sum);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// bf16 x bf16 -> fp32 with AVX512-BF16's dot instruction: 32 products per instruction, x kept in
// bf16 (it is bf16 already in a bf16 model), twice the work per load of the shift-and-FMA path.
// Compiled for AVX512 builds and taken only where the CPU reports the extension.
template <int M>
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl"))) void gemv_rows_dpbf16(
    const c10::BFloat16* x, const c10::BFloat16* weight, const c10::BFloat16* bias,
    int64_t k_size, int64_t n_begin, int64_t n_end, c10::BFloat16* out, int64_t out_stride) {
  constexpr int64_t kStep = 64;  // two vectors of 32: two accumulators per row of x
  const int64_t k_main = k_size / kStep * kStep;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const c10::BFloat16* w = weight + n * k_size;
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_main; k += kStep) {
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
      out[m * out_stride + n] = static_cast<c10::BFloat16>(sum);
    }
  }
}

bool has_avx512_bf16() {
  static const bool found = __builtin_cpu_supports("avx512bf16");
  return found;
}
#endif

// Columns [begin, end) of the output: the weight rows split across threads.
template <typename Rows>
void parallel_rows(int64_t n_size, const Rows& rows) {
  const int64_t num_tasks = (n_size + kWeightRowsPerTask - 1) / kWeightRowsPerTask;
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    rows(begin * kWeightRowsPerTask, std::min(end * kWeightRowsPerTask, n_size));
  });
}

// f(std::integral_constant<int, M>{}) for M = num_rows (1..kMaxRows), a compile-time constant.
template <typename F>
void with_rows(int64_t num_rows, const F& f) {
  switch (num_rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: break;  // no rows
  }
}

// Every row of x against every weight row: within a thread's share of the weight rows, tiles of
// kWeightRowsPerTask, each dotted with every chunk of up to kMaxRows rows of x while it is in
// cache, so that each weight is read from memory once whatever the number of rows.
// chunk(rows, m0, n_begin, n_end): rows() (a compile-time constant) rows of x from m0.
template <typename Chunk>
void parallel_tiles(int64_t num_rows, int64_t n_size, const Chunk& chunk) {
  parallel_rows(n_size, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += kWeightRowsPerTask) {
      const int64_t n1 = std::min(n0 + kWeightRowsPerTask, end);
      for (int64_t m0 = 0; m0 < num_rows; m0 += kMaxRows) {
        with_rows(std::min<int64_t>(kMaxRows, num_rows - m0),
                  [&](auto rows) { chunk(rows, m0, n0, n1); });
      }
    }
  });
}

// f(T{}) for the element type T of `type`: fp32, bf16 or fp16.
template <typename F>
void with_float_type(at::ScalarType type, const char* what, const F& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, what, " in float32, bfloat16 or float16 expected");
  }
}

// y [rows, N] = x W^T + b, all of dtype T (the sums in fp32, rounded once).
template <typename T>
void gemv(const T* x, int64_t num_rows, const T* weight, const T* bias, int64_t k_size,
          int64_t n_size, T* y) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (has_avx512_bf16()) {
      parallel_tiles(num_rows, n_size, [&](auto rows, int64_t m0, int64_t n0, int64_t n1) {
        gemv_rows_dpbf16<rows()>(x + m0 * k_size, weight, bias, k_size, n0, n1, y + m0 * n_size,
                                 n_size);
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

at::Tensor small_batch_linear(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "input [rows, in] and weight [out, in] expected");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
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

// ---- int8 weights (weight-only quantization): y = x W^T + b with W's rows in groups of G int8
// values q and one fp32 scale s each (W = q s; engine/layers/quantization.py). A quarter of
// fp32's bytes to stream, a little over half of bf16's.

constexpr int kInt8Group = 32;  // engine/layers/quantization.py's GROUP_SIZE

// Vec::size() int8 weights as floats.
inline Vec load_int8(const int8_t* p) {
  const auto* bytes = reinterpret_cast<const __m128i*>(p);
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes)));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(bytes)));
#else
  float values[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) values[i] = static_cast<float>(p[i]);
  return Vec::loadu(values);
#endif
}

// G > 0: the group size known at compile time (32, the quantizer's; whole vectors): each
// vector of weights is scaled as it is converted, then accumulated round-robin into four
// independent sums (one chain per group measured 1.3x slower: FMA latency-bound). G == 0: any
// group size, from `group`, scalar.
template <typename T, int M, int G>
void int8_gemv_rows(const float* x, const int8_t* qweight, const float* scale, const T* bias,
                    int64_t k_size, int64_t group, int64_t n_begin, int64_t n_end, T* out,
                    int64_t out_stride) {
  static_assert(G % Vec::size() == 0, "a group is whole vectors");
  constexpr int kChains = 4;
  const int64_t group_size = G > 0 ? G : group, num_groups = k_size / group_size;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* w = qweight + n * k_size;
    const float* s = scale + n * num_groups;
    Vec acc[M][kChains];
    float sums[M] = {};
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < kChains; ++c) acc[m][c] = Vec(0.f);
    if constexpr (G > 0) {
      // kSteps groups per iteration so that kChains vectors are in flight (2 groups of 2
      // vectors with AVX-512, 1 of 4 with AVX2); the loops unroll, every index a constant.
      constexpr int kVecs = G / Vec::size();
      constexpr int kSteps = kVecs >= kChains ? 1 : kChains / kVecs;
      int64_t g = 0;
      for (; g + kSteps <= num_groups; g += kSteps) {
#pragma GCC unroll 4
        for (int j = 0; j < kSteps; ++j) {
          const Vec group_scale(s[g + j]);
#pragma GCC unroll 4
          for (int v = 0; v < kVecs; ++v) {
            const int64_t k = (g + j) * G + v * Vec::size();
            const Vec wk = load_int8(w + k) * group_scale;
            for (int m = 0; m < M; ++m) {
              Vec& sum = acc[m][(j * kVecs + v) % kChains];
              sum = at::vec::fmadd(wk, Vec::loadu(x + m * k_size + k), sum);
            }
          }
        }
      }
      for (; g < num_groups; ++g) {  // the groups left over, on the first chain
        const Vec group_scale(s[g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += Vec::size()) {
          const Vec wk = load_int8(w + k) * group_scale;
          for (int m = 0; m < M; ++m)
            acc[m][0] = at::vec::fmadd(wk, Vec::loadu(x + m * k_size + k), acc[m][0]);
        }
      }
    } else {
      for (int64_t g = 0; g < num_groups; ++g) {
        for (int m = 0; m < M; ++m) {
          float part = 0.f;
          for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k)
            part += x[m * k_size + k] * static_cast<float>(w[k]);
          sums[m] += part * s[g];
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      const Vec total = (acc[m][0] + acc[m][1]) + (acc[m][2] + acc[m][3]);
      float sum = sums[m] + at::vec::vec_reduce_all<float>(
                                [](Vec& a, Vec& b) { return a + b; }, total);
      out[m * out_stride + n] = static_cast<T>(bias ? sum + static_cast<float>(bias[n]) : sum);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// ---- int8 weights x int16 activations (AVX2). Converting each int8 weight to fp32 and scaling
// it (the kernel above) costs ~5 instructions per 8 weights, more than reading them: the step
// ran at 12 GB/s where fp32's streams at 16. Here x is rounded to int16 instead, with one scale
// per group of 32 (an error of at most 1/65534 of the group's largest value, ~100x below bf16's
// rounding and ~250x below the int8 weights' own), and vpmaddwd multiplies 16 weights by x and
// sums them in pairs, exactly, in int32: ~10 instructions per 32 weights for one row of x.

// x [rows, K] -> int16 [rows, K], and per row an fp32 scale per group of 32 (x ~ q * scale).
template <typename T>
void quantize_rows_int16(const T* x, int64_t rows, int64_t k_size, int16_t* q, float* scale) {
  const int64_t num_groups = k_size / kInt8Group;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t begin = m * k_size + g * kInt8Group;
      float amax = 0.f;
      for (int64_t k = begin; k < begin + kInt8Group; ++k)
        amax = std::max(amax, std::abs(static_cast<float>(x[k])));
      const float inverse = amax > 0.f ? 32767.f / amax : 0.f;
      for (int64_t k = begin; k < begin + kInt8Group; ++k)
        q[k] = static_cast<int16_t>(std::nearbyint(static_cast<float>(x[k]) * inverse));
      scale[m * num_groups + g] = amax / 32767.f;
    }
  }
}

// M rows of int16 x against int8 weight rows [n_begin, n_end), groups of 32 (kInt8Group). Each
// group's integer dot product is exact in int32 (|sum| <= 32 * 127 * 32767 < 2^24, so its fp32
// conversion is exact too), then scaled by both groups' scales into one of two fp32 sums.
template <typename T, int M>
__attribute__((target("avx2,fma"))) void int8_int16_gemv_rows(
    const int16_t* xq, const float* x_scale, const int8_t* qweight, const float* scale,
    const T* bias, int64_t k_size, int64_t n_begin, int64_t n_end, T* out, int64_t out_stride) {
  const int64_t num_groups = k_size / kInt8Group;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* w = qweight + n * k_size;
    const float* s = scale + n * num_groups;
    // Two sums per row of x, alternating by group, up to 4 rows: one chain would wait on the
    // FMA's latency. More rows are chains enough, and 16 registers would not hold two each.
    constexpr int kChains = M <= 4 ? 2 : 1;
    __m256 acc[M][kChains];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < kChains; ++c) acc[m][c] = _mm256_setzero_ps();
    for (int64_t g = 0; g < num_groups; ++g) {
      const int8_t* wg = w + g * kInt8Group;
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg)));
      const __m256i w1 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16)));
      const __m256 group_scale = _mm256_set1_ps(s[g]);
      for (int m = 0; m < M; ++m) {
        const auto* xm = reinterpret_cast<const __m256i*>(xq + m * k_size + g * kInt8Group);
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xm)),
                                             _mm256_madd_epi16(w1, _mm256_loadu_si256(xm + 1)));
        const __m256 both = _mm256_mul_ps(group_scale, _mm256_set1_ps(x_scale[m * num_groups + g]));
        __m256& sum = acc[m][g % kChains];
        sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), both, sum);
      }
    }
    for (int m = 0; m < M; ++m) {
      const __m256 total = kChains == 2 ? _mm256_add_ps(acc[m][0], acc[m][kChains - 1]) : acc[m][0];
      const __m128 half = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
      const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
      float sum = _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
      out[m * out_stride + n] = static_cast<T>(bias ? sum + static_cast<float>(bias[n]) : sum);
    }
  }
}
#endif

template <typename T>
void int8_gemv(const T* x, int64_t num_rows, const int8_t* qweight, const float* scale,
               const T* bias, int64_t k_size, int64_t group, int64_t n_size, T* y) {
#if defined(CPU_CAPABILITY_AVX2)
  if (group == kInt8Group) {
    const int64_t num_groups = k_size / kInt8Group;
    std::vector<int16_t> xq(num_rows * k_size);  // read from cache by every weight row
    std::vector<float> x_scale(num_rows * num_groups);
    quantize_rows_int16(x, num_rows, k_size, xq.data(), x_scale.data());
    parallel_tiles(num_rows, n_size, [&](auto rows, int64_t m0, int64_t n0, int64_t n1) {
      int8_int16_gemv_rows<T, rows()>(xq.data() + m0 * k_size, x_scale.data() + m0 * num_groups,
                                      qweight, scale, bias, k_size, n0, n1, y + m0 * n_size,
                                      n_size);
    });
    return;
  }
#endif
  std::vector<float> x_float(x, x + num_rows * k_size);  // read from cache by every weight row
  parallel_tiles(num_rows, n_size, [&](auto rows, int64_t m0, int64_t n0, int64_t n1) {
    if (group == kInt8Group) {
      int8_gemv_rows<T, rows(), kInt8Group>(x_float.data() + m0 * k_size, qweight, scale, bias,
                                            k_size, group, n0, n1, y + m0 * n_size, n_size);
    } else {
      int8_gemv_rows<T, rows(), 0>(x_float.data() + m0 * k_size, qweight, scale, bias, k_size,
                                   group, n0, n1, y + m0 * n_size, n_size);
    }
  });
}

at::Tensor int8_small_batch_linear(const at::Tensor& input, const at::Tensor& qweight,
                                   const at::Tensor& scale,
                                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && qweight.dim() == 2 && input.size(1) == qweight.size(1),
              "input [rows, in] and qweight [out, in] expected");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous(),
              "qweight must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == qweight.size(0) && scale.size(1) > 0 &&
                  qweight.size(1) % scale.size(1) == 0,
              "scale: fp32 [out, groups], groups dividing the row");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == qweight.size(0) &&
                                    bias->scalar_type() == input.scalar_type()),
              "bias [out] in the input's dtype expected");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({input.size(0), qweight.size(0)}, input.options());
  const int64_t k_size = qweight.size(1), group = k_size / scale.size(1);
  with_float_type(input.scalar_type(), "input", [&](auto type) {
    using T = decltype(type);
    const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    int8_gemv<T>(x.data_ptr<T>(), x.size(0), qweight.data_ptr<int8_t>(), scale.data_ptr<float>(),
                 b, k_size, group, qweight.size(0), y.data_ptr<T>());
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.def("small_batch_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int8_small_batch_linear(Tensor input, Tensor qweight, Tensor scale, Tensor? bias) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("small_batch_linear", &small_batch_linear);
  m.impl("int8_small_batch_linear", &int8_small_batch_linear);
}
