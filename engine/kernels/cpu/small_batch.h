// What the small-batch linear kernels (gemv*.cpp) share: the split of the weight rows across
// threads and into tiles, each tile dotted with every row of x while it is in cache, and the
// rounding of x to int16 that the integer kernels multiply with.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

namespace small_batch {

using Vec = at::vec::Vectorized<float>;
constexpr int kMaxRows = 8;  // rows of x dotted with a weight row at once (more: in chunks)
constexpr int64_t kWeightRowsPerTask = 16;
constexpr int kGroup = 32;  // engine/layers/quantization.py's GROUP_SIZE

// Columns [begin, end) of the output: the weight rows split across threads.
template <typename Rows>
void parallel_rows(int64_t n_size, const Rows& rows) {
  const int64_t num_tasks = (n_size + kWeightRowsPerTask - 1) / kWeightRowsPerTask;
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    rows(begin * kWeightRowsPerTask, std::min(end * kWeightRowsPerTask, n_size));
  });
}

// f(std::integral_constant<int, N>{}) for N = count (1..kMax), a compile-time constant.
template <int kMax, typename F>
void with_count(int64_t count, const F& f) {
  if constexpr (kMax >= 1) {
    if (count == kMax) {
      f(std::integral_constant<int, kMax>{});
    } else if (count < kMax) {
      with_count<kMax - 1>(count, f);
    }
  }
}

// f(std::integral_constant<int, M>{}) for M = num_rows (1..kMaxRows), a compile-time constant.
template <typename F>
void with_rows(int64_t num_rows, const F& f) {
  with_count<kMaxRows>(num_rows, f);
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

// x [rows, K] -> int16 [rows, K], and per row an fp32 scale per group of 32 (x ~ q * scale): an
// error of at most 1/65534 of the group's largest value, ~100x below bf16's rounding. `sums`,
// if given: per row each rounded group's sum (the int4 kernel's minimum multiplies it).
template <typename T>
void quantize_rows_int16(const T* x, int64_t rows, int64_t k_size, int16_t* q, float* scale,
                         float* sums = nullptr) {
  const int64_t num_groups = k_size / kGroup;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t begin = m * k_size + g * kGroup;
      float amax = 0.f;
      for (int64_t k = begin; k < begin + kGroup; ++k)
        amax = std::max(amax, std::abs(static_cast<float>(x[k])));
      const float inverse = amax > 0.f ? 32767.f / amax : 0.f;
      int32_t total = 0;  // at most 32 x 32767: exact
      for (int64_t k = begin; k < begin + kGroup; ++k) {
        q[k] = static_cast<int16_t>(std::nearbyint(static_cast<float>(x[k]) * inverse));
        total += q[k];
      }
      scale[m * num_groups + g] = amax / 32767.f;
      if (sums != nullptr) sums[m * num_groups + g] = static_cast<float>(total) * (amax / 32767.f);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The sum of v's 8 lanes.
__attribute__((target("avx2,fma"))) inline float reduce_add(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}
#endif

}  // namespace small_batch
