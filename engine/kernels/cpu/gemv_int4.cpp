// y = x W^T (+ b) for a few rows of x with int4 weights in llama.cpp's Q4_1 layout
// (engine/layers/quantization.py): per group of 32 weights of a row, 16 bytes of nibbles (byte j:
// weight j low, weight j + 16 high), a step d and a minimum m in fp16, weight = m + d q. 0.625
// bytes a weight, a sixth of fp32's. Registered as torch.ops.llm_cpu.int4_small_batch_linear.
//
// x is rounded to int16 per group (small_batch.h), so that
//   sum_k x_k (m + d q_k) = d s_x sum_k xq_k q_k + m sum_k x_k
// with the first sum exact in int32 (vpmaddwd: 32 x 15 x 32767 < 2^24, exact in fp32 too) and
// the group sums of x computed once per step, not once per weight row.

#include "small_batch.h"

namespace {

using namespace small_batch;  // NOLINT: this file's helpers

// The same sums, scalar, for CPUs without AVX2.
template <typename T, int M>
void int4_gemv_rows_scalar(const int16_t* xq, const float* x_scale, const float* x_sum,
                           const uint8_t* packed, const c10::Half* step, const c10::Half* minimum,
                           const T* bias, int64_t k_size, int64_t n_begin, int64_t n_end, T* out,
                           int64_t out_stride) {
  const int64_t num_groups = k_size / kGroup;
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int64_t g = 0; g < num_groups; ++g) {
        const uint8_t* w = packed + (n * num_groups + g) * (kGroup / 2);
        const int16_t* xg = xq + m * k_size + g * kGroup;
        int32_t dot = 0;
        for (int j = 0; j < kGroup / 2; ++j) dot += xg[j] * (w[j] & 15) + xg[j + 16] * (w[j] >> 4);
        const int64_t i = n * num_groups + g;
        sum += static_cast<float>(dot) * static_cast<float>(step[i]) * x_scale[m * num_groups + g] +
               static_cast<float>(minimum[i]) * x_sum[m * num_groups + g];
      }
      out[m * out_stride + n] = static_cast<T>(bias ? sum + static_cast<float>(bias[n]) : sum);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// One group of 32 int4 weights against M rows of int16 x, into acc. The 16 bytes widened to 16
// int16 hold weights j (bits 0-3) and j + 16 (bits 4-7): an and and a shift give both halves,
// then two vpmaddwd per row of x and one FMA by d times x's scale.
template <int M>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void int4_group(
    const uint8_t* w, const uint16_t* d, const int16_t* xq, const float* x_scale, int64_t k_size,
    int64_t num_groups, int64_t g, __m256 (&acc)[M]) {
  const __m256i bytes = _mm256_cvtepu8_epi16(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * (kGroup / 2))));
  const __m256i w0 = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
  const __m256i w1 = _mm256_srli_epi16(bytes, 4);
  const __m256 group_step = _mm256_set1_ps(_cvtsh_ss(d[g]));
  for (int m = 0; m < M; ++m) {
    const auto* xm = reinterpret_cast<const __m256i*>(xq + m * k_size + g * kGroup);
    const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xm)),
                                         _mm256_madd_epi16(w1, _mm256_loadu_si256(xm + 1)));
    const __m256 both = _mm256_mul_ps(group_step, _mm256_broadcast_ss(x_scale + m * num_groups + g));
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), both, acc[m]);
  }
}

// The minimums' part of one weight row for M rows of x, sum_g m_g sum(x_g) (fp16 mins
// [groups]). Up to 2 rows: per row, a dot over the groups, 8 at a time; more rows: 8 rows at once
// per group from x_sum_t [groups, 8] (the chunk's group sums transposed, zeros past M).
template <int M>
__attribute__((target("avx2,fma,f16c"))) void min_part(const uint16_t* mins, const float* x_sum,
                                                       const float* x_sum_t, int64_t num_groups,
                                                       float (&part)[M]) {
  if constexpr (M <= 2) {
    for (int m = 0; m < M; ++m) {
      const float* sums = x_sum + m * num_groups;
      __m256 total = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= num_groups; g += 8) {
        const __m128i mins8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g));
        total = _mm256_fmadd_ps(_mm256_cvtph_ps(mins8), _mm256_loadu_ps(sums + g), total);
      }
      part[m] = reduce_add(total);
      for (; g < num_groups; ++g) part[m] += _cvtsh_ss(mins[g]) * sums[g];
    }
  } else {
    __m256 total = _mm256_setzero_ps();
    for (int64_t g = 0; g < num_groups; ++g)
      total = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(mins[g])), _mm256_loadu_ps(x_sum_t + 8 * g),
                              total);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, total);
    for (int m = 0; m < M; ++m) part[m] = lanes[m];
  }
}

// M rows of int16 x against int4 weight rows [n_begin, n_end). Up to 4 rows of x, two groups at
// a time into two sets of sums (one chain waits on the FMA's latency); more rows are chains
// enough, and 16 registers would not hold two sets.
template <typename T, int M>
__attribute__((target("avx2,fma,f16c"))) void int4_gemv_rows(
    const int16_t* xq, const float* x_scale, const float* x_sum, const float* x_sum_t,
    const uint8_t* packed, const c10::Half* step, const c10::Half* minimum, const T* bias, int64_t k_size,
    int64_t n_begin, int64_t n_end, T* out, int64_t out_stride) {
  static_assert(M <= kMaxRows && kMaxRows == 8, "x_sum_t: a vector of 8 rows per group");
  const int64_t num_groups = k_size / kGroup;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* w = packed + n * num_groups * (kGroup / 2);
    const auto* d = reinterpret_cast<const uint16_t*>(step) + n * num_groups;
    __m256 acc[M], acc2[M];
    for (int m = 0; m < M; ++m) acc[m] = acc2[m] = _mm256_setzero_ps();
    int64_t g = 0;
    if constexpr (M <= 4) {
      for (; g + 2 <= num_groups; g += 2) {
        int4_group<M>(w, d, xq, x_scale, k_size, num_groups, g, acc);
        int4_group<M>(w, d, xq, x_scale, k_size, num_groups, g + 1, acc2);
      }
    }
    for (; g < num_groups; ++g) int4_group<M>(w, d, xq, x_scale, k_size, num_groups, g, acc);
    float part[M];
    min_part<M>(reinterpret_cast<const uint16_t*>(minimum) + n * num_groups, x_sum, x_sum_t,
                num_groups, part);
    // Reduced with every index a constant: an array indexed at run time would live in memory,
    // and the loop above would store every sum each group (measured 1.7x slower at 8 rows).
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const float sum = reduce_add(_mm256_add_ps(acc[m], acc2[m])) + part[m];
      out[m * out_stride + n] = static_cast<T>(bias ? sum + static_cast<float>(bias[n]) : sum);
    }
  }
}

#endif

template <typename T>
void int4_gemv(const T* x, int64_t num_rows, const uint8_t* packed, const c10::Half* step,
               const c10::Half* minimum, const T* bias, int64_t k_size, int64_t n_size, T* y) {
  const int64_t num_groups = k_size / kGroup;
  std::vector<int16_t> xq(num_rows * k_size);  // read from cache by every weight row
  std::vector<float> x_scale(num_rows * num_groups), x_sum(num_rows * num_groups);
  quantize_rows_int16(x, num_rows, k_size, xq.data(), x_scale.data(), x_sum.data());
  // The group sums again per chunk of kMaxRows rows, [groups, kMaxRows] (zeros past the last
  // row): the minimums' part of a chunk of more than 2 rows reads a group's sums side by side.
  const int64_t num_chunks = (num_rows + kMaxRows - 1) / kMaxRows;
  std::vector<float> x_sum_t(num_chunks * num_groups * kMaxRows, 0.f);
  for (int64_t r = 0; r < num_rows; ++r)
    for (int64_t g = 0; g < num_groups; ++g)
      x_sum_t[(r / kMaxRows * num_groups + g) * kMaxRows + r % kMaxRows] = x_sum[r * num_groups + g];
  parallel_tiles(num_rows, n_size, [&](auto rows, int64_t m0, int64_t n0, int64_t n1) {
    const int64_t x_at = m0 * k_size, group_at = m0 * num_groups;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    // m0: a multiple of kMaxRows (parallel_tiles' chunks), so its chunk starts at m0 * groups
    int4_gemv_rows<T, rows()>(xq.data() + x_at, x_scale.data() + group_at,
                              x_sum.data() + group_at, x_sum_t.data() + group_at, packed, step,
                              minimum, bias, k_size, n0, n1, y + m0 * n_size, n_size);
#else
    int4_gemv_rows_scalar<T, rows()>(xq.data() + x_at, x_scale.data() + group_at,
                                     x_sum.data() + group_at, packed, step, minimum, bias, k_size,
                                     n0, n1, y + m0 * n_size, n_size);
#endif
  });
}

at::Tensor int4_small_batch_linear(const at::Tensor& input, const at::Tensor& packed,
                                   const at::Tensor& step_min,
                                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && packed.dim() == 2 && input.size(1) == 2 * packed.size(1) &&
                  input.size(1) % kGroup == 0,
              "input [rows, in] and packed [out, in / 2] expected, in a multiple of 32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous uint8");
  const int64_t n_size = packed.size(0), num_groups = input.size(1) / kGroup;
  TORCH_CHECK(step_min.scalar_type() == at::kHalf && step_min.is_contiguous() &&
                  step_min.dim() == 3 && step_min.size(0) == 2 && step_min.size(1) == n_size &&
                  step_min.size(2) == num_groups,
              "step_min: fp16 [2, out, in / 32] (each group's step, then its minimum)");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == n_size &&
                                    bias->scalar_type() == input.scalar_type()),
              "bias [out] in the input's dtype expected");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({input.size(0), n_size}, input.options());
  const c10::Half* step = step_min.data_ptr<c10::Half>();
  with_float_type(input.scalar_type(), "input", [&](auto type) {
    using T = decltype(type);
    const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    int4_gemv<T>(x.data_ptr<T>(), x.size(0), packed.data_ptr<uint8_t>(), step,
                 step + n_size * num_groups, b, input.size(1), n_size, y.data_ptr<T>());
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.def("int4_small_batch_linear(Tensor input, Tensor packed, Tensor step_min, Tensor? bias) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("int4_small_batch_linear", &int4_small_batch_linear);
}
