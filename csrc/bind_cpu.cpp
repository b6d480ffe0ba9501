// pybind11 binding of the CPU kernels: pointers arrive as integers (tensor.data_ptr()), shapes and
// dtypes are checked in megalite/ops/_checks.py; here only the C return code is turned into an
// exception. No torch headers, so this builds against any torch or none.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "megalite_kernels.h"

namespace py = pybind11;
using ptr = uintptr_t;

template <class T> static T* P(ptr p) { return reinterpret_cast<T*>(p); }

static void check(int code, const char* what) {
  if (code != ML_OK) throw std::invalid_argument(std::string(what) + ": invalid arguments");
}

PYBIND11_MODULE(_kernels_cpu, m) {
  m.doc() = "megalite fused kernels, CPU (OpenMP, ISA chosen at run time)";
  m.def("isa", &ml_cpu_isa, "instruction set the kernels run with on this machine");
  m.def("norm_forward",
        [](int dtype, bool rms, ptr x, ptr w, ptr b, ptr y, ptr mean, ptr rstd,
           int64_t rows, int64_t cols, float eps, int threads) {
          py::gil_scoped_release nogil;
          check(ml_cpu_norm_forward(dtype, rms, P<void>(x), P<float>(w), P<float>(b),
                                    P<void>(y), P<float>(mean), P<float>(rstd), rows, cols, eps,
                                    threads),
                "norm_forward");
        });
  m.def("norm_backward",
        [](int dtype, bool rms, ptr dy, ptr x, ptr w, ptr mean, ptr rstd, ptr dx,
           ptr dw, ptr db, int64_t rows, int64_t cols, int threads) {
          py::gil_scoped_release nogil;
          check(ml_cpu_norm_backward(dtype, rms, P<void>(dy), P<void>(x), P<float>(w),
                                     P<float>(mean), P<float>(rstd), P<void>(dx), P<float>(dw),
                                     P<float>(db), rows, cols, threads),
                "norm_backward");
        });
  m.def("softmax_forward",
        [](int dtype, ptr x, ptr mask, ptr y, int64_t batch, int64_t heads, int64_t sq, int64_t sk,
           int64_t mask_sq, float scale, bool causal, int threads) {
          py::gil_scoped_release nogil;
          check(ml_cpu_softmax_forward(dtype, P<void>(x), P<uint8_t>(mask), P<void>(y), batch,
                                       heads, sq, sk, mask_sq, scale, causal, threads),
                "softmax_forward");
        });
  m.def("softmax_backward",
        [](int dtype, ptr dy, ptr y, ptr dx, int64_t rows, int64_t sq, int64_t sk, float scale,
           bool causal, int threads) {
          py::gil_scoped_release nogil;
          check(ml_cpu_softmax_backward(dtype, P<void>(dy), P<void>(y), P<void>(dx), rows, sq, sk,
                                        scale, causal, threads),
                "softmax_backward");
        });
}
