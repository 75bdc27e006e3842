// Each row's index of its first largest value: the greedy sampler's choice. torch's argmax along
// the last dim of a [32, 49152] fp32 tensor (a 32-sequence step's logits) took 1.1 ms on a Zen 4
// machine, where its reduction over one whole row takes 0.05; here a vectorised max, then the
// first element equal to it. A row with NaNs gives some index in range, never one outside.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace {

at::Tensor argmax_rows(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kFloat && input.size(1) > 0,
              "fp32 [rows, n > 0] expected");
  const at::Tensor x = input.contiguous();
  const int64_t num_rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({num_rows}, x.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* index = out.data_ptr<int64_t>();
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = data + r * n;
      float best = row[0];
      for (int64_t i = 1; i < n; ++i) best = std::max(best, row[i]);
      index[r] = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (row[i] == best) {
          index[r] = i;
          break;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.def("argmax_rows(Tensor input) -> Tensor");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("argmax_rows", &argmax_rows);
}
