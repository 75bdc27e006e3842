// y = x W^T (+ b) with 4-bit weights and int8 activations (`--quantization w4a8`), any number of
// rows: llama.cpp's Q4_1 x Q8_1 arithmetic. W's rows are in groups of 32 weights, each a 4-bit q
// in 0..15 with the group's step d and minimum m (fp16, as Q4_1 stores them): w = m + d q. x is
// rounded to int8 per group of 32 as it enters (int8_rows.h), x ~ s qx. A group's share of a
// row's sum is then  s (d dot(q, qx) + m sum(qx)),  its dot an exact int32: half w8a8's weight
// bytes, the step's cost at one user, for the same integer arithmetic.
//
// `vpdpbusd` multiplies unsigned by signed bytes: the q are unsigned already, no offset to take
// off. Weights packed by engine/layers/quantization.py's `pack_w4a8`: tiles of 16 output columns,
// [tiles, K / 32, 4, 16, 4] uint8: the i-th 64 bytes of a group hold, for each column, 4 weights
// k = 4i.. in their low nibbles and k = 16 + 4i.. in their high ones, so one load and two masks
// give two VNNI operands. Steps and minimums as fp16 [tiles, K / 32, 2, 16]. With AVX2 (no VNNI),
// `vpmaddubsw` gives the q x qx products summed in int16 pairs: at most 2 x 15 x 127 each, so a
// group's 8 of them add up in int16 exactly (<= 30,480) before one `vpmaddwd` sums them into
// int32 fours: the same dots and the same fp32 sums as VNNI's. Without either, the same integers
// and the same order of fp32 sums, one at a time: correct, not fast.

#include "int8_rows.h"

#include <utility>

namespace {

using int8_rows::kTile;
using int8_rows::QuantizedRows;
constexpr int kLoads = 4;  // 64-byte loads in a tile's group: 16 columns x 32 nibbles
constexpr int64_t kGroupBytes = kLoads * 64;

// Weight k of column c in a packed group (`pack_w4a8`'s layout).
inline int nibble(const uint8_t* group, int c, int k) {
  const uint8_t byte = group[((k % 16) / 4 * kTile + c) * 4 + k % 4];
  return k < 16 ? byte & 15 : byte >> 4;
}

// Row m's x bytes at k = 4i.. and at k = 16 + 4i.. of group g, as two int32: what the i-th load
// of a packed group's low and high nibbles multiplies.
inline std::pair<int32_t, int32_t> x_quads(const QuantizedRows& x, int64_t m, int64_t k_size,
                                           int64_t g, int i) {
  const int8_t* xg = x.q.data() + m * k_size + g * small_batch::kGroup;
  int32_t first, second;
  std::memcpy(&first, xg + 4 * i, 4);
  std::memcpy(&second, xg + 16 + 4 * i, 4);
  return {first, second};
}

// One tile of 16 columns for one row, an int at a time (CPUs without VNNI).
template <typename T>
void tile_scalar(const QuantizedRows& x, int64_t m, int64_t k_size, const uint8_t* w,
                 const c10::Half* w_scale, const T* bias, int64_t n0, T* out) {
  const int64_t num_groups = k_size / small_batch::kGroup;
  float sums[kTile] = {};
  for (int64_t g = 0; g < num_groups; ++g) {
    const int8_t* xg = x.q.data() + m * k_size + g * small_batch::kGroup;
    const float xs = x.scale[m * num_groups + g];
    const float x_sum = x.scaled_sum[m * num_groups + g];
    const uint8_t* wg = w + g * kGroupBytes;
    for (int c = 0; c < kTile; ++c) {
      int32_t dot = 0;
      for (int k = 0; k < small_batch::kGroup; ++k) dot += nibble(wg, c, k) * xg[k];
      const float step = w_scale[(g * 2) * kTile + c], minimum = w_scale[(g * 2 + 1) * kTile + c];
      sums[c] += static_cast<float>(dot) * (step * xs);
      sums[c] += minimum * x_sum;
    }
  }
  for (int c = 0; c < kTile; ++c)
    out[n0 + c] = static_cast<T>(sums[c] + (bias ? static_cast<float>(bias[n0 + c]) : 0.f));
}

#if defined(CPU_CAPABILITY_AVX512)
// MR rows of x against NR tiles of 16 columns: MR x NR int32 dots per group and MR x NR fp32
// totals in registers (4 x 2: 16 zmm, the unpacked nibbles beside them); each load serves MR rows.
template <int MR, int NR, typename T>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni(
    const QuantizedRows& x, int64_t m0, int64_t k_size, const uint8_t* w,
    const c10::Half* w_scale, const T* bias, int64_t n0, T* out, int64_t out_stride) {
  const int64_t num_groups = k_size / small_batch::kGroup;
  const int64_t tile_bytes = num_groups * kGroupBytes, tile_scales = num_groups * 2 * kTile;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0f);
  __m512 total[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) total[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < num_groups; ++g) {
    __m512i dot[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) dot[m][j] = _mm512_setzero_si512();
    const uint8_t* wg = w + g * kGroupBytes;
#pragma GCC unroll 4
    for (int i = 0; i < kLoads; ++i) {
      __m512i low[NR], high[NR];
      for (int j = 0; j < NR; ++j) {
        const __m512i packed = _mm512_loadu_si512(wg + j * tile_bytes + i * 64);
        low[j] = _mm512_and_si512(packed, low_nibbles);
        high[j] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
      }
      for (int m = 0; m < MR; ++m) {
        const auto [first, second] = x_quads(x, m0 + m, k_size, g, i);
        const __m512i x_low = _mm512_set1_epi32(first), x_high = _mm512_set1_epi32(second);
        for (int j = 0; j < NR; ++j) {
          dot[m][j] = _mm512_dpbusd_epi32(dot[m][j], low[j], x_low);
          dot[m][j] = _mm512_dpbusd_epi32(dot[m][j], high[j], x_high);
        }
      }
    }
    __m512 step[NR], minimum[NR];
    for (int j = 0; j < NR; ++j) {
      const c10::Half* s = w_scale + j * tile_scales + g * 2 * kTile;
      step[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
      minimum[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + kTile)));
    }
    for (int m = 0; m < MR; ++m) {
      const int64_t row_group = (m0 + m) * num_groups + g;
      const float xs = x.scale[row_group];
      const __m512 x_scale = _mm512_set1_ps(xs);
      const __m512 x_sum = _mm512_set1_ps(x.scaled_sum[row_group]);
      for (int j = 0; j < NR; ++j) {
        total[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][j]),
                                      _mm512_mul_ps(step[j], x_scale), total[m][j]);
        total[m][j] = _mm512_fmadd_ps(minimum[j], x_sum, total[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NR; ++j) {
      const int64_t first = n0 + j * kTile;
      int8_rows::store16(total[m][j], bias ? bias + first : nullptr,
                         out + (m0 + m) * out_stride + first);
    }
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// MR rows of x against one tile of 16 columns (AVX2), both halves of 8 columns in one pass: MR x 2
// int16 sums of pairs in registers beside the weights, each broadcast of x serving two products;
// the fp32 totals, touched once a group, in L1 (in registers they left too few for the pairs).
template <int MR, typename T>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const QuantizedRows& x, int64_t m0,
                                                        int64_t k_size, const uint8_t* w,
                                                        const c10::Half* w_scale, const T* bias,
                                                        int64_t n0, T* out, int64_t out_stride) {
  const int64_t num_groups = k_size / small_batch::kGroup;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
  alignas(32) float sums[MR][kTile] = {};
  for (int64_t g = 0; g < num_groups; ++g) {
    __m256i pairs[MR][2];
    const uint8_t* wg = w + g * kGroupBytes;
#pragma GCC unroll 4
    for (int i = 0; i < kLoads; ++i) {
      __m256i low[2], high[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i packed =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + i * 64 + h * 32));
        low[h] = _mm256_and_si256(packed, low_nibbles);
        high[h] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);
      }
      for (int m = 0; m < MR; ++m) {
        const auto [first, second] = x_quads(x, m0 + m, k_size, g, i);
        const __m256i x_low = _mm256_set1_epi32(first), x_high = _mm256_set1_epi32(second);
        for (int h = 0; h < 2; ++h) {
          const __m256i both = _mm256_add_epi16(_mm256_maddubs_epi16(low[h], x_low),
                                                _mm256_maddubs_epi16(high[h], x_high));
          pairs[m][h] = i == 0 ? both : _mm256_add_epi16(pairs[m][h], both);
          int8_rows::keep_in_register(pairs[m][h]);
        }
      }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; ++h) {
      const c10::Half* s = w_scale + g * 2 * kTile + 8 * h;
      const __m256 step = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
      const __m256 minimum =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + kTile)));
      for (int m = 0; m < MR; ++m) {
        const int64_t row_group = (m0 + m) * num_groups + g;
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[m][h], ones));
        const __m256 xs = _mm256_broadcast_ss(&x.scale[row_group]);
        __m256 total = _mm256_load_ps(sums[m] + 8 * h);
        total = _mm256_fmadd_ps(dot, _mm256_mul_ps(step, xs), total);
        total = _mm256_fmadd_ps(minimum, _mm256_broadcast_ss(&x.scaled_sum[row_group]), total);
        _mm256_store_ps(sums[m] + 8 * h, total);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    int8_rows::store16(sums[m], bias ? bias + n0 : nullptr, out + (m0 + m) * out_stride + n0);
}
#endif

template <typename T>
void w4a8_gemm(const T* x, int64_t num_rows, const uint8_t* w, const c10::Half* w_scale,
               const T* bias, int64_t k_size, int64_t n_size, T* y) {
  const QuantizedRows xq = int8_rows::quantize_rows(x, num_rows, k_size);
  const int64_t num_groups = k_size / small_batch::kGroup;
  const int64_t num_tiles = n_size / kTile;
  const int64_t tile_bytes = num_groups * kGroupBytes, tile_scales = num_groups * 2 * kTile;
#if defined(CPU_CAPABILITY_AVX512)
  if (int8_rows::has_vnni()) {
    // 4 rows x 2 tiles (32 columns): 16 zmm of sums, 8 of dots, 4 of unpacked weights
    int8_rows::parallel_blocks<2>(num_rows, num_tiles, [&](auto rows, auto tiles, int64_t m0,
                                                          int64_t tile) {
      tile_vnni<rows(), tiles()>(xq, m0, k_size, w + tile * tile_bytes,
                                 w_scale + tile * tile_scales, bias, tile * kTile, y, n_size);
    });
    return;
  }
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (int8_rows::chosen_path() == int8_rows::Path::kAvx2) {
    int8_rows::parallel_blocks<1>(num_rows, num_tiles, [&](auto rows, auto, int64_t m0,
                                                          int64_t tile) {
      tile_avx2<rows()>(xq, m0, k_size, w + tile * tile_bytes, w_scale + tile * tile_scales, bias,
                        tile * kTile, y, n_size);
    });
    return;
  }
#endif
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      for (int64_t m = 0; m < num_rows; ++m)
        tile_scalar(xq, m, k_size, w + tile * tile_bytes, w_scale + tile * tile_scales, bias,
                    tile * kTile, y + m * n_size);
    }
  });
}

at::Tensor w4a8_linear(const at::Tensor& input, const at::Tensor& packed,
                       const at::Tensor& packed_scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2, "input [rows, in] expected");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 5 &&
                  packed.size(2) == kLoads && packed.size(3) == kTile && packed.size(4) == 4,
              "packed: contiguous uint8 [tiles, in / 32, 4, 16, 4] expected (pack_w4a8)");
  const int64_t num_tiles = packed.size(0), num_groups = packed.size(1);
  const int64_t k_size = num_groups * small_batch::kGroup;
  TORCH_CHECK(input.size(1) == k_size, "input's width must be the weights'");
  TORCH_CHECK(packed_scale.scalar_type() == at::kHalf && packed_scale.is_contiguous() &&
                  packed_scale.dim() == 4 && packed_scale.size(0) == num_tiles &&
                  packed_scale.size(1) == num_groups && packed_scale.size(2) == 2 &&
                  packed_scale.size(3) == kTile,
              "packed_scale: fp16 [tiles, in / 32, 2, 16] expected (pack_w4a8)");
  const int64_t out_features = num_tiles * kTile;
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == out_features &&
                                    bias->scalar_type() == input.scalar_type()),
              "bias [out] in the input's dtype expected");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty({input.size(0), out_features}, input.options());
  small_batch::with_float_type(input.scalar_type(), "input", [&](auto type) {
    using T = decltype(type);
    const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    w4a8_gemm<T>(x.data_ptr<T>(), x.size(0), packed.data_ptr<uint8_t>(),
                 packed_scale.data_ptr<c10::Half>(), b, k_size, out_features, y.data_ptr<T>());
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.def("w4a8_linear(Tensor input, Tensor packed, Tensor packed_scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("w4a8_linear", &w4a8_linear);
}
