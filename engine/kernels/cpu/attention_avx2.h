// paged_attention.cpp's decode attention with AVX2 (attention_avx512.h's loops in 8 lanes), for
// fp32 and bf16 caches and head sizes that are whole vectors (64, 128). Prefill chunks with short
// contexts run through it too (a query per token).
//
// Scores: a key's products with a head are summed into one vector, and the vectors of 8 keys
// reduced together (`transpose_sum8`: 6 horizontal adds, two lane swaps and an add for 8
// scores). Values: each head's output accumulates in registers, the values read from memory by
// the FMAs (a head of 64 fills 8 of the 16 registers).

#pragma once

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "token_walk.h"

namespace attention_simd {

constexpr int kLanes = 8;

template <typename T>
constexpr bool kServes = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// 8 values as fp32 (bf16: its 16 bits are fp32's upper half).
template <typename T>
__attribute__((target("avx2,fma"))) inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
}

// Lane t: the sum of v[t]'s lanes.
__attribute__((target("avx2"))) inline __m256 transpose_sum8(const __m256* v) {
  // per 128-bit half: [v0, v1, v2, v3] summed over that half's 4 lanes, then [v4..v7]
  const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                       _mm256_permute2f128_ps(low, high, 0x31));
}

// logits[h * context_len + t] = q[h] . key t for the num_kv * group query heads (q scaled
// already) of the KV heads whose keys (one run per token) the walk reads: each token's run read
// in order, prefetch_next() called before each (in the first pass of heads); heads kMaxHeads
// at a time.
constexpr int kMaxHeads = 16;

template <typename T, int D, typename Prefetch>
__attribute__((target("avx2,fma"))) void scores(const float* q, const TokenWalk<T>& keys,
                                                int context_len, int num_kv, int group,
                                                const Prefetch& prefetch_next, float* logits) {
  constexpr int kVecs = D / kLanes;
  const int num_heads = num_kv * group;
  __m256 partial[kMaxHeads][kLanes];
  for (int h0 = 0; h0 < num_heads; h0 += kMaxHeads) {
    const int h1 = std::min(num_heads, h0 + kMaxHeads);
    TokenWalk<T> walk = keys;
    for (int first = 0; first < context_len; first += kLanes) {
      const int count = std::min(kLanes, context_len - first);
      for (int h = h0; h < h1; ++h)
        for (int t = count; t < kLanes; ++t) partial[h - h0][t] = _mm256_setzero_ps();
      for (int t = 0; t < count; ++t) {
        if (h0 == 0) prefetch_next();
        const T* token = walk.next();
        for (int h = h0; h < h1; ++h) {
          const T* k = token + (h / group) * D;
          const float* qh = q + h * D;
          __m256 sum0 = _mm256_mul_ps(_mm256_loadu_ps(qh), load8(k)), sum1 = _mm256_setzero_ps();
          for (int c = 1; c < kVecs; ++c) {
            __m256& sum = c % 2 ? sum1 : sum0;
            sum = _mm256_fmadd_ps(_mm256_loadu_ps(qh + c * kLanes), load8(k + c * kLanes), sum);
          }
          partial[h - h0][t] = _mm256_add_ps(sum0, sum1);
        }
      }
      alignas(32) float sums[kLanes];
      for (int h = h0; h < h1; ++h) {
        _mm256_store_ps(sums, transpose_sum8(partial[h - h0]));
        std::copy(sums, sums + count, logits + h * context_len + first);
      }
    }
  }
}

// out[g] = sum_t p[g][t] v_t * inv_sum[g] for the `group` heads of one KV head, each head's D
// floats in registers (a head at a time: 8 registers for 64).
// prefetch_next() is called before each token's read in the first pass.
template <typename T, int D, typename Prefetch>
__attribute__((target("avx2,fma"))) void weighted_values(const float* p,
                                                         const TokenWalk<T>& values,
                                                         int context_len, int group,
                                                         const float* inv_sum,
                                                         const Prefetch& prefetch_next, T* out) {
  constexpr int kVecs = D / kLanes;
  for (int g = 0; g < group; ++g) {
    TokenWalk<T> walk = values;
    __m256 acc[kVecs];
    for (int c = 0; c < kVecs; ++c) acc[c] = _mm256_setzero_ps();
    const float* weights = p + g * context_len;
    for (int t = 0; t < context_len; ++t) {
      if (g == 0) prefetch_next();
      const T* v = walk.next();
      const __m256 weight = _mm256_broadcast_ss(weights + t);
      for (int c = 0; c < kVecs; ++c) acc[c] = _mm256_fmadd_ps(weight, load8(v + c * kLanes), acc[c]);
    }
    const __m256 scale = _mm256_set1_ps(inv_sum[g]);
    for (int c = 0; c < kVecs; ++c) {
      alignas(32) float sums[kLanes];
      _mm256_store_ps(sums, _mm256_mul_ps(acc[c], scale));
      T* o = out + g * D + c * kLanes;
      for (int i = 0; i < kLanes; ++i) o[i] = static_cast<T>(sums[i]);
    }
  }
}

}  // namespace attention_simd
#endif
