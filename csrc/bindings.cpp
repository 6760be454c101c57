// pybind11 bindings on NumPy buffers (no torch headers, so building needs no torch). Every
// argument is checked here - dtype, rank, shape, contiguity, value ranges - and a bad one raises
// ValueError naming it, so no input can make the C++ read or write out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "ngram.h"
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

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "longcot's C++ CPU kernels (n-gram repetition, reverse-time scans).";
  m.def("repetition_mask", &repetition_mask, py::arg("tokens"), py::arg("lengths"), py::arg("n"),
        py::arg("only_start") = false, py::arg("n_threads") = 1);
  m.def("repetition_ratio", &repetition_ratio, py::arg("tokens"), py::arg("lengths"), py::arg("n"),
        py::arg("n_threads") = 1);
  m.def("discounted_returns", &discounted_returns, py::arg("rewards"), py::arg("mask"), py::arg("gammas"),
        py::arg("n_threads") = 1);
  m.def("gae", &gae, py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"),
        py::arg("lam"), py::arg("n_threads") = 1);
}
