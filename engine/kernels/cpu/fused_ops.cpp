// The elementwise work between the matmuls, one pass each: residual add + RMSNorm, rotary
// embedding in place, SiLU-and-multiply. In eager torch each is 5-9 ops of a few microseconds,
// ~40 per layer: at a few rows that dispatching, not the arithmetic, is the time.
// Registered as torch ops (torch.ops.llm_cpu.*); the torch code they must agree with, rounding
// included, is engine/kernels/reference.py and engine/layers/rotary.py.
//
// Rounding: in bf16/fp16 eager torch rounds after every op; these kernels round at the same
// points (`round_to`), so a reduced-precision model gives the tokens the eager one gives.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

// fp32 -> T -> fp32: what storing an intermediate result in T does to it.
template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}
template <>
inline float round_to<float>(float x) {
  return x;
}

// Rows per parallel task: enough elements that a thread's start-up is paid for.
inline int64_t row_grain(int64_t row_size) { return std::max<int64_t>(1, 16384 / row_size); }

// out = weight * round(s * rsqrt(mean(s^2) + eps)), s = round(x + residual) stored to residual
// when a residual is given (its in-place update is the model's residual stream), else s = x.
template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, T* residual, int64_t residual_stride,
                   const T* weight, float eps, T* out, int64_t hidden, int64_t row_begin,
                   int64_t row_end) {
  // bf16 / fp16: the same roundings a vector at a time (at::vec's conversions round to nearest
  // even, as static_cast does): a scalar conversion per element made bf16 5x slower than fp32.
  using Vec = at::vec::Vectorized<T>;
  constexpr bool kVectorized = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
  const int64_t num_vectorized = kVectorized ? hidden / Vec::size() * Vec::size() : 0;
  std::vector<float> sum(hidden);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x_row = x + row * x_stride;
    T* r_row = residual != nullptr ? residual + row * residual_stride : nullptr;
    if constexpr (kVectorized) {
      for (int64_t i = 0; i < num_vectorized; i += Vec::size()) {
        Vec s = Vec::loadu(x_row + i);
        if (r_row != nullptr) {
          auto [x0, x1] = at::vec::convert_to_float<T>(s);
          auto [r0, r1] = at::vec::convert_to_float<T>(Vec::loadu(r_row + i));
          s = at::vec::convert_from_float<T>(x0 + r0, x1 + r1);
          s.store(r_row + i);
        }
        auto [s0, s1] = at::vec::convert_to_float<T>(s);
        s0.store(sum.data() + i);
        s1.store(sum.data() + i + Vec::size() / 2);
      }
    }
    for (int64_t i = num_vectorized; i < hidden; ++i) {
      if (r_row != nullptr) {
        const T s = static_cast<T>(static_cast<float>(x_row[i]) + static_cast<float>(r_row[i]));
        r_row[i] = s;
        sum[i] = static_cast<float>(s);
      } else {
        sum[i] = static_cast<float>(x_row[i]);
      }
    }
    float sum_squares = 0.f;
    for (int64_t i = 0; i < hidden; ++i) sum_squares += sum[i] * sum[i];
    const float inv_rms = 1.f / std::sqrt(sum_squares / static_cast<float>(hidden) + eps);
    T* out_row = out + row * hidden;
    if constexpr (kVectorized) {
      using FVec = at::vec::Vectorized<float>;
      const FVec scale(inv_rms);
      for (int64_t i = 0; i < num_vectorized; i += Vec::size()) {
        const Vec normed = at::vec::convert_from_float<T>(
            FVec::loadu(sum.data() + i) * scale, FVec::loadu(sum.data() + i + FVec::size()) * scale);
        auto [n0, n1] = at::vec::convert_to_float<T>(normed);
        auto [w0, w1] = at::vec::convert_to_float<T>(Vec::loadu(weight + i));
        at::vec::convert_from_float<T>(w0 * n0, w1 * n1).store(out_row + i);
      }
    }
    for (int64_t i = num_vectorized; i < hidden; ++i)
      out_row[i] = static_cast<T>(static_cast<float>(weight[i]) * round_to<T>(sum[i] * inv_rms));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                    const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x [num_tokens, hidden] with unit column stride");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight [hidden] expected");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x must share a dtype");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1 &&
                    residual->scalar_type() == x.scalar_type(),
                "residual must match x");
  }
  const int64_t num_rows = x.size(0), hidden = x.size(1);
  at::Tensor out = at::empty({num_rows, hidden}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    scalar_t* res = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    const int64_t res_stride = residual.has_value() ? residual->stride(0) : 0;
    at::parallel_for(0, num_rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
      rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), res, res_stride,
                              weight.data_ptr<scalar_t>(), static_cast<float>(eps),
                              out.data_ptr<scalar_t>(), hidden, begin, end);
    });
  });
  return out;
}

// Rotates the two halves of each head in place, as apply_rotary does: with c, s the token's
// cos and sin rounded to T, x1' = round(round(x1 c) - round(x2 s)), x2' = round(round(x2 c) +
// round(x1 s)).
template <typename T>
void rotate_heads(T* x, int64_t token_stride, int64_t head_stride, int64_t num_heads,
                  int64_t half, const float* cos, const float* sin, int64_t token) {
  const float* c = cos + token * half;
  const float* s = sin + token * half;
  for (int64_t h = 0; h < num_heads; ++h) {
    T* head = x + token * token_stride + h * head_stride;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(head[i]), x2 = static_cast<float>(head[i + half]);
      const float ci = round_to<T>(c[i]), si = round_to<T>(s[i]);
      head[i] = static_cast<T>(round_to<T>(x1 * ci) - round_to<T>(x2 * si));
      head[i + half] = static_cast<T>(round_to<T>(x2 * ci) + round_to<T>(x1 * si));
    }
  }
}

void check_heads(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              name, " [num_tokens, heads, head_dim] with packed heads expected");
}

void rotary_embedding(at::Tensor& query, at::Tensor& key, const at::Tensor& cos,
                      const at::Tensor& sin) {
  check_heads(query, "query");
  check_heads(key, "key");
  const int64_t num_tokens = query.size(0), head_dim = query.size(2), half = head_dim / 2;
  TORCH_CHECK(head_dim % 2 == 0 && key.size(0) == num_tokens && key.size(2) == head_dim &&
                  key.scalar_type() == query.scalar_type(),
              "query and key must share tokens, an even head size and a dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.numel() == num_tokens * half &&
                  sin.numel() == num_tokens * half,
              "cos and sin: contiguous fp32 [num_tokens, 1, head_dim / 2]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "rotary", [&] {
    const int64_t grain = row_grain(head_dim * (query.size(1) + key.size(1)));
    at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        rotate_heads(query.data_ptr<scalar_t>(), query.stride(0), head_dim, query.size(1), half,
                     cos.data_ptr<float>(), sin.data_ptr<float>(), t);
        rotate_heads(key.data_ptr<scalar_t>(), key.stride(0), head_dim, key.size(1), half,
                     cos.data_ptr<float>(), sin.data_ptr<float>(), t);
      }
    });
  });
}

// [num_tokens, 2 * n] -> [num_tokens, n]: round(round(silu(gate)) * up), gate the first half.
template <typename T>
void silu_and_mul_rows(const T* x, int64_t x_stride, T* out, int64_t n, int64_t row_begin,
                       int64_t row_end) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kWidth = Vec::size();
  std::vector<float> gate(n);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* g = x + row * x_stride;
    const T* u = g + n;
    for (int64_t i = 0; i < n; ++i) gate[i] = static_cast<float>(g[i]);
    int64_t i = 0;
    for (; i + kWidth <= n; i += kWidth) {  // the exp through ATen's vectorised one, as F.silu
      const Vec v = Vec::loadu(gate.data() + i);
      (v / (Vec(1.f) + v.neg().exp())).store(gate.data() + i);
    }
    for (; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i]));
    T* out_row = out + row * n;
    for (int64_t j = 0; j < n; ++j)
      out_row[j] = static_cast<T>(round_to<T>(gate[j]) * static_cast<float>(u[j]));
  }
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.stride(1) == 1,
              "x [num_tokens, 2 * n] with unit column stride expected");
  const int64_t num_rows = x.size(0), n = x.size(1) / 2;
  at::Tensor out = at::empty({num_rows, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_mul", [&] {
    at::parallel_for(0, num_rows, row_grain(2 * n), [&](int64_t begin, int64_t end) {
      silu_and_mul_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), out.data_ptr<scalar_t>(),
                                  n, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor(a!)? residual, Tensor weight, float eps) -> Tensor");
  m.def("rotary_embedding(Tensor(a!) query, Tensor(b!) key, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("silu_and_mul", &silu_and_mul);
}
