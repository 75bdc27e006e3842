// y = x W^T (+ b) with int8 weights and int8 activations (`--quantization w8a8`), any number of
// rows: llama.cpp's Q8_0 x Q8_0 arithmetic. W's rows are in groups of 32 int8 values with one
// fp32 scale each (engine/layers/quantization.py); x is rounded here, each group of 32 of a row
// to int8 against its largest magnitude. Each group's dot product is an exact int32, then scaled
// by both groups' scales into an fp32 sum, group after group in order, whatever the number of
// rows: a row's result does not depend on the rows beside it.
//
// On a CPU with AVX512-VNNI, `vpdpbusd` multiplies 64 pairs of bytes and sums them in fours into
// int32 in one instruction: 4x the multiply-adds of an fp32 FMA, 2x bf16's. It takes one operand
// unsigned, so the weights are stored plus 128 (0..254) and each group's sum of x times 128 is
// taken off: sum((w + 128) x) - 128 sum(x) = sum(w x), exactly.
//
// Weights packed by engine/layers/quantization.py's `pack_w8a8`: tiles of 16 output columns, [tiles, K / 4, 16, 4] uint8, so one 64-byte load holds 4 consecutive k of 16 columns,
// and the scales as [tiles, K / 32, 16]. Without VNNI the same integers and the same order of the
// fp32 sums are computed one at a time: a correct path, not a fast one.

#include <cstring>

#include "small_batch.h"

namespace {

constexpr int kTile = 16;  // output columns in a packed tile: one zmm of int32 sums
constexpr int kQuads = small_batch::kGroup / 4;  // 4-byte steps in a group

// x's rows rounded to int8 per group of 32: q [rows, K], each group's scale (amax / 127) and
// -128 times the sum of its q (the correction for the weights' +128).
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> correction;
};

// One group of 32 values of x: q = nearbyint(x * (127 / amax)), as quantize_rows_int8 rounds
// them; its scale (amax / 127) and -128 times the sum of its q. Without -ffast-math, which would
// compute (x * 127) / amax: a value a hair from a tie rounds the other way and moves an output by
// up to 1%.
__attribute__((optimize("no-fast-math"))) inline void quantize_group(const float* values,
                                                                     int8_t* q, float* scale,
                                                                     int32_t* correction) {
  float amax = 0.f;
  for (int k = 0; k < small_batch::kGroup; ++k) amax = std::max(amax, std::abs(values[k]));
  const float inverse = amax > 0.f ? 127.f / amax : 0.f;
  int32_t total = 0;
  for (int k = 0; k < small_batch::kGroup; ++k) {
    q[k] = static_cast<int8_t>(std::nearbyint(values[k] * inverse));
    total += q[k];
  }
  *scale = amax / 127.f;
  *correction = -128 * total;
}

#if defined(CPU_CAPABILITY_AVX512)
// The same with AVX-512: the same IEEE products, rounded to nearest even by the conversion.
__attribute__((target("avx512f,avx512bw"))) inline void quantize_group_avx512(
    const float* values, int8_t* q, float* scale, int32_t* correction) {
  const __m512 low = _mm512_loadu_ps(values), high = _mm512_loadu_ps(values + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
  const float inverse = amax > 0.f ? 127.f / amax : 0.f;
  const __m512 inv = _mm512_set1_ps(inverse);
  const __m512i q_low = _mm512_cvtps_epi32(_mm512_mul_ps(low, inv));
  const __m512i q_high = _mm512_cvtps_epi32(_mm512_mul_ps(high, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q_low));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q_high));
  *scale = amax / 127.f;
  *correction = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(q_low, q_high));
}
#endif

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t num_rows, int64_t k_size) {
  const int64_t num_groups = k_size / small_batch::kGroup;
  QuantizedRows rows{std::vector<int8_t>(num_rows * k_size),
                     std::vector<float>(num_rows * num_groups),
                     std::vector<int32_t>(num_rows * num_groups)};
  at::parallel_for(0, num_rows * num_groups, 256, [&](int64_t begin, int64_t end) {
    float values[small_batch::kGroup];
    for (int64_t i = begin; i < end; ++i) {  // i: one group of one row
      const int64_t first = i * small_batch::kGroup;
      for (int k = 0; k < small_batch::kGroup; ++k) values[k] = static_cast<float>(x[first + k]);
#if defined(CPU_CAPABILITY_AVX512)
      quantize_group_avx512(values, rows.q.data() + first, &rows.scale[i], &rows.correction[i]);
#else
      quantize_group(values, rows.q.data() + first, &rows.scale[i], &rows.correction[i]);
#endif
    }
  });
  return rows;
}

// One tile of 16 columns for one row, an int at a time (CPUs without VNNI).
template <typename T>
void tile_scalar(const QuantizedRows& x, int64_t m, int64_t k_size, const uint8_t* w,
                 const float* w_scale, const T* bias, int64_t n0, T* out) {
  const int64_t num_groups = k_size / small_batch::kGroup;
  float sums[kTile] = {};
  for (int64_t g = 0; g < num_groups; ++g) {
    const int8_t* xg = x.q.data() + m * k_size + g * small_batch::kGroup;
    for (int c = 0; c < kTile; ++c) {
      int32_t dot = x.correction[m * num_groups + g];
      for (int k = 0; k < small_batch::kGroup; ++k)
        dot += static_cast<int32_t>(w[((g * kQuads + k / 4) * kTile + c) * 4 + k % 4]) * xg[k];
      sums[c] += static_cast<float>(dot) * (w_scale[g * kTile + c] * x.scale[m * num_groups + g]);
    }
  }
  for (int c = 0; c < kTile; ++c)
    out[n0 + c] = static_cast<T>(sums[c] + (bias ? static_cast<float>(bias[n0 + c]) : 0.f));
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

// MR rows of x against NR tiles of 16 columns: MR x NR int32 sums per group and MR x NR fp32
// totals in registers (4 x 3: 24 of the 32 zmm); each 64-byte weight load serves MR rows.
template <int MR, int NR, typename T>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni(
    const QuantizedRows& x, int64_t m0, int64_t k_size, const uint8_t* w, const float* w_scale,
    const T* bias, int64_t n0, T* out, int64_t out_stride) {
  const int64_t num_groups = k_size / small_batch::kGroup;
  const int64_t tile_bytes = k_size * kTile, tile_scales = num_groups * kTile;
  __m512 total[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) total[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < num_groups; ++g) {
    __m512i dot[MR][NR];
    for (int m = 0; m < MR; ++m) {
      const __m512i start = _mm512_set1_epi32(x.correction[(m0 + m) * num_groups + g]);
      for (int j = 0; j < NR; ++j) dot[m][j] = start;
    }
    const uint8_t* wg = w + g * small_batch::kGroup * kTile;
#pragma GCC unroll 8
    for (int quad = 0; quad < kQuads; ++quad) {
      __m512i wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(wg + j * tile_bytes + quad * 64);
      for (int m = 0; m < MR; ++m) {
        int32_t four;  // x's 4 bytes at this step, broadcast to every column
        std::memcpy(&four, x.q.data() + (m0 + m) * k_size + g * small_batch::kGroup + quad * 4, 4);
        const __m512i xv = _mm512_set1_epi32(four);
        for (int j = 0; j < NR; ++j) dot[m][j] = _mm512_dpbusd_epi32(dot[m][j], wv[j], xv);
      }
    }
    __m512 sv[NR];
    for (int j = 0; j < NR; ++j) sv[j] = _mm512_loadu_ps(w_scale + j * tile_scales + g * kTile);
    for (int m = 0; m < MR; ++m) {
      const __m512 xs = _mm512_set1_ps(x.scale[(m0 + m) * num_groups + g]);
      for (int j = 0; j < NR; ++j)
        total[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][j]), _mm512_mul_ps(sv[j], xs),
                                      total[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NR; ++j) {
      const int64_t first = n0 + j * kTile;
      store16(total[m][j], bias ? bias + first : nullptr, out + (m0 + m) * out_stride + first);
    }
  }
}

template <int NR, typename T>
void tiles_vnni(const QuantizedRows& x, int64_t num_rows, int64_t k_size, const uint8_t* w,
                const float* w_scale, const T* bias, int64_t n0, T* out, int64_t out_stride) {
  constexpr int kRows = 4;
  int64_t m0 = 0;
  for (; m0 + kRows <= num_rows; m0 += kRows)
    tile_vnni<kRows, NR>(x, m0, k_size, w, w_scale, bias, n0, out, out_stride);
  switch (num_rows - m0) {
    case 3: tile_vnni<3, NR>(x, m0, k_size, w, w_scale, bias, n0, out, out_stride); break;
    case 2: tile_vnni<2, NR>(x, m0, k_size, w, w_scale, bias, n0, out, out_stride); break;
    case 1: tile_vnni<1, NR>(x, m0, k_size, w, w_scale, bias, n0, out, out_stride); break;
    default: break;
  }
}

bool has_vnni() {
  static const bool found = __builtin_cpu_supports("avx512vnni");
  return found;
}
#endif

template <typename T>
void w8a8_gemm(const T* x, int64_t num_rows, const uint8_t* w, const float* w_scale, const T* bias,
               int64_t k_size, int64_t n_size, T* y) {
  const QuantizedRows xq = quantize_rows(x, num_rows, k_size);
  const int64_t num_groups = k_size / small_batch::kGroup;
  const int64_t num_tiles = (n_size + kTile - 1) / kTile;
  const int64_t tile_bytes = k_size * kTile, tile_scales = num_groups * kTile;
#if defined(CPU_CAPABILITY_AVX512)
  if (has_vnni()) {
    constexpr int kTilesPerTask = 3;  // NR: 48 columns
    const int64_t num_tasks = (num_tiles + kTilesPerTask - 1) / kTilesPerTask;
    at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t tile = task * kTilesPerTask;
        const int64_t n0 = tile * kTile;
        const uint8_t* wt = w + tile * tile_bytes;
        const float* st = w_scale + tile * tile_scales;
        switch (std::min<int64_t>(kTilesPerTask, num_tiles - tile)) {
          case 3: tiles_vnni<3>(xq, num_rows, k_size, wt, st, bias, n0, y, n_size); break;
          case 2: tiles_vnni<2>(xq, num_rows, k_size, wt, st, bias, n0, y, n_size); break;
          default: tiles_vnni<1>(xq, num_rows, k_size, wt, st, bias, n0, y, n_size);
        }
      }
    });
    return;
  }
#endif
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kTile;
      for (int64_t m = 0; m < num_rows; ++m)
        tile_scalar(xq, m, k_size, w + tile * tile_bytes, w_scale + tile * tile_scales, bias, n0,
                    y + m * n_size);
    }
  });
}

at::Tensor w8a8_linear(const at::Tensor& input, const at::Tensor& packed,
                       const at::Tensor& packed_scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2, "input [rows, in] expected");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 4 &&
                  packed.size(2) == kTile && packed.size(3) == 4,
              "packed: contiguous uint8 [tiles, in / 4, 16, 4] expected (pack_w8a8)");
  const int64_t k_size = packed.size(1) * 4, num_tiles = packed.size(0);
  TORCH_CHECK(input.size(1) == k_size && k_size % small_batch::kGroup == 0,
              "input's width must be the weights' (a multiple of 32)");
  TORCH_CHECK(packed_scale.scalar_type() == at::kFloat && packed_scale.is_contiguous() &&
                  packed_scale.dim() == 3 && packed_scale.size(0) == num_tiles &&
                  packed_scale.size(1) == k_size / small_batch::kGroup &&
                  packed_scale.size(2) == kTile,
              "packed_scale: fp32 [tiles, in / 32, 16] expected");
  const int64_t out_features = num_tiles * kTile;
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == out_features &&
                                    bias->scalar_type() == input.scalar_type()),
              "bias [out] in the input's dtype expected");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({input.size(0), out_features}, input.options());
  small_batch::with_float_type(input.scalar_type(), "input", [&](auto type) {
    using T = decltype(type);
    const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    w8a8_gemm<T>(x.data_ptr<T>(), x.size(0), packed.data_ptr<uint8_t>(),
                 packed_scale.data_ptr<float>(), b, k_size, out_features, y.data_ptr<T>());
  });
  return y;
}

bool w8a8_has_vnni() {
#if defined(CPU_CAPABILITY_AVX512)
  return has_vnni();
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.def("w8a8_linear(Tensor input, Tensor packed, Tensor packed_scale, Tensor? bias) -> Tensor");
  m.def("w8a8_has_vnni() -> bool", &w8a8_has_vnni);
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("w8a8_linear", &w8a8_linear);
}
