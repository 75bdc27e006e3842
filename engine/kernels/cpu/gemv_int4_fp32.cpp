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
  const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512i low = _mm512_and_si512(wide, _mm512_set1_epi32(15));
  const __m512i high = _mm512_srli_epi32(wide, 4);
  w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(low), step, minimum);
  w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(high), step, minimum);
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

// M rows of x against weight rows [n_begin, n_end), each weight row read once. Two sums per row
// of x, a group's halves alternating between them: one chain would wait on the FMA's latency.
template <int M>
void int4_fp32_rows(const float* x, const uint8_t* packed, const c10::Half* step_min,
                    const float* bias, int64_t k_size, int64_t n_begin, int64_t n_end, float* out,
                    int64_t out_stride) {
  const int64_t num_groups = k_size / kGroup;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = packed + n * num_groups * (kGroup / 2);
    Vec acc[2][M];
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = Vec(0.f);
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t i = n * num_groups + g;
      Vec w[kVecsPerGroup];
      group_weights(row + g * (kGroup / 2), Vec(static_cast<float>(step_min[2 * i])),
                    Vec(static_cast<float>(step_min[2 * i + 1])), w);
      for (int m = 0; m < M; ++m) {
        const float* xg = x + m * k_size + g * kGroup;
        for (int v = 0; v < kVecsPerGroup; ++v)
          acc[v % 2][m] = at::vec::fmadd(Vec::loadu(xg + v * Vec::size()), w[v], acc[v % 2][m]);
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
