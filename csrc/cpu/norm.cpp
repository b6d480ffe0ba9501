// LayerNorm and RMSNorm on the CPU: one row per iteration, rows split over OpenMP threads,
// statistics and weight gradients in fp32 whatever the activation dtype.
#include <omp.h>

#include <vector>

#include "../megalite_kernels.h"
#include "simd.h"

namespace ml {
namespace {

// y = (x - mean) * rstd * w + b over one row (RMSNorm: mean = 0, no b). Returns mean, rstd.
// One pass for the statistics, on data shifted by x[0] so that var = E[d^2] - E[d]^2 does not
// cancel catastrophically when |mean| >> std (the "shifted data" algorithm).
ML_CLONES void norm_row_forward(const float* x, const float* w, const float* b, float* y,
                                int64_t n, float eps, bool rms, float* mean_out,
                                float* rstd_out) {
  const float shift = rms ? 0.0f : x[0];
  float s1[kLanes] = {0}, s2[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; k++) {
      float d = x[i + k] - shift;
      s1[k] += d;
      s2[k] += d * d;
    }
  float sum1 = 0.0f, sum2 = 0.0f;
  for (; i < n; i++) {
    float d = x[i] - shift;
    sum1 += d;
    sum2 += d * d;
  }
  for (int k = 0; k < kLanes; k++) {
    sum1 += s1[k];
    sum2 += s2[k];
  }
  const float inv_n = 1.0f / (float)n;
  const float mean_d = rms ? 0.0f : sum1 * inv_n;
  const float var = sum2 * inv_n - mean_d * mean_d;
  const float rstd = 1.0f / sqrtf((var > 0.0f ? var : 0.0f) + eps);
  const float mean = shift + mean_d;
  if (b != nullptr) {
    for (int64_t j = 0; j < n; j++) y[j] = (x[j] - mean) * rstd * w[j] + b[j];
  } else {
    for (int64_t j = 0; j < n; j++) y[j] = (x[j] - mean) * rstd * w[j];
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w; dw += dy * xhat, db += dy.
// `xhat` is scratch of n floats.
ML_CLONES void norm_row_backward(const float* dy, const float* x, const float* w, float mean,
                                 float rstd, float* dx, float* dw, float* db, float* xhat,
                                 float* g, int64_t n, bool rms) {
  for (int64_t j = 0; j < n; j++) {
    xhat[j] = (x[j] - mean) * rstd;
    g[j] = dy[j] * w[j];
  }
  float inv_n = 1.0f / (float)n;
  float mean_g = rms ? 0.0f : sum(g, n) * inv_n;
  float mean_gx = dot(g, xhat, n) * inv_n;
  for (int64_t j = 0; j < n; j++) {
    dx[j] = rstd * (g[j] - mean_g - xhat[j] * mean_gx);
    dw[j] += dy[j] * xhat[j];
  }
  if (db != nullptr)
    for (int64_t j = 0; j < n; j++) db[j] += dy[j];
}

bool valid_dtype(int d) { return d == ML_F32 || d == ML_F16 || d == ML_BF16; }

}  // namespace
}  // namespace ml

using namespace ml;

extern "C" int ml_cpu_norm_forward(int dtype, int rms, const void* x, const float* w,
                                   const float* b, void* y, float* mean, float* rstd, int64_t rows,
                                   int64_t cols, float eps, int num_threads) {
  if (!valid_dtype(dtype) || rows < 0 || cols <= 0) return ML_ERR_ARG;
  const float* bp = rms ? nullptr : b;
  size_t es = dtype_size(dtype);
  int nt = pick_threads(num_threads, rows * cols);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> xbuf(dtype == ML_F32 ? 0 : 2 * cols);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const char* xr = static_cast<const char*>(x) + r * cols * es;
      char* yr = static_cast<char*>(y) + r * cols * es;
      if (dtype == ML_F32) {
        norm_row_forward(reinterpret_cast<const float*>(xr), w, bp,
                         reinterpret_cast<float*>(yr), cols, eps, rms, &mean[r], &rstd[r]);
      } else {
        float *xf = xbuf.data(), *yf = xbuf.data() + cols;
        load_row(dtype, xr, xf, cols);
        norm_row_forward(xf, w, bp, yf, cols, eps, rms, &mean[r], &rstd[r]);
        store_row(dtype, yf, yr, cols);
      }
    }
  }
  return ML_OK;
}

extern "C" int ml_cpu_norm_backward(int dtype, int rms, const void* dy, const void* x,
                                    const float* w, const float* mean, const float* rstd, void* dx,
                                    float* dw, float* db, int64_t rows, int64_t cols,
                                    int num_threads) {
  if (!valid_dtype(dtype) || rows < 0 || cols <= 0) return ML_ERR_ARG;
  size_t es = dtype_size(dtype);
  int nt = pick_threads(num_threads, rows * cols);
  // Per-thread weight-gradient partials, summed in thread order: deterministic for a thread count.
  std::vector<float> partial((size_t)nt * cols * (db != nullptr ? 2 : 1), 0.0f);
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num();
    float* dw_t = partial.data() + (size_t)t * cols;
    float* db_t = db != nullptr ? partial.data() + ((size_t)nt + t) * cols : nullptr;
    std::vector<float> buf((dtype == ML_F32 ? 2 : 5) * cols);
    float *xhat = buf.data(), *g = xhat + cols;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const char* xr = static_cast<const char*>(x) + r * cols * es;
      const char* dyr = static_cast<const char*>(dy) + r * cols * es;
      char* dxr = static_cast<char*>(dx) + r * cols * es;
      if (dtype == ML_F32) {
        norm_row_backward(reinterpret_cast<const float*>(dyr), reinterpret_cast<const float*>(xr),
                          w, mean[r], rstd[r], reinterpret_cast<float*>(dxr), dw_t, db_t,
                          xhat, g, cols, rms);
      } else {
        float *xf = g + cols, *dyf = xf + cols, *dxf = dyf + cols;
        load_row(dtype, xr, xf, cols);
        load_row(dtype, dyr, dyf, cols);
        norm_row_backward(dyf, xf, w, mean[r], rstd[r], dxf, dw_t, db_t, xhat, g, cols,
                          rms);
        store_row(dtype, dxf, dxr, cols);
      }
    }
  }
  for (int64_t j = 0; j < cols; j++) {
    float s = 0.0f, sb = 0.0f;
    for (int t = 0; t < nt; t++) {
      s += partial[(size_t)t * cols + j];
      if (db != nullptr) sb += partial[((size_t)nt + t) * cols + j];
    }
    dw[j] = s;
    if (db != nullptr) db[j] = sb;
  }
  return ML_OK;
}
