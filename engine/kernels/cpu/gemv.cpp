// y = x W^T (+ b) for a few rows of x: the decode step's linear layers at small batch, where the
// time is reading W. Each weight row is streamed once from memory and dotted with every row of x
// (held in L1), the way llama.cpp's GEMV reads its weights; oneDNN keeps the larger batches.
// Registered as torch.ops.llm_cpu.small_batch_linear; engine/kernels/cpu_ops.py builds it.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kMaxRows = 4;  // rows of x per call: above it oneDNN's packed GEMM wins
constexpr int64_t kWeightRowsPerTask = 16;

// 2 x Vec::size() consecutive weights as floats.
inline void load_floats(const float* p, Vec& lo, Vec& hi) {
  lo = Vec::loadu(p);
  hi = Vec::loadu(p + Vec::size());
}
template <typename T>
inline void load_floats(const T* p, Vec& lo, Vec& hi) {
  std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
}

// M rows of x (fp32, [M, K]) against weight rows [n_begin, n_end): each weight row is read once.
// (Interleaving several weight rows measured slower: more streams for the prefetcher.)
template <typename W, int M>
void gemv_rows(const float* x, const W* weight, int64_t k_size, int64_t n_begin, int64_t n_end,
               float* out, int64_t out_stride) {
  constexpr int64_t kStep = 2 * Vec::size();
  const int64_t k_main = k_size / kStep * kStep;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* w = weight + n * k_size;
    Vec acc[M];
    for (int m = 0; m < M; ++m) acc[m] = Vec(0.f);
    for (int64_t k = 0; k < k_main; k += kStep) {
      Vec w_lo, w_hi;
      load_floats(w + k, w_lo, w_hi);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * k_size + k;
        acc[m] = at::vec::fmadd(Vec::loadu(xm + Vec::size()), w_hi,
                                at::vec::fmadd(Vec::loadu(xm), w_lo, acc[m]));
      }
    }
    for (int m = 0; m < M; ++m) {
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[m]);
      for (int64_t k = k_main; k < k_size; ++k) sum += x[m * k_size + k] * static_cast<float>(w[k]);
      out[m * out_stride + n] = sum;
    }
  }
}

template <typename W, int M>
void gemv(const float* x, const W* weight, int64_t k_size, int64_t n_size, float* out) {
  const int64_t num_tasks = (n_size + kWeightRowsPerTask - 1) / kWeightRowsPerTask;
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    gemv_rows<W, M>(x, weight, k_size, begin * kWeightRowsPerTask,
                    std::min(end * kWeightRowsPerTask, n_size), out, n_size);
  });
}

template <typename W>
void gemv_dispatch(int64_t m, const float* x, const W* weight, int64_t k_size, int64_t n_size,
                   float* out) {
  switch (m) {
    case 1: gemv<W, 1>(x, weight, k_size, n_size, out); break;
    case 2: gemv<W, 2>(x, weight, k_size, n_size, out); break;
    case 3: gemv<W, 3>(x, weight, k_size, n_size, out); break;
    case 4: gemv<W, 4>(x, weight, k_size, n_size, out); break;
    default: break;  // no rows
  }
}

at::Tensor small_batch_linear(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "input [rows, in] and weight [out, in] expected");
  TORCH_CHECK(input.size(0) <= kMaxRows, "at most ", kMaxRows, " rows");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  const int64_t m = input.size(0), k_size = input.size(1), n_size = weight.size(0);
  const at::Tensor x = input.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({m, n_size}, input.options().dtype(at::kFloat));
  float* y = out.data_ptr<float>();
  const float* x_data = x.data_ptr<float>();
  switch (weight.scalar_type()) {
    case at::kFloat: gemv_dispatch(m, x_data, weight.data_ptr<float>(), k_size, n_size, y); break;
    case at::kBFloat16:
      gemv_dispatch(m, x_data, weight.data_ptr<c10::BFloat16>(), k_size, n_size, y);
      break;
    case at::kHalf: gemv_dispatch(m, x_data, weight.data_ptr<c10::Half>(), k_size, n_size, y); break;
    default: TORCH_CHECK(false, "weights in float32, bfloat16 or float16 expected");
  }
  if (bias.has_value()) out.add_(*bias);
  return out.to(input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.def("small_batch_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) { m.impl("small_batch_linear", &small_batch_linear); }
