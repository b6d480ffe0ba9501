// pybind11 binding of the CUDA kernels (csrc/cuda/*.cu, linked in with a static cudart). Pointers
// arrive as integers (tensor.data_ptr()), the stream as torch.cuda.current_stream().cuda_stream;
// shapes and dtypes are checked in megalite/ops/_checks.py. No torch or CUDA headers here.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "megalite_kernels.h"

namespace py = pybind11;
using ptr = uintptr_t;

template <class T> static T* P(ptr p) { return reinterpret_cast<T*>(p); }

static void check(int code, const char* what) {
  if (code == ML_ERR_ARG) throw std::invalid_argument(std::string(what) + ": invalid arguments");
  if (code != ML_OK) throw std::runtime_error(std::string(what) + ": " + ml_cuda_last_error());
}

PYBIND11_MODULE(_kernels_cuda, m) {
  m.doc() = "megalite fused kernels, CUDA (launched on the given stream)";
  m.def("norm_forward",
        [](int dtype, bool rms, ptr x, ptr w, ptr b, ptr y, ptr mean, ptr rstd, int64_t rows,
           int64_t cols, float eps, ptr stream) {
          check(ml_cuda_norm_forward(dtype, rms, P<void>(x), P<float>(w), P<float>(b), P<void>(y),
                                     P<float>(mean), P<float>(rstd), rows, cols, eps,
                                     P<void>(stream)),
                "norm_forward");
        });
  m.def("cuda_runtime_version", &ml_cuda_runtime_version,
        "CUDART_VERSION this library was built with (1000 * major + 10 * minor)");
  m.def("norm_backward_workspace", &ml_cuda_norm_backward_workspace,
        "bytes of scratch device memory norm_backward needs");
  m.def("norm_backward",
        [](int dtype, bool rms, ptr dy, ptr x, ptr w, ptr mean, ptr rstd, ptr dx, ptr dw, ptr db,
           int64_t rows, int64_t cols, ptr workspace, ptr stream) {
          check(ml_cuda_norm_backward(dtype, rms, P<void>(dy), P<void>(x), P<float>(w),
                                      P<float>(mean), P<float>(rstd), P<void>(dx), P<float>(dw),
                                      P<float>(db), rows, cols, P<void>(workspace),
                                      P<void>(stream)),
                "norm_backward");
        });
  m.def("softmax_forward",
        [](int dtype, ptr x, ptr mask, ptr y, int64_t batch, int64_t heads, int64_t sq, int64_t sk,
           int64_t mask_sq, float scale, bool causal, ptr stream) {
          check(ml_cuda_softmax_forward(dtype, P<void>(x), P<uint8_t>(mask), P<void>(y), batch,
                                        heads, sq, sk, mask_sq, scale, causal, P<void>(stream)),
                "softmax_forward");
        });
  m.def("softmax_backward",
        [](int dtype, ptr dy, ptr y, ptr dx, int64_t rows, int64_t sq, int64_t sk, float scale,
           bool causal, ptr stream) {
          check(ml_cuda_softmax_backward(dtype, P<void>(dy), P<void>(y), P<void>(dx), rows, sq, sk,
                                         scale, causal, P<void>(stream)),
                "softmax_backward");
        });
}
