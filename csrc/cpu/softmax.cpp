// Scaled masked and causal softmax on the CPU: one pass to scale, mask and find the max, one to
// exponentiate and sum, one to normalise (and convert), all on a row that stays in cache.
#include <omp.h>

#include <vector>

#include "../megalite_kernels.h"
#include "simd.h"

namespace ml {
namespace {

// y[0:n] = softmax(scale * x[0:visible] with mask), zeros beyond `visible` and where masked.
// `x` and `y` may alias (fp32 in place). A row with no visible key is all zeros.
ML_CLONES void softmax_row_forward(const float* x, const uint8_t* mask, float* y, int64_t visible,
                                   int64_t n, float scale) {
  if (mask != nullptr) {
    for (int64_t j = 0; j < visible; j++) {
      const float v = x[j] * scale;  // unconditional load: the select vectorises, a branch not
      y[j] = mask[j] ? -INFINITY : v;
    }
  } else {
    for (int64_t j = 0; j < visible; j++) y[j] = x[j] * scale;
  }
  float m = max(y, visible);
  if (m == -INFINITY) {
    for (int64_t j = 0; j < n; j++) y[j] = 0.0f;
    return;
  }
  for (int64_t j = 0; j < visible; j++) y[j] = exp_approx(y[j] - m);
  const float s = sum(y, visible);
  float inv = 1.0f / s;
  for (int64_t i = 0; i < visible; i++) y[i] *= inv;
  for (int64_t i = visible; i < n; i++) y[i] = 0.0f;
}

// dx = scale * y * (dy - sum(dy * y)) over the visible keys, zeros beyond.
ML_CLONES void softmax_row_backward(const float* dy, const float* y, float* dx, int64_t visible,
                                    int64_t n, float scale) {
  float d = dot(dy, y, visible);
  for (int64_t j = 0; j < visible; j++) dx[j] = scale * y[j] * (dy[j] - d);
  for (int64_t j = visible; j < n; j++) dx[j] = 0.0f;
}

bool valid_dtype(int d) { return d == ML_F32 || d == ML_F16 || d == ML_BF16; }

}  // namespace
}  // namespace ml

using namespace ml;

extern "C" int ml_cpu_softmax_forward(int dtype, const void* x, const uint8_t* mask, void* y,
                                      int64_t batch, int64_t heads, int64_t sq, int64_t sk,
                                      int64_t mask_sq, float scale, int causal, int num_threads) {
  if (!valid_dtype(dtype) || batch < 0 || heads < 0 || sq < 0 || sk <= 0) return ML_ERR_ARG;
  if (mask != nullptr && mask_sq != 1 && mask_sq != sq) return ML_ERR_ARG;
  int64_t rows = batch * heads * sq;
  size_t es = dtype_size(dtype);
  int nt = pick_threads(num_threads, rows * sk);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(dtype == ML_F32 ? 0 : sk);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      int64_t q = r % sq, b = r / (heads * sq);
      int64_t visible = causal ? (q + 1 < sk ? q + 1 : sk) : sk;
      const uint8_t* mr = mask ? mask + (b * mask_sq + (mask_sq == 1 ? 0 : q)) * sk : nullptr;
      const char* xr = static_cast<const char*>(x) + r * sk * es;
      char* yr = static_cast<char*>(y) + r * sk * es;
      if (dtype == ML_F32) {
        softmax_row_forward(reinterpret_cast<const float*>(xr), mr, reinterpret_cast<float*>(yr),
                            visible, sk, scale);
      } else {
        load_row(dtype, xr, buf.data(), visible);
        softmax_row_forward(buf.data(), mr, buf.data(), visible, sk, scale);
        store_row(dtype, buf.data(), yr, sk);
      }
    }
  }
  return ML_OK;
}

extern "C" int ml_cpu_softmax_backward(int dtype, const void* dy, const void* y, void* dx,
                                       int64_t rows, int64_t sq, int64_t sk, float scale,
                                       int causal, int num_threads) {
  if (!valid_dtype(dtype) || rows < 0 || sq <= 0 || sk <= 0) return ML_ERR_ARG;
  size_t es = dtype_size(dtype);
  int nt = pick_threads(num_threads, rows * sk);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(dtype == ML_F32 ? 0 : 3 * sk);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      int64_t q = r % sq;
      int64_t visible = causal ? (q + 1 < sk ? q + 1 : sk) : sk;
      const char* dyr = static_cast<const char*>(dy) + r * sk * es;
      const char* yr = static_cast<const char*>(y) + r * sk * es;
      char* dxr = static_cast<char*>(dx) + r * sk * es;
      if (dtype == ML_F32) {
        softmax_row_backward(reinterpret_cast<const float*>(dyr),
                             reinterpret_cast<const float*>(yr), reinterpret_cast<float*>(dxr),
                             visible, sk, scale);
      } else {
        float *dyf = buf.data(), *yf = dyf + sk, *dxf = yf + sk;
        load_row(dtype, dyr, dyf, visible);
        load_row(dtype, yr, yf, visible);
        softmax_row_backward(dyf, yf, dxf, visible, sk, scale);
        store_row(dtype, dxf, dxr, sk);
      }
    }
  }
  return ML_OK;
}
