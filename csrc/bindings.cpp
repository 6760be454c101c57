// pybind11 bindings on NumPy buffers (no torch headers, so building needs no torch). Every
// argument is checked here - dtype, rank, shape, contiguity, value ranges - and a bad one raises
// ValueError naming it, so no input can make the C++ read or write out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "ngram.h"
#include "ngram_update.h"
#include "scans.h"

namespace py = pybind11;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

void check_layout(const py::array& a, const char* name, py::ssize_t ndim) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) +
                          " dimensions, got shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array");
}

template <class T>
void check_dtype(const py::array& a, const char* name, const char* expected) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw py::value_error(std::string(name) + ": expected dtype " + expected + ", got " +
                          std::string(py::str(a.dtype())));
}

void check_dim(const py::array& a, const char* name, py::ssize_t axis, py::ssize_t want,
               const char* what) {
  if (a.shape(axis) != want)
    throw py::value_error(std::string(name) + ": expected shape[" + std::to_string(axis) + "] == " +
                          std::to_string(want) + " (" + what + "), got shape " + shape_str(a));
}

int64_t threads_arg(int64_t n_threads) { return n_threads < 1 ? 1 : n_threads; }

struct TokenBatch {
  const int64_t* tokens;
  const int64_t* lengths;
  int64_t B, T;
};

TokenBatch check_tokens(const py::array& tokens, const py::array& lengths, int64_t n) {
  check_dtype<int64_t>(tokens, "tokens", "int64");
  check_layout(tokens, "tokens", 2);
  check_dtype<int64_t>(lengths, "lengths", "int64");
  check_layout(lengths, "lengths", 1);
  check_dim(lengths, "lengths", 0, tokens.shape(0), "one length per row of tokens");
  if (n < 1) throw py::value_error("n: expected n >= 1, got " + std::to_string(n));
  TokenBatch tb{static_cast<const int64_t*>(tokens.data()), static_cast<const int64_t*>(lengths.data()),
                static_cast<int64_t>(tokens.shape(0)), static_cast<int64_t>(tokens.shape(1))};
  if (tb.T >= (int64_t{1} << 31) - 1)
    throw py::value_error("tokens: expected fewer than 2^31 - 1 positions per row, got " + std::to_string(tb.T));
  for (int64_t b = 0; b < tb.B; ++b) {
    if (tb.lengths[b] < 0 || tb.lengths[b] > tb.T)
      throw py::value_error("lengths: expected 0 <= lengths[b] <= T = " + std::to_string(tb.T) +
                            ", got lengths[" + std::to_string(b) + "] = " + std::to_string(tb.lengths[b]));
  }
  return tb;
}

py::array repetition_mask(const py::array& tokens, const py::array& lengths, int64_t n,
                          bool only_start, int64_t n_threads) {
  const TokenBatch tb = check_tokens(tokens, lengths, n);
  py::array_t<bool> out({tb.B, tb.T});
  auto* dst = reinterpret_cast<uint8_t*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    longcot::repetition_mask(tb.tokens, tb.lengths, tb.B, tb.T, n, only_start, dst, threads_arg(n_threads));
  }
  return out;
}

py::array repetition_ratio(const py::array& tokens, const py::array& lengths, int64_t n,
                           int64_t n_threads) {
  const TokenBatch tb = check_tokens(tokens, lengths, n);
  py::array_t<float> out(tb.B);
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    longcot::repetition_ratio(tb.tokens, tb.lengths, tb.B, tb.T, n, dst, threads_arg(n_threads));
  }
  return out;
}

void check_gamma(double g, const std::string& name) {
  if (!(g >= 0.0 && g <= 1.0))  // also rejects NaN
    throw py::value_error(name + ": expected a value in [0, 1], got " + std::to_string(g));
}

// Calls fn.template operator()<V, M>() with the value type of `values` and the mask's type.
template <class Fn>
auto dispatch_value_mask(const py::array& values, const char* values_name, const py::array& mask,
                         Fn&& fn) {
  const bool mask_bytes = py::isinstance<py::array_t<bool>>(mask) || py::isinstance<py::array_t<uint8_t>>(mask);
  if (py::isinstance<py::array_t<float>>(values)) {
    if (mask_bytes) return fn(float{}, uint8_t{});
    check_dtype<float>(mask, "mask", "bool, uint8 or the rewards' dtype (float32)");
    return fn(float{}, float{});
  }
  if (py::isinstance<py::array_t<double>>(values)) {
    if (mask_bytes) return fn(double{}, uint8_t{});
    check_dtype<double>(mask, "mask", "bool, uint8 or the rewards' dtype (float64)");
    return fn(double{}, double{});
  }
  throw py::value_error(std::string(values_name) + ": expected dtype float32 or float64, got " +
                        std::string(py::str(values.dtype())));
}

py::array discounted_returns(const py::array& rewards, const py::array& mask,
                             const std::vector<double>& gammas, int64_t n_threads) {
  check_layout(rewards, "rewards", 3);
  check_layout(mask, "mask", 2);
  const int64_t B = rewards.shape(0), T = rewards.shape(1), C = rewards.shape(2);
  check_dim(mask, "mask", 0, B, "rewards.shape[0]");
  check_dim(mask, "mask", 1, T, "rewards.shape[1]");
  if (static_cast<int64_t>(gammas.size()) != C)
    throw py::value_error("gammas: expected one discount per reward channel (" + std::to_string(C) +
                          "), got " + std::to_string(gammas.size()));
  for (size_t c = 0; c < gammas.size(); ++c) check_gamma(gammas[c], "gammas[" + std::to_string(c) + "]");
  return dispatch_value_mask(rewards, "rewards", mask, [&](auto v, auto m) -> py::array {
    using V = decltype(v);
    using M = decltype(m);
    py::array_t<V> out({B, T});
    V* dst = out.mutable_data();
    const V* r = static_cast<const V*>(rewards.data());
    const M* mk = static_cast<const M*>(mask.data());
    {
      py::gil_scoped_release release;
      longcot::discounted_returns<V, M>(r, mk, gammas.data(), B, T, C, dst, threads_arg(n_threads));
    }
    return out;
  });
}

py::tuple gae(const py::array& rewards, const py::array& values, const py::array& mask, double gamma,
              double lam, int64_t n_threads) {
  check_layout(rewards, "rewards", 2);
  check_layout(values, "values", 2);
  check_layout(mask, "mask", 2);
  const int64_t B = rewards.shape(0), T = rewards.shape(1);
  for (const py::array* arr : {&values, &mask}) {
    const char* name = arr == &values ? "values" : "mask";
    check_dim(*arr, name, 0, B, "rewards.shape[0]");
    check_dim(*arr, name, 1, T, "rewards.shape[1]");
  }
  const bool same_dtype = py::isinstance<py::array_t<float>>(rewards) == py::isinstance<py::array_t<float>>(values) &&
                          py::isinstance<py::array_t<double>>(rewards) == py::isinstance<py::array_t<double>>(values);
  if (!same_dtype)
    throw py::value_error("values: expected the same dtype as rewards (" + std::string(py::str(rewards.dtype())) +
                          "), got " + std::string(py::str(values.dtype())));
  check_gamma(gamma, "gamma");
  check_gamma(lam, "lam");
  return dispatch_value_mask(rewards, "rewards", mask, [&](auto v, auto m) -> py::tuple {
    using V = decltype(v);
    using M = decltype(m);
    py::array_t<V> adv({B, T}), ret({B, T});
    V* a = adv.mutable_data();
    V* rt = ret.mutable_data();
    const V* r = static_cast<const V*>(rewards.data());
    const V* val = static_cast<const V*>(values.data());
    const M* mk = static_cast<const M*>(mask.data());
    {
      py::gil_scoped_release release;
      longcot::gae<V, M>(r, val, mk, gamma, lam, B, T, a, rt, threads_arg(n_threads));
    }
    return py::make_tuple(adv, ret);
  });
}

// The state's arrays are updated in place, so every check runs before the first write: a refused
// call leaves the state as it was.
template <class T>
T* state_array(const py::array& a, const char* name, const char* dtype, py::ssize_t ndim, int64_t rows) {
  check_dtype<T>(a, name, dtype);
  check_layout(a, name, ndim);
  if (!a.writeable()) throw py::value_error(std::string(name) + ": expected a writable array (updated in place)");
  check_dim(a, name, 0, rows, "one row per row of tokens");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

py::tuple repetition_update(const py::array& tokens, const py::array& length, const py::array& hash,
                            const py::array& repeated, const py::array& marked_end, const py::array& distinct,
                            const py::array& slot_start, const py::array& slot_key, const py::array& slot_count,
                            const py::array& new_tokens, const py::object& active, int64_t n, int64_t hash_bits,
                            int64_t n_threads) {
  check_dtype<int64_t>(tokens, "tokens", "int64");
  check_layout(tokens, "tokens", 2);
  const int64_t B = tokens.shape(0), L = tokens.shape(1);
  longcot::NgramState st{};
  st.tokens = state_array<int64_t>(tokens, "tokens", "int64", 2, B);
  st.length = state_array<int64_t>(length, "length", "int64", 1, B);
  st.hash = state_array<int64_t>(hash, "hash", "int64", 1, B);
  st.repeated = state_array<int64_t>(repeated, "repeated", "int64", 1, B);
  st.marked_end = state_array<int64_t>(marked_end, "marked_end", "int64", 1, B);
  st.distinct = state_array<int64_t>(distinct, "distinct", "int64", 1, B);
  st.slot_start = state_array<int32_t>(slot_start, "slot_start", "int32", 2, B);
  st.slot_key = state_array<int32_t>(slot_key, "slot_key", "int32", 2, B);
  st.slot_count = state_array<int32_t>(slot_count, "slot_count", "int32", 2, B);
  if (n < 1) throw py::value_error("n: expected n >= 1, got " + std::to_string(n));
  if (hash_bits < 0 || hash_bits > 31)
    throw py::value_error("hash_bits: expected a value in [0, 31], got " + std::to_string(hash_bits));
  // Starts are stored as int32.
  if (L < 1 || L >= (int64_t{1} << 31) - 1)
    throw py::value_error("tokens: expected 1 <= max_len < 2^31 - 1 positions per row, got " + std::to_string(L));
  const int64_t capacity = slot_start.shape(1) - 1;
  const int64_t grams = std::max<int64_t>(1, L - n + 1);
  // A power of two (the probe sequence's odd step then visits every slot) with room for every
  // n-gram a row can hold (so a probe for a new one always meets an empty slot).
  if (capacity < grams || (capacity & (capacity - 1)) != 0)
    throw py::value_error("slot_start: expected shape[1] == capacity + 1 with capacity a power of two >= " +
                          std::to_string(grams) + " (the n-grams a row can hold), got shape " + shape_str(slot_start));
  check_dim(slot_key, "slot_key", 1, capacity + 1, "slot_start.shape[1]");
  check_dim(slot_count, "slot_count", 1, capacity + 1, "slot_start.shape[1]");
  check_dtype<int64_t>(new_tokens, "new_tokens", "int64");
  check_layout(new_tokens, "new_tokens", 1);
  check_dim(new_tokens, "new_tokens", 0, B, "the state's rows");
  const uint8_t* act = nullptr;
  if (!active.is_none()) {
    if (!py::isinstance<py::array>(active))
      throw py::value_error("active: expected a bool array or None, got " + std::string(py::str(py::type::of(active))));
    const auto a = py::reinterpret_borrow<py::array>(active);
    check_dtype<bool>(a, "active", "bool");
    check_layout(a, "active", 1);
    check_dim(a, "active", 0, B, "the state's rows");
    act = static_cast<const uint8_t*>(a.data());
  }
  st.batch = B;
  st.max_len = L;
  st.n = n;
  st.capacity = capacity;
  st.hash_bits = hash_bits;
  const auto in_range = [](const char* name, int64_t b, int64_t v, int64_t lo, int64_t hi, const char* what) {
    if (v < lo || v > hi)
      throw py::value_error(std::string(name) + ": expected values in [" + std::to_string(lo) + ", " +
                            std::to_string(hi) + "] (" + what + "), got " + name + "[" + std::to_string(b) +
                            "] = " + std::to_string(v));
  };
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = st.length[b];
    in_range("length", b, len, 0, L, "0 to max_len");
    if (len == L && (act == nullptr || act[b]))
      throw py::value_error("new_tokens: row " + std::to_string(b) + " already holds max_len=" + std::to_string(L) +
                            " tokens (pass active=False for full rows, or make the state with a larger max_len)");
    in_range("hash", b, st.hash[b], 0, 2147483646, "a hash modulo 2^31 - 1");
    in_range("repeated", b, st.repeated[b], 0, len, "0 to the row's length");
    in_range("marked_end", b, st.marked_end[b], 0, len, "0 to the row's length");
    in_range("distinct", b, st.distinct[b], 0, std::max<int64_t>(0, len - n + 1), "0 to the row's n-grams");
  }
  py::array_t<int64_t> occurrences(B), repeated_out(B);
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = longcot::repetition_update(st, static_cast<const int64_t*>(new_tokens.data()), act,
                                     occurrences.mutable_data(), repeated_out.mutable_data(), threads_arg(n_threads));
  }
  if (bad >= 0)
    throw py::value_error("slot_start: row " + std::to_string(bad) +
                          "'s hash table does not match its tokens (a stored start that is not an earlier "
                          "n-gram of the row, or no empty slot): not a state made by repetition_state");
  return py::make_tuple(occurrences, repeated_out);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "longcot's C++ CPU kernels (n-gram repetition, its incremental update, reverse-time scans).";
  m.def("repetition_mask", &repetition_mask, py::arg("tokens"), py::arg("lengths"), py::arg("n"),
        py::arg("only_start") = false, py::arg("n_threads") = 1);
  m.def("repetition_ratio", &repetition_ratio, py::arg("tokens"), py::arg("lengths"), py::arg("n"),
        py::arg("n_threads") = 1);
  m.def("discounted_returns", &discounted_returns, py::arg("rewards"), py::arg("mask"), py::arg("gammas"),
        py::arg("n_threads") = 1);
  m.def("gae", &gae, py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"),
        py::arg("lam"), py::arg("n_threads") = 1);
  m.def("repetition_update", &repetition_update, py::arg("tokens"), py::arg("length"), py::arg("hash"),
        py::arg("repeated"), py::arg("marked_end"), py::arg("distinct"), py::arg("slot_start"), py::arg("slot_key"),
        py::arg("slot_count"), py::arg("new_tokens"), py::arg("active"), py::arg("n"), py::arg("hash_bits"),
        py::arg("n_threads") = 1);
}
