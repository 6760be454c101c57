// One decode step of the incremental n-gram repetition state: the per-row logic of
// kernels/repetition_update.py's Triton kernel (append, roll the hash, probe the open-addressing
// table with a token-by-token confirmation, update the counts), on the state's own arrays.
//
// The arithmetic must reproduce the torch and Triton paths bit for bit (a state is shared
// between them): the hash is a polynomial in 1000003 modulo 2^31 - 1 of the tokens reduced modulo
// the prime, its low hash_bits bits are the key, and the home slot and the odd step of the double
// hashing are the high log2(capacity) bits of the key times two 32-bit constants, modulo 2^32.
#include "ngram_update.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include "parallel.h"

namespace longcot {
namespace {

constexpr int64_t kPrime = 2147483647;  // 2^31 - 1
constexpr int64_t kBase = 1000003;
constexpr uint32_t kMixHome = 2654435761u;
constexpr uint32_t kMixStep = 2246822519u;

// Any int64 id, negative ones included, into [0, kPrime), as Python's and Triton's % agree on.
inline int64_t reduce(int64_t tok) { return ((tok % kPrime) + kPrime) % kPrime; }

int64_t pow_mod(int64_t base, int64_t exp) {
  int64_t result = 1;
  base %= kPrime;
  for (; exp > 0; exp >>= 1) {
    if (exp & 1) result = result * base % kPrime;
    base = base * base % kPrime;
  }
  return result;
}

struct Params {
  int64_t pow_n1;    // kBase^(n-1) mod kPrime: the weight of the token that leaves the window
  int64_t key_mask;  // 2^hash_bits - 1
  uint32_t cap_mask;
  int shift;         // 32 - log2(capacity): the product's high bits pick slots
};

// A row between the append and the probe: the n-gram to look up and where its probe starts.
struct Pending {
  int64_t row;  // -1: nothing to look up (inactive, full, or fewer than n tokens)
  int64_t s;    // the n-gram's start
  uint32_t key, slot, step;
};

// Appends the row's token and rolls its hash; returns the lookup it needs.
Pending append(const NgramState& st, const Params& p, int64_t b, int64_t tok) {
  const int64_t n = st.n;
  int64_t* toks = st.tokens + b * st.max_len;
  int64_t len = st.length[b];
  toks[len] = tok;
  int64_t h = st.hash[b];
  if (len >= n) h = (h + kPrime - reduce(toks[len - n]) * p.pow_n1 % kPrime) % kPrime;
  h = (h * kBase + reduce(tok)) % kPrime;
  ++len;
  st.hash[b] = h;
  st.length[b] = len;
  if (len < n) return Pending{-1, 0, 0, 0, 0};
  const uint32_t key = static_cast<uint32_t>(h & p.key_mask);
  // uint32 products are the Python paths' products modulo 2^32; the shift may be 32, so in 64 bits.
  const uint32_t slot = static_cast<uint32_t>(uint64_t{key * kMixHome} >> p.shift);
  const uint32_t step = (static_cast<uint32_t>(uint64_t{key * kMixStep} >> p.shift) | 1u) & p.cap_mask;
  return Pending{b, len - n, key, slot, step};
}

// Probes the row's table for its n-gram and updates the counts; returns the occurrences, or 0 when
// the table cannot belong to a valid state (see the header).
int64_t probe(const NgramState& st, const Params& p, const Pending& q) {
  const int64_t n = st.n, b = q.row, s = q.s;
  const int64_t* toks = st.tokens + b * st.max_len;
  const int64_t table = b * (st.capacity + 1);
  int32_t* starts = st.slot_start + table;
  int32_t* keys = st.slot_key + table;
  int32_t* counts = st.slot_count + table;
  const size_t bytes = static_cast<size_t>(n) * sizeof(int64_t);
  uint32_t slot = q.slot;
  int64_t occ = 0;
  // An odd step in a power-of-two table visits every slot once in `capacity` probes; a row holds
  // at most capacity distinct n-grams, so a valid table always ends the walk before that.
  for (int64_t i = 0; i < st.capacity; ++i, slot = (slot + q.step) & p.cap_mask) {
    const int64_t first = starts[slot];
    if (first < 0) {
      starts[slot] = static_cast<int32_t>(s);
      keys[slot] = static_cast<int32_t>(q.key);
      counts[slot] = 1;
      occ = 1;
      break;
    }
    if (static_cast<uint32_t>(keys[slot]) != q.key) continue;
    // A stored start is an earlier n-gram of this row; anything else would read past the history.
    if (first >= s) return 0;
    if (std::memcmp(toks + first, toks + s, bytes) == 0) {
      // int64 arithmetic: a count past int32 cannot come from a valid state, and must not be UB.
      occ = static_cast<int64_t>(counts[slot]) + 1;
      counts[slot] = static_cast<int32_t>(occ);
      break;
    }
  }
  if (occ == 0) return 0;
  if (occ > 1) {
    st.repeated[b] += s + n - std::max(st.marked_end[b], s);
    st.marked_end[b] = s + n;
  } else {
    ++st.distinct[b];
  }
  return occ;
}

inline void prefetch_span(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
  __builtin_prefetch(c + bytes - 1);
}

}  // namespace

int64_t repetition_update(const NgramState& st, const int64_t* new_tokens, const uint8_t* active,
                          int64_t* occurrences, int64_t* repeated_out, int64_t n_threads) {
  int log2_cap = 0;
  while ((int64_t{1} << log2_cap) < st.capacity) ++log2_cap;
  const Params p{pow_mod(kBase, st.n - 1), (int64_t{1} << st.hash_bits) - 1,
                 static_cast<uint32_t>(st.capacity - 1), 32 - log2_cap};
  std::atomic<int64_t> bad{-1};
  // Every row's lookup misses the cache (its table slots, then the stored occurrence's tokens;
  // a decode step's forward evicts them between steps), and one row's misses wait on each other.
  // Rows go in blocks: append to all, prefetch their home slots, prefetch the candidates' tokens,
  // then probe, so the misses of a block overlap instead of adding up.
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (st.batch + kBlock - 1) / kBlock;
  const size_t gram_bytes = static_cast<size_t>(st.n) * sizeof(int64_t);
  // A row costs ~0.1-0.3 us (a few cache misses and an n-token compare): measured here, a second
  // thread lost at every batch up to 1024 rows (164 us on one, 218 us on two), so threads start
  // only past a few thousand rows, where a thread's start is a small share of its work.
  parallel_for(blocks, n_threads, kBlock * (st.n + 32), [&](int64_t blk, int64_t) {
    Pending q[kBlock];
    const int64_t b0 = blk * kBlock, b1 = std::min(st.batch, b0 + kBlock);
    for (int64_t b = b0; b < b1; ++b) {
      Pending& r = q[b - b0];
      r.row = -1;
      occurrences[b] = 0;
      if ((active == nullptr || active[b] != 0) && st.length[b] < st.max_len) r = append(st, p, b, new_tokens[b]);
      if (r.row < 0) continue;
      const int64_t at = b * (st.capacity + 1) + r.slot;
      __builtin_prefetch(st.slot_start + at);
      __builtin_prefetch(st.slot_key + at);
      __builtin_prefetch(st.slot_count + at);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const Pending& r = q[b - b0];
      if (r.row < 0) continue;
      const int64_t at = b * (st.capacity + 1) + r.slot;
      const int64_t first = st.slot_start[at];
      // Only a plausible start is prefetched (a prefetch never faults, but stays inside the row).
      if (first >= 0 && first < r.s && static_cast<uint32_t>(st.slot_key[at]) == r.key)
        prefetch_span(st.tokens + b * st.max_len + first, gram_bytes);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const Pending& r = q[b - b0];
      if (r.row >= 0) {
        occurrences[b] = probe(st, p, r);
        if (occurrences[b] == 0) bad.store(b);
      }
      repeated_out[b] = st.repeated[b];
    }
  });
  return bad.load();
}

}  // namespace longcot
