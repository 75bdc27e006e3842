// paged_attention.cpp's decode attention with AVX-512, for fp32 and bf16 caches and head sizes
// that are whole vectors (64, 128): its portable loop's arithmetic in fewer instructions (a
// 32-sequence bf16 layer with the context in cache: 383 -> 220-250 us). attention_avx2.h is the
// same with AVX2 (the same names: the build's capability picks one).
//
// Scores: a key's products with a head are summed into one vector, and the vectors of 16 keys
// reduced together (`transpose_sum16`: 45 shuffles and adds for 16 scores, where a horizontal sum
// took ~10 a score). Values: each head's output accumulates in registers, not in memory.

#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "token_walk.h"

namespace attention_simd {

constexpr int kLanes = 16;

template <typename T>
constexpr bool kServes = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// 16 values as fp32 (bf16: its 16 bits are fp32's upper half).
template <typename T>
__attribute__((target("avx512f,avx512bw"))) inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
}

// Where token t's vector goes among transpose_sum16's inputs for its sum to come out in lane t
// (the butterfly below leaves lane k holding input kOrder[k]; the order is its own inverse).
constexpr int kOrder[kLanes] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

// v[kOrder[t]] for t < 16 -> lane t: the sum of v[kOrder[t]]'s lanes.
__attribute__((target("avx512f"))) inline __m512 transpose_sum16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: v[i]'s in the low one, v[i + 8]'s in the high
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44),
                         _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lanes: v[i], v[i + 8], v[i + 4], v[i + 12]
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88),
                         _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)  // pairs within each 128-bit lane
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[i], x[i + 2], 0x44),
                         _mm512_shuffle_ps(x[i], x[i + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// logits[h * context_len + t] = q[h] . key t for the num_kv * group query heads (q scaled
// already) of the KV heads whose keys (one run per token) the walk reads: each token's run read
// in order, prefetch_next() called before each (in the first pass of heads); heads kMaxHeads
// at a time (their 16 keys' vectors held for transpose_sum16).
constexpr int kMaxHeads = 16;

template <typename T, int D, typename Prefetch>
__attribute__((target("avx512f,avx512bw"))) void scores(const float* q, const TokenWalk<T>& keys,
                                                          int context_len, int num_kv, int group,
                                                          const Prefetch& prefetch_next,
                                                          float* logits) {
  constexpr int kVecs = D / kLanes;
  const int num_heads = num_kv * group;
  __m512 partial[kMaxHeads][kLanes];
  for (int h0 = 0; h0 < num_heads; h0 += kMaxHeads) {
    const int h1 = std::min(num_heads, h0 + kMaxHeads);
    TokenWalk<T> walk = keys;
    for (int first = 0; first < context_len; first += kLanes) {
      const int count = std::min(kLanes, context_len - first);
      for (int h = h0; h < h1; ++h)
        for (int t = count; t < kLanes; ++t) partial[h - h0][kOrder[t]] = _mm512_setzero_ps();
      for (int t = 0; t < count; ++t) {
        if (h0 == 0) prefetch_next();
        const T* token = walk.next();
        for (int h = h0; h < h1; ++h) {
          const T* k = token + (h / group) * D;  // the compiler keeps each KV head's vectors
          const float* qh = q + h * D;
          __m512 sum0 = _mm512_mul_ps(_mm512_loadu_ps(qh), load16(k)), sum1 = _mm512_setzero_ps();
          for (int c = 1; c < kVecs; ++c) {
            __m512& sum = c % 2 ? sum1 : sum0;
            sum = _mm512_fmadd_ps(_mm512_loadu_ps(qh + c * kLanes), load16(k + c * kLanes), sum);
          }
          partial[h - h0][kOrder[t]] = _mm512_add_ps(sum0, sum1);
        }
      }
      const auto mask = static_cast<__mmask16>((1u << count) - 1);
      for (int h = h0; h < h1; ++h) {
        _mm512_mask_storeu_ps(logits + h * context_len + first, mask,
                              transpose_sum16(partial[h - h0]));
      }
    }
  }
}

// out[g] = sum_t p[g][t] v_t * inv_sum[g] for the `group` heads of one KV head, each head's D
// floats in registers; heads in passes of as many as 16 registers hold.
// prefetch_next() is called before each token's read in the first pass.
template <typename T, int D, typename Prefetch>
__attribute__((target("avx512f,avx512bw"))) void weighted_values(
    const float* p, const TokenWalk<T>& values, int context_len, int group, const float* inv_sum,
    const Prefetch& prefetch_next, T* out) {
  constexpr int kVecs = D / kLanes, kHeads = 16 / kVecs;
  for (int g0 = 0; g0 < group; g0 += kHeads) {
    const int heads = std::min(kHeads, group - g0);
    TokenWalk<T> walk = values;
    __m512 acc[kHeads][kVecs];
    for (int h = 0; h < kHeads; ++h)
      for (int c = 0; c < kVecs; ++c) acc[h][c] = _mm512_setzero_ps();
    for (int t = 0; t < context_len; ++t) {
      if (g0 == 0) prefetch_next();
      const T* v = walk.next();
      __m512 vv[kVecs];
      for (int c = 0; c < kVecs; ++c) vv[c] = load16(v + c * kLanes);
      for (int h = 0; h < kHeads; ++h) {
        if (h >= heads) break;
        const __m512 weight = _mm512_set1_ps(p[(g0 + h) * context_len + t]);
        for (int c = 0; c < kVecs; ++c) acc[h][c] = _mm512_fmadd_ps(weight, vv[c], acc[h][c]);
      }
    }
    for (int h = 0; h < heads; ++h) {
      const __m512 scale = _mm512_set1_ps(inv_sum[g0 + h]);
      for (int c = 0; c < kVecs; ++c) {
        alignas(64) float sums[kLanes];
        _mm512_store_ps(sums, _mm512_mul_ps(acc[h][c], scale));
        T* o = out + (g0 + h) * D + c * kLanes;
        for (int i = 0; i < kLanes; ++i) o[i] = static_cast<T>(sums[i]);
      }
    }
  }
}

}  // namespace attention_simd
#endif
