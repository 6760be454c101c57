// Exact n-gram repetition detection on token ids.
//
// Every n-gram start s of a sequence is classified as repeated (the same n tokens start at some
// s' < s) or new. A rolling polynomial hash finds candidates in an open-addressing table that
// holds the first start of every distinct n-gram; a candidate only counts after its tokens are
// compared, so hash collisions can cost time but never produce a mark. Inside a run of
// repetition (start s-1 matched s'-1) the match extends by one token comparison, without
// hashing into the table: degenerate, looping responses - the case the penalty exists for - are
// the cheapest to scan.
#include "ngram.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel.h"

namespace longcot {
namespace {

inline uint64_t mix64(uint64_t x) {
  // splitmix64's finaliser: spreads structured ids (0, 1, 2, ...) over all 64 bits, so the
  // polynomial hash below is not fooled by the sequences that defeat raw polynomial hashing.
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

constexpr uint64_t kBase = 0x100000001b3ULL * 2 + 1;  // odd multiplier, arithmetic mod 2^64
constexpr uint64_t kFib = 0x9E3779B97F4A7C15ULL;

// One 8-byte slot per entry, so a probe touches a single cache line and a table for 8k starts
// (32k slots at load factor <= 1/4, few probes and few branch misses) stays in L2.
struct Slot {
  uint32_t tag;    // high 32 bits of the n-gram's hash
  int32_t first1;  // 1 + start of the n-gram's first occurrence; 0 marks an empty slot
};

struct Table {
  std::vector<Slot> slots;
  uint64_t slot_mask = 0;
  int shift = 64;

  void reset(int64_t items) {
    int bits = 4;
    while ((int64_t{1} << bits) < 4 * items) ++bits;
    const size_t cap = size_t{1} << bits;
    if (slots.size() < cap) slots.resize(cap);
    std::memset(slots.data(), 0, cap * sizeof(Slot));
    slot_mask = cap - 1;
    shift = 64 - bits;
  }
};

// Tables outlive a call, so steady-state calls neither allocate nor page-fault 256 KB per
// thread. Calls may come from several Python threads at once (the GIL is released).
class TablePool {
 public:
  std::unique_ptr<Table> take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return std::make_unique<Table>();
    auto t = std::move(free_.back());
    free_.pop_back();
    return t;
  }
  void give(std::unique_ptr<Table> t) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(t));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Table>> free_;
};

TablePool& table_pool() {
  static TablePool pool;
  return pool;
}

// Borrows one table per worker thread for the duration of a call.
struct BorrowedTables {
  std::vector<std::unique_ptr<Table>> tables;
  explicit BorrowedTables(int64_t n) {
    for (int64_t i = 0; i < std::max<int64_t>(n, 1); ++i) tables.push_back(table_pool().take());
  }
  ~BorrowedTables() {
    for (auto& t : tables) table_pool().give(std::move(t));
  }
  Table& operator[](int64_t tid) { return *tables[tid]; }
};

// Calls visit(s, repeated) for s = 0 .. L-n in order and returns the number of distinct n-grams.
template <class Visit>
int64_t walk_ngrams(const int64_t* tok, int64_t L, int64_t n, Table& table, Visit&& visit) {
  const int64_t starts = L - n + 1;
  if (starts <= 0) return 0;
  table.reset(starts);

  uint64_t base_pow_n = 1;  // kBase^n, to drop the token that leaves the window
  uint64_t h = 0;
  for (int64_t i = 0; i < n; ++i) {
    base_pow_n *= kBase;
    h = h * kBase + mix64(static_cast<uint64_t>(tok[i]));
  }
  const size_t bytes = static_cast<size_t>(n) * sizeof(int64_t);
  int64_t distinct = 0;
  int64_t prev_repeated = -2, prev_match = -1;

  for (int64_t s = 0; s < starts; ++s) {
    if (s > 0) {
      h = h * kBase + mix64(static_cast<uint64_t>(tok[s + n - 1])) -
          mix64(static_cast<uint64_t>(tok[s - 1])) * base_pow_n;
    }
    int64_t match = -1;
    if (prev_repeated == s - 1 && tok[s + n - 1] == tok[prev_match + n]) {
      match = prev_match + 1;
    } else {
      const uint32_t tag = static_cast<uint32_t>(h >> 32);
      uint64_t slot = (h * kFib) >> table.shift;
      for (Slot* e = &table.slots[slot]; e->first1 != 0; e = &table.slots[slot]) {
        const int64_t cand = e->first1 - 1;
        if (e->tag == tag && std::memcmp(tok + cand, tok + s, bytes) == 0) {
          match = cand;
          break;
        }
        slot = (slot + 1) & table.slot_mask;
      }
      if (match < 0) {
        table.slots[slot] = Slot{tag, static_cast<int32_t>(s + 1)};
        ++distinct;
      }
    }
    if (match >= 0) {
      prev_repeated = s;
      prev_match = match;
    }
    visit(s, match >= 0);
  }
  return distinct;
}

}  // namespace

void repetition_mask(const int64_t* tokens, const int64_t* lengths, int64_t B, int64_t T, int64_t n,
                     bool only_start, uint8_t* out_mask, int64_t n_threads) {
  BorrowedTables tables(n_threads);
  parallel_for(B, n_threads, T, [&](int64_t b, int64_t tid) {
    const int64_t* tok = tokens + b * T;
    uint8_t* mask = out_mask + b * T;
    std::memset(mask, 0, static_cast<size_t>(T));
    int64_t covered = 0;  // positions below this are already marked
    int64_t prev_end = std::numeric_limits<int64_t>::min();
    walk_ngrams(tok, lengths[b], n, tables[tid], [&](int64_t s, bool repeated) {
      if (!repeated) return;
      if (only_start) {
        const bool mark = s > prev_end;
        prev_end = s + n;
        if (!mark) return;
      }
      const int64_t from = std::max(s, covered);
      if (s + n > from) std::memset(mask + from, 1, static_cast<size_t>(s + n - from));
      covered = std::max(covered, s + n);
    });
  });
}

void repetition_ratio(const int64_t* tokens, const int64_t* lengths, int64_t B, int64_t T, int64_t n,
                      float* out_ratio, int64_t n_threads) {
  BorrowedTables tables(n_threads);
  parallel_for(B, n_threads, T, [&](int64_t b, int64_t tid) {
    const int64_t starts = lengths[b] - n + 1;
    if (starts <= 0) {
      out_ratio[b] = 0.0f;
      return;
    }
    const int64_t distinct =
        walk_ngrams(tokens + b * T, lengths[b], n, tables[tid], [](int64_t, bool) {});
    out_ratio[b] = static_cast<float>(1.0 - static_cast<double>(distinct) / static_cast<double>(starts));
  });
}

}  // namespace longcot
