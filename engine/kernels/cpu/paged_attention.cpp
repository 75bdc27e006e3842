// Paged attention for the CPU: the KV blocks are read in place (no gathered copy of the context),
// one task per (sequence, KV head) so every block is read once for the query heads sharing it.
// Registered as torch ops (torch.ops.llm_cpu.*); engine/kernels/cpu_ops.py builds and loads this
// file and engine/kernels/reference.py holds the torch code it must agree with.
//
// Shapes: a KV cache is [num_blocks, block_size, num_kv_heads, head_dim], contiguous; a block
// table [num_seqs, max_blocks] of int32 block ids padded with -1; slot -1 is never written.

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention_avx2.h"
#include "attention_avx512.h"

namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxGroup = 64;  // query heads per KV head (multi-query attention included)
// How far ahead of the vector paths' reads their KV runs are asked for (token_walk.h). The layer
// measured there, in one process: none / 4 / 8 / 16 / 32 tokens 644 / 503 / 443 / 420 / 422 us.
constexpr int kPrefetchTokens = 16;

// Ask for the first `count` tokens' runs of `run_bytes` (every `stride` bytes) of a block.
inline void prefetch_block(const void* block, int count, int64_t stride, int64_t run_bytes) {
  const auto* bytes = static_cast<const char*>(block);
  for (int i = 0; i < count; ++i)
    for (int64_t line = 0; line < run_bytes; line += 64)
      __builtin_prefetch(bytes + i * stride + line);
}

// Each row of `logits` [rows, context_len] replaced by its exponentials (less its maximum);
// inv_sum[row]: one over their sum.
inline void softmax_rows(float* logits, int rows, int context_len, float* inv_sum) {
  for (int h = 0; h < rows; ++h) {
    float* row = logits + h * context_len;
    float max_logit = -INFINITY;
    for (int t = 0; t < context_len; ++t) max_logit = std::max(max_logit, row[t]);
    float sum = 0.f;
    for (int t = 0; t < context_len; ++t) {
      row[t] = std::exp(row[t] - max_logit);
      sum += row[t];
    }
    inv_sum[h] = 1.f / sum;
  }
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// attend_heads (below) with the vector path's scores and weighted sums (attention_avx512.h or
// attention_avx2.h, by the build's capability), and the KV runs asked for a token at a time,
// kPrefetchTokens ahead (RunPrefetch in token_walk.h), not a block at a time.
template <typename T, int D>
void attend_heads_simd(const float* q, const T* k_base, const T* v_base, const int* block_table,
                         int context_len, int block_size, int64_t token_stride, int group,
                         int num_kv, float* logits, float* inv_sum, T* out) {
  using attention_simd::TokenWalk;
  const TokenWalk<T> keys{k_base, block_table, block_size, token_stride};
  attention_simd::RunPrefetch<T> stream{keys, {v_base, block_table, block_size, token_stride},
                                        context_len, num_kv * D * static_cast<int64_t>(sizeof(T))};
  stream.start(kPrefetchTokens);
  const auto prefetch_next = [&] { stream.step(); };
  attention_simd::scores<T, D>(q, keys, context_len, num_kv, group, prefetch_next, logits);
  softmax_rows(logits, num_kv * group, context_len, inv_sum);
  for (int kv = 0; kv < num_kv; ++kv) {  // the first KV head's pass goes on asking for values
    const TokenWalk<T> values{v_base + kv * D, block_table, block_size, token_stride};
    const auto prefetch_values = [&] {
      if (kv == 0) stream.step();
    };
    attention_simd::weighted_values<T, D>(logits + kv * group * context_len, values,
                                            context_len, group, inv_sum + kv * group,
                                            prefetch_values, out + kv * group * D);
  }
}
#endif

// Softmax(q . k * scale) . v for the query heads of `num_kv` KV heads of one sequence (from
// k_base, v_base). The context is walked block by block (no division per token); each token's
// keys and values of those KV heads, one contiguous run, are read once for all the query heads
// sharing them. The next block's keys and this block's values are prefetched while this block's
// keys are read: the blocks lie anywhere in a cache far larger than the last-level cache (a
// 32-sequence step of 30 layers, bf16, contexts of ~200 tokens: 850 -> 650 us a layer). D > 0 is the head size known at compile time (loops
// unroll, accumulators stay in registers); D == 0 takes it from head_dim. Scratch: `q`, `acc`
// num_heads x dim floats, `logits` num_heads x context_len, `inv_sum` num_heads.
template <typename T, int D>
void attend_heads(const T* query, const T* k_base, const T* v_base, const int* block_table,
                  int context_len, int block_size, int64_t token_stride, int head_dim, int group,
                  int num_kv, float scale, float* q, float* logits, float* acc, float* inv_sum,
                  T* out) {
  const int dim = D > 0 ? D : head_dim, num_heads = num_kv * group;
  for (int h = 0; h < num_heads; ++h)
    for (int d = 0; d < dim; ++d) q[h * dim + d] = static_cast<float>(query[h * dim + d]) * scale;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (D > 0 && D % attention_simd::kLanes == 0 && attention_simd::kServes<T>) {
    attend_heads_simd<T, D>(q, k_base, v_base, block_table, context_len, block_size,
                              token_stride, group, num_kv, logits, inv_sum, out);
    return;
  }
#endif
  const int num_blocks = (context_len + block_size - 1) / block_size;
  const int64_t run_bytes = static_cast<int64_t>(num_kv) * dim * sizeof(T);
  // the prefetch of a block's values while its keys are read: there for the second pass
  for (int b = 0; b < num_blocks; ++b) {
    const int64_t block_offset = static_cast<int64_t>(block_table[b]) * block_size * token_stride;
    const T* block = k_base + block_offset;
    const int first = b * block_size, count = std::min(block_size, context_len - first);
    if (b + 1 < num_blocks) {
      prefetch_block(k_base + static_cast<int64_t>(block_table[b + 1]) * block_size * token_stride,
                     block_size, token_stride * sizeof(T), run_bytes);
    }
    prefetch_block(v_base + block_offset, count, token_stride * sizeof(T), run_bytes);  // for below
    for (int i = 0; i < count; ++i) {
      const T* token = block + i * token_stride;
      for (int h = 0; h < num_heads; ++h) {
        const T* k = token + (h / group) * dim;
        const float* qh = q + h * dim;
        float dot = 0.f;
        for (int d = 0; d < dim; ++d) dot += qh[d] * static_cast<float>(k[d]);
        logits[h * context_len + first + i] = dot;
      }
    }
  }
  softmax_rows(logits, num_heads, context_len, inv_sum);
  std::fill(acc, acc + num_heads * dim, 0.f);
  for (int b = 0; b < num_blocks; ++b) {
    const T* block = v_base + static_cast<int64_t>(block_table[b]) * block_size * token_stride;
    const int first = b * block_size, count = std::min(block_size, context_len - first);
    for (int i = 0; i < count; ++i) {
      const T* token = block + i * token_stride;
      for (int h = 0; h < num_heads; ++h) {
        const T* v = token + (h / group) * dim;
        const float p = logits[h * context_len + first + i];
        float* a = acc + h * dim;
        for (int d = 0; d < dim; ++d) a[d] += p * static_cast<float>(v[d]);
      }
    }
  }
  for (int h = 0; h < num_heads; ++h)
    for (int d = 0; d < dim; ++d) out[h * dim + d] = static_cast<T>(acc[h * dim + d] * inv_sum[h]);
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
  const int64_t q_row_stride = query.stride(0);  // a slice of the fused qkv rows, or dense
  const T* k = k_cache.data_ptr<T>();
  const T* v = v_cache.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int* tables = block_tables.data_ptr<int>();
  const int* lens = context_lens.data_ptr<int>();
  // A task per sequence where there are sequences enough to keep every thread busy (each token's
  // KV heads read as one run: a 32-sequence step's attention 1129 -> 749 us a layer, with the
  // prefetches); else per (sequence, KV head). Both compute each head alike.
  const int kv_per_task = num_seqs >= 4 * at::get_num_threads() ? num_kv_heads : 1;
  const int tasks_per_seq = num_kv_heads / kv_per_task;
  at::parallel_for(0, static_cast<int64_t>(num_seqs) * tasks_per_seq, 1,
                   [&](int64_t begin, int64_t end) {
    std::vector<float> logits, q_scaled(num_heads * head_dim), acc(num_heads * head_dim),
        inv_sum(num_heads);
    for (int64_t task = begin; task < end; ++task) {
      const int seq = task / tasks_per_seq, kv_head = (task % tasks_per_seq) * kv_per_task;
      logits.resize(static_cast<size_t>(kv_per_task) * group * lens[seq]);
      const int64_t head_offset = static_cast<int64_t>(kv_head) * group * head_dim;
      const int64_t out_offset = static_cast<int64_t>(seq) * num_heads * head_dim + head_offset;
      attend_heads<T, D>(q + seq * q_row_stride + head_offset, k + kv_head * head_dim,
                         v + kv_head * head_dim, tables + static_cast<int64_t>(seq) * max_blocks,
                         lens[seq], block_size, token_stride, head_dim, group, kv_per_task, scale,
                         q_scaled.data(), logits.data(), acc.data(), inv_sum.data(),
                         o + out_offset);
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

// t [rows, heads, dim] as it is where each row's heads are dense (a slice of the fused qkv
// projection's rows: rows apart by its stride), else a dense copy. The decode step's q, k and v
// are such slices: their copies were 3 of a layer's ops, ~2 ms of a 32-sequence step.
at::Tensor with_dense_rows(const at::Tensor& t) {
  const bool is_dense = t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2) &&
                        t.stride(0) >= t.size(1) * t.size(2);
  return is_dense ? t : t.contiguous();
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
  const at::Tensor q = with_dense_rows(query);
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = context_lens.to(at::kInt).contiguous();
  check_context_blocks(tables, lens, k_cache.size(0), k_cache.size(1));
  at::Tensor out = at::empty(q.sizes(), q.options());
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
  const at::Tensor keys = with_dense_rows(key).to(k_cache.scalar_type());
  const at::Tensor values = with_dense_rows(value).to(v_cache.scalar_type());
  const int64_t k_row_bytes = keys.stride(0) * keys.element_size();
  const int64_t v_row_bytes = values.stride(0) * values.element_size();
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
    std::memcpy(k_dst + slot[i] * num_bytes, k_src + i * k_row_bytes, num_bytes);
    std::memcpy(v_dst + slot[i] * num_bytes, v_src + i * v_row_bytes, num_bytes);
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
