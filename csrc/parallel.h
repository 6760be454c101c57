// Splits independent per-sequence work over std::threads. Sequences are claimed one at a time
// from an atomic counter because their lengths differ widely in RL batches.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace longcot {

template <class Fn>
void parallel_for(int64_t n_items, int64_t n_threads, int64_t work_per_item, Fn&& fn) {
  // Below ~64k elements of work a thread start costs more than it saves.
  const int64_t by_work = std::max<int64_t>(1, (n_items * std::max<int64_t>(work_per_item, 1)) / 65536);
  int64_t threads = std::min({n_threads, n_items, by_work});
  if (threads <= 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto worker = [&](int64_t tid) {
    try {
      for (int64_t i = next.fetch_add(1); i < n_items && !failed.load(); i = next.fetch_add(1)) fn(i, tid);
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace longcot
