// Reverse-time scans: multi-gamma discounted returns and GAE. One sequence per task; each step
// rounds exactly like the PyTorch reference (multiply, multiply, add in the value type), so the
// two agree to the last bit or close to it, not merely to a tolerance.
#include "scans.h"

#include <vector>

#include "parallel.h"

namespace longcot {

template <class V, class M>
void discounted_returns(const V* rewards, const M* mask, const double* gammas, int64_t B, int64_t T,
                        int64_t C, V* out, int64_t n_threads) {
  std::vector<V> g(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) g[static_cast<size_t>(c)] = static_cast<V>(gammas[c]);
  parallel_for(B, n_threads, T * C, [&](int64_t b, int64_t) {
    std::vector<V> ret(static_cast<size_t>(C), V(0));
    const V* r = rewards + b * T * C;
    const M* m = mask + b * T;
    V* o = out + b * T;
    for (int64_t t = T - 1; t >= 0; --t) {
      const V mt = static_cast<V>(m[t]);
      V total = V(0);
      for (int64_t c = 0; c < C; ++c) {
        const V rm = r[t * C + c] * mt;
        const V carried = g[static_cast<size_t>(c)] * ret[static_cast<size_t>(c)];
        ret[static_cast<size_t>(c)] = rm + carried;
        total = c == 0 ? ret[0] : total + ret[static_cast<size_t>(c)];
      }
      o[t] = total;
    }
  });
}

template <class V, class M>
void gae(const V* rewards, const V* values, const M* mask, double gamma, double lam, int64_t B,
         int64_t T, V* advantages, V* returns, int64_t n_threads) {
  const V g = static_cast<V>(gamma);
  const V gl = static_cast<V>(gamma * lam);
  parallel_for(B, n_threads, T, [&](int64_t b, int64_t) {
    const V* r = rewards + b * T;
    const V* v = values + b * T;
    const M* m = mask + b * T;
    V* adv = advantages + b * T;
    V* ret = returns + b * T;
    V next_value = V(0), carry = V(0);
    for (int64_t t = T - 1; t >= 0; --t) {
      const V mt = static_cast<V>(m[t]);
      const V vt = v[t] * mt;
      const V delta = (r[t] * mt + g * next_value) - vt;
      carry = delta + gl * carry;
      adv[t] = carry;
      ret[t] = carry + vt;
      next_value = vt;
    }
  });
}

#define LONGCOT_INSTANTIATE(V, M)                                                               \
  template void discounted_returns<V, M>(const V*, const M*, const double*, int64_t, int64_t,   \
                                         int64_t, V*, int64_t);                                 \
  template void gae<V, M>(const V*, const V*, const M*, double, double, int64_t, int64_t, V*, V*, \
                          int64_t);
LONGCOT_INSTANTIATE(float, uint8_t)
LONGCOT_INSTANTIATE(float, float)
LONGCOT_INSTANTIATE(double, uint8_t)
LONGCOT_INSTANTIATE(double, double)
#undef LONGCOT_INSTANTIATE

}  // namespace longcot
