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
