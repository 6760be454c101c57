#pragma once

#include <cstdint>

namespace longcot {

// The arrays of kernels/repetition_update.py's RepetitionState, updated in place. The layout, the
// hash and the probe sequence are those of its torch and Triton paths, so a state can move between
// them slot for slot.
struct NgramState {
  int64_t* tokens;      // [B, max_len] history, 0 past each length
  int64_t* length;      // [B]
  int64_t* hash;        // [B] rolling hash of the last n tokens, in [0, 2^31 - 1)
  int64_t* repeated;    // [B] tokens marked so far
  int64_t* marked_end;  // [B] end of the last marked interval
  int64_t* distinct;    // [B] distinct n-grams so far
  int32_t* slot_start;  // [B, capacity + 1]: first occurrence's start, -1 for an empty slot
  int32_t* slot_key;    // [B, capacity + 1]: the n-gram's hash masked to hash_bits
  int32_t* slot_count;  // [B, capacity + 1]: occurrences so far
  int64_t batch, max_len, n, capacity, hash_bits;
};

// Appends new_tokens[b] to every row b with active[b] (active may be null: every row) and
// length[b] < max_len, and writes occurrences[b] (0 for rows that took no n-gram) and repeated[b].
// The caller has checked shapes and the per-row scalars (length, hash, marked_end, ...).
// Returns -1, or a row whose table cannot belong to a valid state (a stored start outside the
// row's earlier n-grams, or a probe sequence that met neither the n-gram nor an empty slot); rows
// are left partly updated then, as the state was corrupt already.
int64_t repetition_update(const NgramState& state, const int64_t* new_tokens, const uint8_t* active,
                          int64_t* occurrences, int64_t* repeated_out, int64_t n_threads);

}  // namespace longcot
