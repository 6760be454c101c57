#pragma once

#include <cstdint>

namespace longcot {

// tokens: [B, T] row-major; lengths: [B], each in [0, T] (checked by the caller).
// out_mask: [B, T], written entirely (zeros past each length).
void repetition_mask(const int64_t* tokens, const int64_t* lengths, int64_t B, int64_t T, int64_t n,
                     bool only_start, uint8_t* out_mask, int64_t n_threads);

// out_ratio: [B], 1 - distinct n-grams / n-grams, 0 for a sequence with no n-gram.
void repetition_ratio(const int64_t* tokens, const int64_t* lengths, int64_t B, int64_t T, int64_t n,
                      float* out_ratio, int64_t n_threads);

}  // namespace longcot
