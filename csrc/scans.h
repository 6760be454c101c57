#pragma once

#include <cstdint>

namespace longcot {

// rewards: [B, T, C]; mask: [B, T] (uint8 or the value type); gammas: [C]; out: [B, T].
template <class V, class M>
void discounted_returns(const V* rewards, const M* mask, const double* gammas, int64_t B, int64_t T,
                        int64_t C, V* out, int64_t n_threads);

// rewards, values, advantages, returns: [B, T]; mask: [B, T] (uint8 or the value type).
template <class V, class M>
void gae(const V* rewards, const V* values, const M* mask, double gamma, double lam, int64_t B,
         int64_t T, V* advantages, V* returns, int64_t n_threads);

}  // namespace longcot
