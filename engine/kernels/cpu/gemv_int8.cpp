// y = x W^T (+ b) for a few rows of x with int8 weights (weight-only quantization): W's rows in
// groups of G int8 values q and one fp32 scale s each (W = q s; engine/layers/quantization.py).
// A quarter of fp32's bytes to stream, a little over half of bf16's. Registered as
// torch.ops.llm_cpu.int8_small_batch_linear; the split across threads is
// small_batch.h's.

#include "small_batch.h"

namespace {

using namespace small_batch;  // NOLINT: this file's helpers

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

// M rows of int16 x against int8 weight rows [n_begin, n_end), groups of 32 (kGroup). Each
// group's integer dot product is exact in int32 (|sum| <= 32 * 127 * 32767 < 2^24, so its fp32
// conversion is exact too), then scaled by both groups' scales into one of two fp32 sums.
template <typename T, int M>
__attribute__((target("avx2,fma"))) void int8_int16_gemv_rows(
    const int16_t* xq, const float* x_scale, const int8_t* qweight, const float* scale,
    const T* bias, int64_t k_size, int64_t n_begin, int64_t n_end, T* out, int64_t out_stride) {
  const int64_t num_groups = k_size / kGroup;
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
      const int8_t* wg = w + g * kGroup;
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg)));
      const __m256i w1 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16)));
      const __m256 group_scale = _mm256_set1_ps(s[g]);
      for (int m = 0; m < M; ++m) {
        const auto* xm = reinterpret_cast<const __m256i*>(xq + m * k_size + g * kGroup);
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xm)),
                                             _mm256_madd_epi16(w1, _mm256_loadu_si256(xm + 1)));
        const __m256 both = _mm256_mul_ps(group_scale, _mm256_set1_ps(x_scale[m * num_groups + g]));
        __m256& sum = acc[m][g % kChains];
        sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), both, sum);
      }
    }
    for (int m = 0; m < M; ++m) {
      const __m256 total = kChains == 2 ? _mm256_add_ps(acc[m][0], acc[m][kChains - 1]) : acc[m][0];
      const float sum = reduce_add(total);
      out[m * out_stride + n] = static_cast<T>(bias ? sum + static_cast<float>(bias[n]) : sum);
    }
  }
}
#endif

template <typename T>
void int8_gemv(const T* x, int64_t num_rows, const int8_t* qweight, const float* scale,
               const T* bias, int64_t k_size, int64_t group, int64_t n_size, T* y) {
#if defined(CPU_CAPABILITY_AVX2)
  if (group == kGroup) {
    const int64_t num_groups = k_size / kGroup;
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
    if (group == kGroup) {
      int8_gemv_rows<T, rows(), kGroup>(x_float.data() + m0 * k_size, qweight, scale, bias,
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
  m.def("int8_small_batch_linear(Tensor input, Tensor qweight, Tensor scale, Tensor? bias) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("int8_small_batch_linear", &int8_small_batch_linear);
}
