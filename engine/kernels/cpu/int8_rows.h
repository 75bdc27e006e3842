// What the kernels with int8 activations (gemm_w8a8.cpp, gemm_w4a8.cpp) share: x's rows rounded
// to int8 per group of 32 as they enter, outputs stored 16 columns at a time, and which of the
// three paths runs: AVX512-VNNI's byte dot product, AVX2's pair products, or a scalar loop. All
// three compute the same integers; VNNI's and AVX2's also the same fp32 sums, bit for bit.

#pragma once

#include <cstring>

#include "small_batch.h"

namespace int8_rows {

constexpr int kTile = 16;  // output columns in a packed tile: one zmm of int32 sums

// x's rows rounded to int8 per group of 32: q [rows, K], each group's scale (amax / 127) and the
// sum of its q (what the weights' offsets multiply: w8a8's +128, w4a8's minimums), also as
// sum x scale (w4a8's minimums multiply that: once a group, not once a group and a tile).
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
  std::vector<float> scaled_sum;
};

// One group of 32 values of x: q = nearbyint(x * (127 / amax)), as quantize_rows_int8 rounds
// them; its scale (amax / 127) and the sum of its q. Without -ffast-math, which would
// compute (x * 127) / amax: a value a hair from a tie rounds the other way and moves an output by
// up to 1%.
__attribute__((optimize("no-fast-math"))) inline void quantize_group(const float* values,
                                                                     int8_t* q, float* scale,
                                                                     int32_t* sum) {
  float amax = 0.f;
  for (int k = 0; k < small_batch::kGroup; ++k) amax = std::max(amax, std::abs(values[k]));
  const float inverse = amax > 0.f ? 127.f / amax : 0.f;
  int32_t total = 0;
  for (int k = 0; k < small_batch::kGroup; ++k) {
    q[k] = static_cast<int8_t>(std::nearbyint(values[k] * inverse));
    total += q[k];
  }
  *scale = amax / 127.f;
  *sum = total;
}

#if defined(CPU_CAPABILITY_AVX512)
// The same with AVX-512: the same IEEE products, rounded to nearest even by the conversion.
__attribute__((target("avx512f,avx512bw"))) inline void quantize_group_avx512(
    const float* values, int8_t* q, float* scale, int32_t* sum) {
  const __m512 low = _mm512_loadu_ps(values), high = _mm512_loadu_ps(values + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
  const float inverse = amax > 0.f ? 127.f / amax : 0.f;
  const __m512 inv = _mm512_set1_ps(inverse);
  const __m512i q_low = _mm512_cvtps_epi32(_mm512_mul_ps(low, inv));
  const __m512i q_high = _mm512_cvtps_epi32(_mm512_mul_ps(high, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q_low));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q_high));
  *scale = amax / 127.f;
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q_low, q_high));
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// The same with AVX2: 4 x 8 products, rounded to nearest even by the conversion, narrowed to bytes.
__attribute__((target("avx2,fma"))) inline void quantize_group_avx2(const float* values, int8_t* q,
                                                                    float* scale, int32_t* sum) {
  const __m256 sign_bit = _mm256_set1_ps(-0.f);
  __m256 v[4], magnitude = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(values + 8 * i);
    magnitude = _mm256_max_ps(magnitude, _mm256_andnot_ps(sign_bit, v[i]));
  }
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(magnitude), _mm256_extractf128_ps(magnitude, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  const float amax = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i qi[4];
  for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
  // packs interleave 128-bit lanes: dwords come out as a0 b0 c0 d0 a1 b1 c1 d1
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]),
                                           _mm256_packs_epi32(qi[2], qi[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]),
                                         _mm256_add_epi32(qi[2], qi[3]));
  __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0x4e));
  *scale = amax / 127.f;
  *sum = _mm_cvtsi128_si32(_mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0xb1)));
}
#endif

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t num_rows, int64_t k_size) {
  const int64_t num_groups = k_size / small_batch::kGroup;
  QuantizedRows rows{std::vector<int8_t>(num_rows * k_size),
                     std::vector<float>(num_rows * num_groups),
                     std::vector<int32_t>(num_rows * num_groups),
                     std::vector<float>(num_rows * num_groups)};
  at::parallel_for(0, num_rows * num_groups, 256, [&](int64_t begin, int64_t end) {
    float values[small_batch::kGroup];
    for (int64_t i = begin; i < end; ++i) {  // i: one group of one row
      const int64_t first = i * small_batch::kGroup;
      for (int k = 0; k < small_batch::kGroup; ++k) values[k] = static_cast<float>(x[first + k]);
#if defined(CPU_CAPABILITY_AVX512)
      quantize_group_avx512(values, rows.q.data() + first, &rows.scale[i], &rows.sum[i]);
#elif defined(CPU_CAPABILITY_AVX2)
      quantize_group_avx2(values, rows.q.data() + first, &rows.scale[i], &rows.sum[i]);
#else
      quantize_group(values, rows.q.data() + first, &rows.scale[i], &rows.sum[i]);
#endif
      rows.scaled_sum[i] = static_cast<float>(rows.sum[i]) * rows.scale[i];
    }
  });
  return rows;
}

#if defined(CPU_CAPABILITY_AVX512)
// out[0..16) = v (+ bias), rounded to T as c10 rounds (to nearest even; bf16's NaN 0x7FC0). A
// scalar loop here took a fifth of the output head's time at 32 rows.
template <typename T>
__attribute__((target("avx512f,avx512bw"))) inline void store16(__m512 v, const T* bias, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
    _mm512_storeu_ps(out, v);
    return;
  } else {
    if (bias) {
      alignas(64) float values[kTile];
      for (int i = 0; i < kTile; ++i) values[i] = static_cast<float>(bias[i]);
      v = _mm512_add_ps(v, _mm512_load_ps(values));
    }
    __m256i half;
    if constexpr (std::is_same_v<T, c10::Half>) {
      half = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
      half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
      const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      half = _mm256_mask_mov_epi16(half, is_nan, _mm256_set1_epi16(0x7fc0));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), half);
  }
}

#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// out[0..16) = sums (+ bias), rounded to T (AVX2's path: the conversion c10's, one at a time).
template <typename T>
inline void store16(const float* sums, const T* bias, T* out) {
  for (int i = 0; i < kTile; ++i)
    out[i] = static_cast<T>(sums[i] + (bias ? static_cast<float>(bias[i]) : 0.f));
}
#endif

// An accumulator the compiler must keep as it is here: integer adds are associative, and GCC
// otherwise turns a tile's chains of adds into trees that hold every product at once (spilled:
// half the speed of AVX2's tiles).
template <typename V>
inline void keep_in_register(V& v) {
  asm("" : "+x"(v));
}

// Which path the kernels take: the fastest this CPU has, unless a test asks for another.
enum class Path { kScalar, kAvx2, kVnni };

inline Path& chosen_path() {
  static Path path = [] {
#if defined(CPU_CAPABILITY_AVX512)
    if (__builtin_cpu_supports("avx512vnni")) return Path::kVnni;
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    return Path::kAvx2;
#else
    return Path::kScalar;
#endif
  }();
  return path;
}

inline bool has_vnni() { return chosen_path() == Path::kVnni; }

// block(rows, tiles, m0, tile): every block of up to 4 rows of x (from m0) against every run of up
// to NR packed tiles (from `tile`), `rows()` and `tiles()` compile-time constants (a register
// tile's shape); the runs of tiles split across threads, each run's weights read once per block.
template <int NR, typename Block>
void parallel_blocks(int64_t num_rows, int64_t num_tiles, const Block& block) {
  constexpr int kRows = 4;
  const int64_t num_tasks = (num_tiles + NR - 1) / NR;
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task * NR;
      small_batch::with_count<NR>(std::min<int64_t>(NR, num_tiles - tile), [&](auto tiles) {
        for (int64_t m0 = 0; m0 < num_rows; m0 += kRows) {
          small_batch::with_count<kRows>(std::min<int64_t>(kRows, num_rows - m0), [&](auto rows) {
            block(rows, tiles, m0, tile);
          });
        }
      });
    }
  });
}

}  // namespace int8_rows
