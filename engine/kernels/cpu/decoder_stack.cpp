// Every decoder layer of a Llama-family model for one decode step of a few sequences, in one call.
//
// There the step streams the weights through the small-batch kernels, and the ~30 Python-level
// calls each layer made around them (module calls, views, the ops) were a third of the step. This
// holds each layer's tensors once (`add_layer`) and runs the same kernels in the same order from
// C++, through the dispatcher: the results are those of the Python layers, bit for bit. It has no
// kernel of its own; the final norm and the logits stay in Python (engine/models/llama.py).

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace {

using OptionalTensor = std::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A linear layer as the small-batch kernels take it: plain, or int8, int4, w8a8 or w4a8 with
// scales per group, or fp32 weights stored exactly as 4-bit values.
struct Linear {
  at::Tensor weight;
  OptionalTensor scale;
  OptionalTensor bias;

  at::Tensor operator()(const at::Tensor& x) const {
    static const auto plain =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&)>(
            "llm_cpu::small_batch_linear");
    static const auto int8 = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const OptionalTensor&)>("llm_cpu::int8_small_batch_linear");
    static const auto int4 = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const OptionalTensor&)>("llm_cpu::int4_small_batch_linear");
    static const auto w8a8 = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const OptionalTensor&)>("llm_cpu::w8a8_linear");
    static const auto w4a8 = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const OptionalTensor&)>("llm_cpu::w4a8_linear");
    static const auto int4_fp32 = op<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const OptionalTensor&)>(
        "llm_cpu::int4_fp32_linear");
    if (!scale.has_value()) return plain.call(x, weight, bias);
    // fp32 weights kept exactly as 4-bit values (engine/layers/lossless.py): nibbles 3-D
    if (weight.dim() == 3 && weight.scalar_type() == at::kByte)
      return int4_fp32.call(x, weight, *scale, bias);
    // w8a8: packed in tiles, 4-D; w4a8: 5-D; int4: two weights a byte (uint8), its scale the
    // steps and minimums; int8: one scale
    if (weight.dim() == 4) return w8a8.call(x, weight, *scale, bias);
    if (weight.dim() == 5) return w4a8.call(x, weight, *scale, bias);
    return weight.scalar_type() == at::kByte ? int4.call(x, weight, *scale, bias)
                                             : int8.call(x, weight, *scale, bias);
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;
  Linear qkv, o, gate_up, down;
  at::Tensor k_cache, v_cache;
};

class DecoderStack : public torch::CustomClassHolder {
 public:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
               double attention_scale)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps),
        attention_scale_(attention_scale) {}

  void add_layer(at::Tensor input_norm, at::Tensor qkv_weight, OptionalTensor qkv_scale,
                 OptionalTensor qkv_bias, at::Tensor o_weight, OptionalTensor o_scale,
                 OptionalTensor o_bias, at::Tensor post_norm, at::Tensor gate_up_weight,
                 OptionalTensor gate_up_scale, at::Tensor down_weight, OptionalTensor down_scale,
                 at::Tensor k_cache, at::Tensor v_cache) {
    layers_.push_back(Layer{input_norm, post_norm,
                            Linear{qkv_weight, qkv_scale, qkv_bias},
                            Linear{o_weight, o_scale, o_bias},
                            Linear{gate_up_weight, gate_up_scale, std::nullopt},
                            Linear{down_weight, down_scale, std::nullopt}, k_cache, v_cache});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // residual: [rows, hidden], the embedded tokens; each layer's first norm adds the last
  // layer's output into it, in place. Returns the last layer's output (before the final norm).
  at::Tensor forward(at::Tensor residual, at::Tensor cos, at::Tensor sin, at::Tensor slot_mapping,
                     at::Tensor block_tables, at::Tensor context_lens) {
    static const auto rms_norm =
        op<at::Tensor(const at::Tensor&, const OptionalTensor&, const at::Tensor&, double)>(
            "llm_cpu::rms_norm");
    static const auto rotary =
        op<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&)>(
            "llm_cpu::rotary_embedding");
    static const auto store_kv = op<void(const at::Tensor&, const at::Tensor&, at::Tensor&,
                                         at::Tensor&, const at::Tensor&)>("llm_cpu::store_kv");
    static const auto attend =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, double)>("llm_cpu::paged_decode_attention");
    static const auto silu_and_mul = op<at::Tensor(const at::Tensor&)>("llm_cpu::silu_and_mul");
    TORCH_CHECK(residual.dim() == 2 && residual.is_contiguous(), "residual [rows, hidden]");
    const int64_t rows = residual.size(0);
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    at::Tensor x;  // the last layer's output; none before the first layer
    for (Layer& layer : layers_) {
      const at::Tensor h = x.defined() ? rms_norm.call(x, residual, layer.input_norm, eps_)
                                       : rms_norm.call(residual, std::nullopt, layer.input_norm, eps_);
      const at::Tensor qkv = layer.qkv(h);  // [rows, q_size + 2 kv_size]
      at::Tensor q = qkv.narrow(1, 0, q_size).view({rows, num_heads_, head_dim_});
      at::Tensor k = qkv.narrow(1, q_size, kv_size).view({rows, num_kv_heads_, head_dim_});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size)
                               .view({rows, num_kv_heads_, head_dim_});
      rotary.call(q, k, cos, sin);
      store_kv.call(k, v, layer.k_cache, layer.v_cache, slot_mapping);
      const at::Tensor attention = attend.call(q, layer.k_cache, layer.v_cache, block_tables,
                                               context_lens, attention_scale_);
      x = layer.o(attention.reshape({rows, q_size}));
      const at::Tensor h2 = rms_norm.call(x, residual, layer.post_norm, eps_);
      x = layer.down(silu_and_mul.call(layer.gate_up(h2)));
    }
    return x;
  }

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, attention_scale_;
  std::vector<Layer> layers_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_cpu, m) {
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &DecoderStack::add_layer)
      .def("num_layers", &DecoderStack::num_layers)
      .def("forward", &DecoderStack::forward);
}
