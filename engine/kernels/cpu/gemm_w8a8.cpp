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
// Weights packed by engine/layers/quantization.py's `pack_w8a8`: tiles of 16 output columns,
// [tiles, K / 4, 16, 4] uint8, so one 64-byte load holds 4 consecutive k of 16 columns, and the
// scales as [tiles, K / 32, 16]. With AVX2 (no VNNI), `vpmaddubsw` multiplies unsigned by
// signed bytes into int16 pairs and `vpmaddwd` sums those into int32 fours, VNNI's sums in two
// steps; a pair of (w + 128) x could pass int16's range, so it multiplies |w| by x with w's sign
// (llama.cpp's trick): each pair at most 2 x 127 x 127. The same int32 dots, the same fp32 sums.
// Without either, the same integers and the same order of sums one at a time: correct, slow.

#include "int8_rows.h"

namespace {

using int8_rows::kTile;
using int8_rows::QuantizedRows;
constexpr int kQuads = small_batch::kGroup / 4;  // 4-byte steps in a group

// One tile of 16 columns for one row, an int at a time (CPUs without VNNI).
template <typename T>
void tile_scalar(const QuantizedRows& x, int64_t m, int64_t k_size, const uint8_t* w,
                 const float* w_scale, const T* bias, int64_t n0, T* out) {
  const int64_t num_groups = k_size / small_batch::kGroup;
  float sums[kTile] = {};
  for (int64_t g = 0; g < num_groups; ++g) {
    const int8_t* xg = x.q.data() + m * k_size + g * small_batch::kGroup;
    for (int c = 0; c < kTile; ++c) {
      int32_t dot = -128 * x.sum[m * num_groups + g];
      for (int k = 0; k < small_batch::kGroup; ++k)
        dot += static_cast<int32_t>(w[((g * kQuads + k / 4) * kTile + c) * 4 + k % 4]) * xg[k];
      sums[c] += static_cast<float>(dot) * (w_scale[g * kTile + c] * x.scale[m * num_groups + g]);
    }
  }
  for (int c = 0; c < kTile; ++c)
    out[n0 + c] = static_cast<T>(sums[c] + (bias ? static_cast<float>(bias[n0 + c]) : 0.f));
}

#if defined(CPU_CAPABILITY_AVX512)
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
      const __m512i start = _mm512_set1_epi32(-128 * x.sum[(m0 + m) * num_groups + g]);
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
      int8_rows::store16(total[m][j], bias ? bias + first : nullptr,
                         out + (m0 + m) * out_stride + first);
    }
  }
}

#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// MR rows of x against one tile of 16 columns (AVX2), both halves of 8 columns in one pass: MR x 2
// int32 dots in registers beside the weights, each broadcast of x serving two products; the fp32
// totals, touched once a group, in L1 (in registers they left too few for the dots).
template <int MR, typename T>
__attribute__((target("avx2,fma"))) void tile_avx2(const QuantizedRows& x, int64_t m0,
                                                   int64_t k_size, const uint8_t* w,
                                                   const float* w_scale, const T* bias, int64_t n0,
                                                   T* out, int64_t out_stride) {
  const int64_t num_groups = k_size / small_batch::kGroup;
  const __m256i ones = _mm256_set1_epi16(1), offset = _mm256_set1_epi8(static_cast<char>(0x80));
  alignas(32) float sums[MR][kTile] = {};
  for (int64_t g = 0; g < num_groups; ++g) {
    __m256i dot[MR][2];
    for (int m = 0; m < MR; ++m)
      for (int h = 0; h < 2; ++h) dot[m][h] = _mm256_setzero_si256();
    const uint8_t* wg = w + g * small_batch::kGroup * kTile;
#pragma GCC unroll 8
    for (int quad = 0; quad < kQuads; ++quad) {
      __m256i signed_w[2], magnitude[2];
      for (int h = 0; h < 2; ++h) {  // w = stored - 128, in int8
        signed_w[h] = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + quad * 64 + h * 32)),
            offset);
        magnitude[h] = _mm256_abs_epi8(signed_w[h]);
      }
      for (int m = 0; m < MR; ++m) {
        int32_t four;  // x's 4 bytes at this step, broadcast to every column
        std::memcpy(&four, x.q.data() + (m0 + m) * k_size + g * small_batch::kGroup + quad * 4,
                    4);
        const __m256i xv = _mm256_set1_epi32(four);
        for (int h = 0; h < 2; ++h) {
          const __m256i signed_x = _mm256_sign_epi8(xv, signed_w[h]);
          dot[m][h] = _mm256_add_epi32(
              dot[m][h], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude[h], signed_x), ones));
          int8_rows::keep_in_register(dot[m][h]);
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 sv = _mm256_loadu_ps(w_scale + g * kTile + 8 * h);
      for (int m = 0; m < MR; ++m) {
        const __m256 xs = _mm256_set1_ps(x.scale[(m0 + m) * num_groups + g]);
        const __m256 total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m][h]),
                                             _mm256_mul_ps(sv, xs), _mm256_load_ps(sums[m] + 8 * h));
        _mm256_store_ps(sums[m] + 8 * h, total);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    int8_rows::store16(sums[m], bias ? bias + n0 : nullptr, out + (m0 + m) * out_stride + n0);
}
#endif

template <typename T>
void w8a8_gemm(const T* x, int64_t num_rows, const uint8_t* w, const float* w_scale, const T* bias,
               int64_t k_size, int64_t n_size, T* y) {
  const QuantizedRows xq = int8_rows::quantize_rows(x, num_rows, k_size);
  const int64_t num_groups = k_size / small_batch::kGroup;
  const int64_t num_tiles = (n_size + kTile - 1) / kTile;
  const int64_t tile_bytes = k_size * kTile, tile_scales = num_groups * kTile;
#if defined(CPU_CAPABILITY_AVX512)
  if (int8_rows::has_vnni()) {
    // 4 rows x 3 tiles (48 columns): 24 of the 32 zmm hold sums
    int8_rows::parallel_blocks<3>(num_rows, num_tiles, [&](auto rows, auto tiles, int64_t m0,
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

// fp32 [rows, 2]: each row's norm ||x|| and that of what rounding it to int8 (as `w8a8_linear`
// rounds it) drops, ||x - q * scale||, the sums in fp64: what bounds the greedy head's int8 pass
// (engine/layers/greedy_head.py).
at::Tensor int8_rounding_norms(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kFloat &&
                  input.size(1) % small_batch::kGroup == 0,
              "fp32 input [rows, in] in groups of 32 expected");
  const at::Tensor x = input.contiguous();
  const int64_t num_rows = x.size(0), k_size = x.size(1);
  const float* xp = x.data_ptr<float>();
  const int8_rows::QuantizedRows rows = int8_rows::quantize_rows(xp, num_rows, k_size);
  at::Tensor norms = at::empty({num_rows, 2}, x.options());
  float* out = norms.data_ptr<float>();
  for (int64_t m = 0; m < num_rows; ++m) {
    double squares = 0.0, error_squares = 0.0;
    for (int64_t k = m * k_size; k < (m + 1) * k_size; ++k) {
      const double error = static_cast<double>(xp[k]) -
                           static_cast<double>(rows.q[k]) * rows.scale[k / small_batch::kGroup];
      squares += static_cast<double>(xp[k]) * xp[k];
      error_squares += error * error;
    }
    out[2 * m] = static_cast<float>(std::sqrt(squares));
    out[2 * m + 1] = static_cast<float>(std::sqrt(error_squares));
  }
  return norms;
}

// The int8-activation kernels' path ("vnni", "avx2" or "scalar"); `use` another one (tests: the
// paths against each other on one machine), if this CPU and build have it.
std::string int8_activation_path(const c10::optional<std::string>& use) {
  using int8_rows::Path;
  static const Path best = int8_rows::chosen_path();
  if (use.has_value()) {
    const std::string& name = *use;
    const Path wanted = name == "vnni" ? Path::kVnni : name == "avx2" ? Path::kAvx2 : Path::kScalar;
    TORCH_CHECK(name == "vnni" || name == "avx2" || name == "scalar",
                "path: vnni, avx2 or scalar expected, got ", name);
    TORCH_CHECK(wanted <= best, "this CPU or build has no ", name, " path");
    int8_rows::chosen_path() = wanted;
  }
  const Path path = int8_rows::chosen_path();
  return path == Path::kVnni ? "vnni" : path == Path::kAvx2 ? "avx2" : "scalar";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.def("w8a8_linear(Tensor input, Tensor packed, Tensor packed_scale, Tensor? bias) -> Tensor");
  m.def("int8_activation_path(str? use=None) -> str", &int8_activation_path);
  m.def("int8_rounding_norms(Tensor input) -> Tensor");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("int8_rounding_norms", &int8_rounding_norms);
}
