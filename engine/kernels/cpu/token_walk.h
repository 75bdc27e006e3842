// The tokens of a context in order, block by block, without a division per token: what the
// decode attention's vector paths (attention_avx512.h, attention_avx2.h) walk.

#pragma once

#include <cstdint>

namespace attention_simd {

template <typename T>
struct TokenWalk {
  const T* base;
  const int* block_table;
  int block_size;
  int64_t token_stride;
  int block = 0, in_block = 0;

  const T* next() {  // the current token's vectors; then moves on
    const T* token = base + (static_cast<int64_t>(block_table[block]) * block_size + in_block) *
                                token_stride;
    if (++in_block == block_size) in_block = 0, ++block;
    return token;
  }
};

}  // namespace attention_simd

namespace attention_simd {

// Asks for a context's KV runs a distance ahead of their reads, one run per token read: its keys
// in order, then its values; into L2 (prefetcht1). The blocks lie anywhere in a cache far larger
// than the last-level cache, and the hardware's prefetchers stop at each 4 KiB page. Whole blocks
// asked for as the walk entered them, into L1, kept the loads waiting on memory. 32 sequences of
// 192 tokens, 3 KV heads of 64, scattered blocks, Zen 4, medians of 40 in one process: a layer's
// attention 644 -> 420 us in fp32, 420 -> 229 us in bf16 (fp32, runs into L1: no better than the
// blocks into L1; contiguous reads of as many bytes: ~290 us).
template <typename T>
struct RunPrefetch {
  TokenWalk<T> keys, values;
  int context_len;
  int64_t run_bytes;
  int num_asked = 0;  // runs asked for: keys first, then values

  void start(int distance) {
    for (int i = 0; i < distance; ++i) step();
  }
  void step() {  // one more run
    if (num_asked >= 2 * context_len) return;
    const auto* run = reinterpret_cast<const char*>(num_asked < context_len ? keys.next()
                                                                            : values.next());
    ++num_asked;
    for (int64_t line = 0; line < run_bytes; line += 64) __builtin_prefetch(run + line, 0, 2);
  }
};

}  // namespace attention_simd
