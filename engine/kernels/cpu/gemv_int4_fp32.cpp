// y = x W^T (+ b) in fp32 for a few rows of fp32 x, where W's fp32 weights are exactly Q4_1
// values: per group of 32 weights of a row, w = m + d q with d and m fp16 and q in 0..15 (a model
// dequantized from a 4-bit GGUF, as the embedded SmolLM2 is). Then W is stored losslessly in
// quantize_int4's nibbles (0.625 bytes a weight, a sixth of fp32's)
// (engine/layers/lossless.py: nibbles [out, in / 32, 16], d and m side by side per group as fp16
// [out, in / 32, 2]) and each weight is rebuilt in a register as fma(q, d, m): d q is exact in fp32 (11 by 4
// significant bits), so that is the fp32 weight bit for bit, and x is never rounded. The sums are
// fp32 FMAs, as the dense kernel's, in another order. Registered as
// torch.ops.llm_cpu.int4_fp32_linear; engine/layers/lossless.py decides which weights qualify.

#include "small_batch.h"

namespace {

using namespace small_batch;  // NOLINT: this file's helpers

constexpr int kVecsPerGroup = kGroup / Vec::size();

// A group's 32 weights as floats, in order: bytes hold weight j in their low nibble and weight
// j + 16 in their high one.
inline void group_weights(const uint8_t* bytes, const Vec& step, const Vec& minimum,
                          Vec (&w)[kVecsPerGroup]) {
#if defined(CPU_CAPABILITY_AVX512)
  // The group's 16 possible weights, fma(j, d, m) for j = 0..15, then each weight looked up by
  // its nibble: a permute reads only an index's low 4 bits, so the low nibbles need no mask.
  // (Converting each q and an fma per weight: 5-7% slower at 1-2 rows, the same at 4-8.)
  const __m512 table = _mm512_fmadd_ps(
      _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), step, minimum);
  const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  w[0] = _mm512_permutexvar_ps(wide, table);
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(wide, 4), table);
#elif defined(CPU_CAPABILITY_AVX2)
  for (int half = 0; half < 2; ++half) {  // bytes 0-7, then 8-15
    const __m256i wide = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * half)));
    const __m256i low = _mm256_and_si256(wide, _mm256_set1_epi32(15));
    const __m256i high = _mm256_srli_epi32(wide, 4);
    w[half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(low), step, minimum);
    w[2 + half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(high), step, minimum);
  }
#else
  float values[kGroup];
  for (int j = 0; j < kGroup / 2; ++j) {
    values[j] = static_cast<float>(bytes[j] & 15);
    values[j + kGroup / 2] = static_cast<float>(bytes[j] >> 4);
  }
  for (int v = 0; v < kVecsPerGroup; ++v)
    w[v] = at::vec::fmadd(Vec::loadu(values + v * Vec::size()), step, minimum);
#endif
}

// count (<= 16) fp16 values as floats: one conversion instruction where the CPU has F16C (a
// scalar conversion, twice a group, took a fifth of the kernel's time at one row).
inline void halves_to_floats(const c10::Half* halves, int64_t count, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if (count == 16) {
    _mm512_storeu_ps(out, _mm512_cvtph_ps(
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves))));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (count == 16) {
    for (int i = 0; i < 2; ++i)
      _mm256_storeu_ps(out + 8 * i, _mm256_cvtph_ps(_mm_loadu_si128(
                                        reinterpret_cast<const __m128i*>(halves + 8 * i))));
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(halves[i]);
}

// M rows of x against weight rows [n_begin, n_end), each weight row read once. Two sums per row
// of x, a group's halves alternating between them: one chain would wait on the FMA's latency.
template <int M>
void int4_fp32_rows(const float* x, const uint8_t* packed, const c10::Half* step_min,
                    const float* bias, int64_t k_size, int64_t n_begin, int64_t n_end, float* out,
                    int64_t out_stride) {
  constexpr int64_t kGroupsAtOnce = 8;  // their d and m: 16 fp16 values, converted together
  const int64_t num_groups = k_size / kGroup;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = packed + n * num_groups * (kGroup / 2);
    Vec acc[2][M];
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = Vec(0.f);
    for (int64_t g0 = 0; g0 < num_groups; g0 += kGroupsAtOnce) {
      const int64_t g_end = std::min(num_groups, g0 + kGroupsAtOnce);
      float scales[2 * kGroupsAtOnce];  // per group: d, then m
      halves_to_floats(step_min + 2 * (n * num_groups + g0), 2 * (g_end - g0), scales);
      for (int64_t g = g0; g < g_end; ++g) {
        Vec w[kVecsPerGroup];
        group_weights(row + g * (kGroup / 2), Vec(scales[2 * (g - g0)]),
                      Vec(scales[2 * (g - g0) + 1]), w);
        for (int m = 0; m < M; ++m) {
          const float* xg = x + m * k_size + g * kGroup;
          for (int v = 0; v < kVecsPerGroup; ++v)
            acc[v % 2][m] = at::vec::fmadd(Vec::loadu(xg + v * Vec::size()), w[v], acc[v % 2][m]);
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      const float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; },
                                                       acc[0][m] + acc[1][m]);
      out[m * out_stride + n] = bias ? sum + bias[n] : sum;
    }
  }
}

at::Tensor int4_fp32_linear(const at::Tensor& input, const at::Tensor& packed,
                            const at::Tensor& step_min, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kFloat &&
                  input.size(1) % kGroup == 0,
              "fp32 input [rows, in] expected, in a multiple of 32");
  const int64_t n_size = packed.size(0), k_size = input.size(1), num_groups = k_size / kGroup;
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == num_groups && packed.size(2) == kGroup / 2 &&
                  packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed: contiguous uint8 [out, in / 32, 16] expected");
  TORCH_CHECK(step_min.scalar_type() == at::kHalf && step_min.is_contiguous() &&
                  step_min.dim() == 3 && step_min.size(0) == n_size &&
                  step_min.size(1) == num_groups && step_min.size(2) == 2,
              "step_min: fp16 [out, in / 32, 2] (each group's step, then its minimum)");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == n_size &&
                                    bias->scalar_type() == at::kFloat),
              "bias: fp32 [out] expected");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({x.size(0), n_size}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::Half* step_min_p = step_min.data_ptr<c10::Half>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  parallel_tiles(x.size(0), n_size, [&](auto rows, int64_t m0, int64_t n0, int64_t n1) {
    int4_fp32_rows<rows()>(xp + m0 * k_size, wp, step_min_p, b, k_size, n0, n1,
                                  yp + m0 * n_size, n_size);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.def("int4_fp32_linear(Tensor input, Tensor packed, Tensor step_min, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("int4_fp32_linear", &int4_fp32_linear);
}
