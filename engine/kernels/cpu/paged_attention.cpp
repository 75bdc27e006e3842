// Paged attention for the CPU: the KV blocks are read in place (no gathered copy of the context),
// one task per (sequence, KV head) so every block is read once for the query heads sharing it.
// Registered as torch ops (torch.ops.llm_cpu.*); engine/kernels/cpu_ops.py builds and loads this
// file and engine/kernels/reference.py holds the torch code it must agree with.
//
// Shapes: a KV cache is [num_blocks, block_size, num_kv_heads, head_dim], contiguous; a block
// table [num_seqs, max_blocks] of int32 block ids padded with -1; slot -1 is never written.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxGroup = 64;  // query heads per KV head (multi-query attention included)

// Softmax(q . k * scale) . v for the `group` query heads sharing one KV head. The context is
// walked block by block (no division per token), each key and value read once for all the heads.
// D > 0 is the head size known at compile time (loops unroll, accumulators stay in registers);
// D == 0 takes it from head_dim. `logits` holds group x context_len floats.
template <typename T, int D>
void attend_group(const T* query, const T* k_base, const T* v_base, const int* block_table,
                  int context_len, int block_size, int64_t token_stride, int head_dim, int group,
                  float scale, float* logits, T* out) {
  const int dim = D > 0 ? D : head_dim;
  float q[kMaxGroup][kMaxHeadDim];
  for (int g = 0; g < group; ++g)
    for (int d = 0; d < dim; ++d) q[g][d] = static_cast<float>(query[g * dim + d]) * scale;
  const int num_blocks = (context_len + block_size - 1) / block_size;
  for (int b = 0; b < num_blocks; ++b) {
    const T* block = k_base + static_cast<int64_t>(block_table[b]) * block_size * token_stride;
    const int first = b * block_size, count = std::min(block_size, context_len - first);
    for (int i = 0; i < count; ++i) {
      const T* k = block + i * token_stride;
      for (int g = 0; g < group; ++g) {
        float dot = 0.f;
        for (int d = 0; d < dim; ++d) dot += q[g][d] * static_cast<float>(k[d]);
        logits[g * context_len + first + i] = dot;
      }
    }
  }
  float inv_sum[kMaxGroup];
  for (int g = 0; g < group; ++g) {
    float* row = logits + g * context_len;
    float max_logit = -INFINITY;
    for (int t = 0; t < context_len; ++t) max_logit = std::max(max_logit, row[t]);
    float sum = 0.f;
    for (int t = 0; t < context_len; ++t) {
      row[t] = std::exp(row[t] - max_logit);
      sum += row[t];
    }
    inv_sum[g] = 1.f / sum;
  }
  float acc[kMaxGroup][kMaxHeadDim];  // 64 KiB on the stack: only group x dim of it is used
  for (int g = 0; g < group; ++g) std::fill(acc[g], acc[g] + dim, 0.f);
  for (int b = 0; b < num_blocks; ++b) {
    const T* block = v_base + static_cast<int64_t>(block_table[b]) * block_size * token_stride;
    const int first = b * block_size, count = std::min(block_size, context_len - first);
    for (int i = 0; i < count; ++i) {
      const T* v = block + i * token_stride;
      for (int g = 0; g < group; ++g) {
        const float p = logits[g * context_len + first + i];
        for (int d = 0; d < dim; ++d) acc[g][d] += p * static_cast<float>(v[d]);
      }
    }
  }
  for (int g = 0; g < group; ++g)
    for (int d = 0; d < dim; ++d) out[g * dim + d] = static_cast<T>(acc[g][d] * inv_sum[g]);
}

template <typename T, int D>
void decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens, float scale,
                      at::Tensor& out) {
  const int num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t token_stride = static_cast<int64_t>(num_kv_heads) * head_dim;
  const T* q = query.data_ptr<T>();
  const T* k = k_cache.data_ptr<T>();
  const T* v = v_cache.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int* tables = block_tables.data_ptr<int>();
  const int* lens = context_lens.data_ptr<int>();
  at::parallel_for(0, static_cast<int64_t>(num_seqs) * num_kv_heads, 1,
                   [&](int64_t begin, int64_t end) {
    std::vector<float> logits;
    for (int64_t task = begin; task < end; ++task) {
      const int seq = task / num_kv_heads, kv_head = task % num_kv_heads;
      logits.resize(static_cast<size_t>(group) * lens[seq]);
      const int64_t offset = (static_cast<int64_t>(seq) * num_heads + kv_head * group) * head_dim;
      attend_group<T, D>(q + offset, k + kv_head * head_dim, v + kv_head * head_dim,
                         tables + static_cast<int64_t>(seq) * max_blocks, lens[seq], block_size,
                         token_stride, head_dim, group, scale, logits.data(), o + offset);
    }
  });
}

// Every block a context reads must be a block of the cache: a -1 (padding) or a stale id inside
// a context is an error here, not a read outside the cache. One pass over the tables' used part.
void check_context_blocks(const at::Tensor& tables, const at::Tensor& lens, int64_t num_blocks,
                          int64_t block_size) {
  const int* table = tables.data_ptr<int>();
  const int* len = lens.data_ptr<int>();
  const int64_t max_blocks = tables.size(1);
  for (int64_t seq = 0; seq < tables.size(0); ++seq) {
    const int64_t used = (len[seq] + block_size - 1) / block_size;
    TORCH_CHECK(len[seq] > 0 && used <= max_blocks, "context length ", len[seq], " of sequence ",
                seq, " does not fit its block table");
    for (int64_t b = 0; b < used; ++b) {
      const int id = table[seq * max_blocks + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block ", id, " of sequence ", seq,
                  " is outside the cache");
    }
  }
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "query [seqs, heads, dim] and caches [blocks, block_size, kv_heads, dim] expected");
  TORCH_CHECK(query.size(2) == k_cache.size(3) && query.size(2) <= kMaxHeadDim,
              "head_dim mismatch or above ", kMaxHeadDim);
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0 && query.size(1) / k_cache.size(2) <= kMaxGroup,
              "heads must be a multiple of kv_heads, at most ", kMaxGroup, " per kv head");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type(), "query and cache dtypes differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.size(0) == query.size(0) && context_lens.numel() == query.size(0),
              "one block table and one context length per sequence");
  const at::Tensor q = query.contiguous();
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = context_lens.to(at::kInt).contiguous();
  check_context_blocks(tables, lens, k_cache.size(0), k_cache.size(1));
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode", [&] {
    switch (q.size(2)) {
      case 64: decode_attention<scalar_t, 64>(q, k_cache, v_cache, tables, lens, scale, out); break;
      case 128: decode_attention<scalar_t, 128>(q, k_cache, v_cache, tables, lens, scale, out); break;
      default: decode_attention<scalar_t, 0>(q, k_cache, v_cache, tables, lens, scale, out);
    }
  });
  return out;
}

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
              at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(key.size(0) == slot_mapping.numel() && value.sizes() == key.sizes(),
              "one slot per new token");
  const int64_t token_numel = k_cache.size(2) * k_cache.size(3);
  TORCH_CHECK(key.size(1) * key.size(2) == token_numel, "key shape does not match the cache");
  const at::Tensor keys = key.contiguous().to(k_cache.scalar_type());
  const at::Tensor values = value.contiguous().to(v_cache.scalar_type());
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t num_bytes = token_numel * k_cache.element_size();
  auto* k_dst = static_cast<char*>(k_cache.data_ptr());
  auto* v_dst = static_cast<char*>(v_cache.data_ptr());
  const auto* k_src = static_cast<const char*>(keys.data_ptr());
  const auto* v_src = static_cast<const char*>(values.data_ptr());
  for (int64_t i = 0; i < slots.numel(); ++i) {
    if (slot[i] < 0) continue;  // padding
    TORCH_CHECK(slot[i] < num_slots, "slot ", slot[i], " outside the cache");
    std::memcpy(k_dst + slot[i] * num_bytes, k_src + i * num_bytes, num_bytes);
    std::memcpy(v_dst + slot[i] * num_bytes, v_src + i * num_bytes, num_bytes);
  }
}

}  // namespace

TORCH_LIBRARY(llm_cpu, m) {
  m.def("paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, "
        "Tensor block_tables, Tensor context_lens, float scale) -> Tensor");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(llm_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("store_kv", &store_kv);
}
