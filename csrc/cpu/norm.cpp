// LayerNorm and RMSNorm on the CPU: rows split over OpenMP threads (contiguous blocks), statistics
// and weight gradients in fp32 whatever the activation dtype.
//
// One row loop per direction serves fp32 and bf16 rows, read and written 16 elements at a time as
// two fp32 vectors through Act<T> (act.h: GCC vector extensions, so every ISA clone gets explicit
// SIMD code; 4 independent accumulators = 32 lanes, since the auto-vectoriser does not vectorise
// fp32 reductions without -ffast-math). fp16 goes through fp32 row buffers (load_row/store_row).
// Each row is read from memory once: the second pass (normalise, or dx) re-reads it from cache.
// Large outputs are written with streaming stores (kStreamBytes).
#include <omp.h>

#include <vector>

#include "../megalite_kernels.h"
#include "act.h"
#include "simd.h"

namespace ml {
namespace {

// One 8-lane step of the row moments: s1 += d (skipped for RMSNorm), s2 += d^2.
template <bool RMS>
ML_INLINE void moments(v8f d, v8f& s1, v8f& s2) {
  if (!RMS) s1 += d;
  s2 += d * d;
}

// One 8-lane step of the backward's first pass, g = dy * w: sums of g (skipped for RMSNorm) and
// of g * xhat, dw += dy * xhat and (db != nullptr) db += dy.
template <bool RMS>
ML_INLINE void grad_sums(v8f d, v8f xh, const float* w, float* dw, float* db, v8f& sg, v8f& sx) {
  const v8f g = d * ldf(w);
  if (!RMS) sg += g;
  sx += g * xh;
  stf(dw, ldf(dw) + d * xh);
  if (db != nullptr) stf(db, ldf(db) + d);
}

// y = (x - mean) * rstd * w + b over rows [0, rows) (RMSNorm: mean = 0, no b), w and b in the
// activation type's order. One pass for the statistics, on data shifted by x[0] so that
// var = E[d^2] - E[d]^2 does not cancel catastrophically when |mean| >> std ("shifted data").
template <class T, bool RMS, bool NT>
ML_INLINE void forward_rows(const T* x, const float* w, const float* b, T* y, int64_t rows,
                            int64_t n, float eps, float* mean_out, float* rstd_out) {
  typedef Act<T> A;
  const float inv_n = 1.0f / (float)n;
  const bool bias = !RMS && b != nullptr;
  const int64_t n16 = n & ~(int64_t)15;
  for (int64_t r = 0; r < rows; r++, x += n, y += n) {
    const float shift = RMS ? 0.0f : A::load1(x);
    const v8f vs = splat(shift);
    v8f s1a = splat(0), s1b = s1a, s1c = s1a, s1d = s1a;
    v8f s2a = s1a, s2b = s1a, s2c = s1a, s2d = s1a;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      v8f d0, d1, d2, d3;
      A::load16(x + i, d0, d1);
      A::load16(x + i + 16, d2, d3);
      moments<RMS>(d0 - vs, s1a, s2a);
      moments<RMS>(d1 - vs, s1b, s2b);
      moments<RMS>(d2 - vs, s1c, s2c);
      moments<RMS>(d3 - vs, s1d, s2d);
    }
    if constexpr (A::kTail8)
      for (; i + 8 <= n; i += 8) moments<RMS>(ldf(x + i) - vs, s1a, s2a);
    float sum1 = 0.0f, sum2 = 0.0f;
    for (; i < n; i++) {
      float d = A::load1(x + i) - shift;
      sum1 += d;
      sum2 += d * d;
    }
    sum2 += hsum((s2a + s2b) + (s2c + s2d));
    float mean_d = 0.0f;
    if (!RMS) {
      sum1 += hsum((s1a + s1b) + (s1c + s1d));
      mean_d = sum1 * inv_n;
    }
    const float var = sum2 * inv_n - mean_d * mean_d;
    const float rstd = 1.0f / sqrtf((var > 0.0f ? var : 0.0f) + eps);
    const float mean = shift + mean_d;
    mean_out[r] = mean;
    rstd_out[r] = rstd;
    const v8f vm = splat(mean), vr = splat(rstd);
    for (i = 0; A::more16(i, n, n16); i += 16) {
      v8f lo, hi;
      A::load16(x + i, lo, hi);
      lo = ((lo - vm) * vr) * ldf(w + i);
      hi = ((hi - vm) * vr) * ldf(w + i + 8);
      if (bias) {
        lo += ldf(b + i);
        hi += ldf(b + i + 8);
      }
      A::template store16<NT>(y + i, lo, hi);
    }
    if constexpr (A::kTail8)
      for (; i + 8 <= n; i += 8) {
        v8f y0 = (ldf(x + i) - vm) * vr * ldf(w + i);
        if (bias) y0 += ldf(b + i);
        A::template store8<NT>(y + i, y0);
      }
    for (; i < n; i++) {
      float v = (A::load1(x + i) - mean) * rstd * w[i];
      if (bias) v += b[i];
      A::store1(y + i, v);
    }
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w; dw += dy * xhat, db += dy, with
// w, dw and db in the activation type's order. Pass 1 (one read of x, dy) gives both row
// reductions and the weight-gradient updates; pass 2 re-reads the row (now in cache) for dx.
template <class T, bool RMS, bool NT>
ML_INLINE void backward_rows(const T* dy, const T* x, const float* w, const float* mean,
                             const float* rstd, T* dx, float* dw, float* db, int64_t rows,
                             int64_t n) {
  typedef Act<T> A;
  const float inv_n = 1.0f / (float)n;
  const bool has_db = db != nullptr;
  const int64_t n16 = n & ~(int64_t)15;
  for (int64_t r = 0; r < rows; r++, x += n, dy += n, dx += n) {
    const float m = RMS ? 0.0f : mean[r], rs = rstd[r];
    const v8f vm = splat(m), vr = splat(rs);
    v8f sga = splat(0), sgb = sga, sxa = sga, sxb = sga;
    int64_t i = 0;
    for (; A::more16(i, n, n16); i += 16) {
      v8f d0, d1, x0, x1;
      A::load16(dy + i, d0, d1);
      A::load16(x + i, x0, x1);
      grad_sums<RMS>(d0, (x0 - vm) * vr, w + i, dw + i, has_db ? db + i : nullptr, sga, sxa);
      grad_sums<RMS>(d1, (x1 - vm) * vr, w + i + 8, dw + i + 8, has_db ? db + i + 8 : nullptr,
                     sgb, sxb);
    }
    if constexpr (A::kTail8)
      for (; i + 8 <= n; i += 8)
        grad_sums<RMS>(ldf(dy + i), (ldf(x + i) - vm) * vr, w + i, dw + i,
                       has_db ? db + i : nullptr, sga, sxa);
    float sg = 0.0f, sx = 0.0f;
    for (; i < n; i++) {
      float d = A::load1(dy + i), xh = (A::load1(x + i) - m) * rs, g = d * w[i];
      sg += g;
      sx += g * xh;
      dw[i] += d * xh;
      if (has_db) db[i] += d;
    }
    const float mean_g = RMS ? 0.0f : (sg + hsum(sga + sgb)) * inv_n;
    const float mean_gx = (sx + hsum(sxa + sxb)) * inv_n;
    const v8f vg = splat(mean_g), vgx = splat(mean_gx);
    for (i = 0; A::more16(i, n, n16); i += 16) {
      v8f d0, d1, x0, x1;
      A::load16(dy + i, d0, d1);
      A::load16(x + i, x0, x1);
      v8f xh0 = (x0 - vm) * vr, xh1 = (x1 - vm) * vr;
      v8f g0 = d0 * ldf(w + i), g1 = d1 * ldf(w + i + 8);
      A::template store16<NT>(dx + i, vr * (g0 - vg - xh0 * vgx), vr * (g1 - vg - xh1 * vgx));
    }
    if constexpr (A::kTail8)
      for (; i + 8 <= n; i += 8) {
        v8f xh = (ldf(x + i) - vm) * vr;
        v8f g = ldf(dy + i) * ldf(w + i);
        A::template store8<NT>(dx + i, vr * (g - vg - xh * vgx));
      }
    for (; i < n; i++) {
      float xh = (A::load1(x + i) - m) * rs, g = A::load1(dy + i) * w[i];
      A::store1(dx + i, rs * (g - mean_g - xh * mean_gx));
    }
  }
}

// One clone set per (activation type, rms) combination; each processes a block of contiguous
// rows. bf16: w (and b, dw, db) in perm16 order.
#define ML_NORM(FWD, BWD, T, RMS)                                                                \
  ML_CLONES void FWD(const void* x, const float* w, const float* b, void* y, int64_t rows,        \
                     int64_t n, float eps, float* mean, float* rstd, bool stream) {               \
    auto xs = static_cast<const T*>(x);                                                           \
    if (nt_ok(y, n * sizeof(T), stream))                                                          \
      forward_rows<T, RMS, true>(xs, w, b, static_cast<T*>(y), rows, n, eps, mean, rstd);         \
    else                                                                                          \
      forward_rows<T, RMS, false>(xs, w, b, static_cast<T*>(y), rows, n, eps, mean, rstd);        \
    nt_fence();                                                                                   \
  }                                                                                               \
  ML_CLONES void BWD(const void* dy, const void* x, const float* w, const float* mean,           \
                     const float* rstd, void* dx, float* dw, float* db, int64_t rows, int64_t n,  \
                     bool stream) {                                                               \
    auto dys = static_cast<const T*>(dy);                                                         \
    auto xs = static_cast<const T*>(x);                                                           \
    if (nt_ok(dx, n * sizeof(T), stream))                                                         \
      backward_rows<T, RMS, true>(dys, xs, w, mean, rstd, static_cast<T*>(dx), dw, db, rows, n);  \
    else                                                                                          \
      backward_rows<T, RMS, false>(dys, xs, w, mean, rstd, static_cast<T*>(dx), dw, db, rows, n); \
    nt_fence();                                                                                   \
  }
ML_NORM(fwd_f32_ln, bwd_f32_ln, float, false)
ML_NORM(fwd_f32_rms, bwd_f32_rms, float, true)
ML_NORM(fwd_bf16_ln, bwd_bf16_ln, uint16_t, false)
ML_NORM(fwd_bf16_rms, bwd_bf16_rms, uint16_t, true)
#undef ML_NORM

bool valid_dtype(int d) { return d == ML_F32 || d == ML_F16 || d == ML_BF16; }

// w then (b != nullptr) b, each in perm16 order: the bf16 kernels' parameters.
std::vector<float> permuted(const float* w, const float* b, int64_t cols) {
  const int64_t n16 = cols & ~(int64_t)15;
  std::vector<float> out(b != nullptr ? 2 * cols : cols);
  for (int64_t j = 0; j < cols; j++) out[j] = w[perm16(j, n16)];
  if (b != nullptr)
    for (int64_t j = 0; j < cols; j++) out[cols + j] = b[perm16(j, n16)];
  return out;
}

// The rows [r0, r1) of OpenMP thread t out of n_t: contiguous blocks, in thread order.
#define ML_ROW_BLOCK(rows)                                             \
  const int t = omp_get_thread_num(), n_t = omp_get_num_threads();     \
  const int64_t r0 = (rows) * t / n_t, r1 = (rows) * (t + 1) / n_t

}  // namespace
}  // namespace ml

using namespace ml;

extern "C" int ml_cpu_norm_forward(int dtype, int rms, const void* x, const float* w,
                                   const float* b, void* y, float* mean, float* rstd, int64_t rows,
                                   int64_t cols, float eps, int num_threads) {
  if (!valid_dtype(dtype) || rows < 0 || cols <= 0) return ML_ERR_ARG;
  const float* bp = rms ? nullptr : b;
  const size_t row_bytes = cols * dtype_size(dtype);
  const int nt = pick_threads(num_threads, rows * cols);
  const bool stream = (size_t)rows * row_bytes >= kStreamBytes;
  auto fwd = dtype == ML_BF16 ? (rms ? fwd_bf16_rms : fwd_bf16_ln)
                              : (rms ? fwd_f32_rms : fwd_f32_ln);
#pragma omp parallel num_threads(nt)
  {
    ML_ROW_BLOCK(rows);
    const char* xr = static_cast<const char*>(x) + r0 * row_bytes;
    char* yr = static_cast<char*>(y) + r0 * row_bytes;
    if (dtype == ML_F32) {
      fwd(xr, w, bp, yr, r1 - r0, cols, eps, mean + r0, rstd + r0, stream);
    } else if (dtype == ML_BF16) {  // weights in the kernel's lane order
      const std::vector<float> wb = permuted(w, bp, cols);
      fwd(xr, wb.data(), bp != nullptr ? wb.data() + cols : nullptr, yr, r1 - r0, cols, eps,
          mean + r0, rstd + r0, stream);
    } else {  // fp16: through fp32 row buffers
      std::vector<float> buf(2 * cols);
      float *xf = buf.data(), *yf = xf + cols;
      for (int64_t r = r0; r < r1; r++, xr += row_bytes, yr += row_bytes) {
        load_row(dtype, xr, xf, cols);
        fwd(xf, w, bp, yf, 1, cols, eps, mean + r, rstd + r, false);
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
  const size_t row_bytes = cols * dtype_size(dtype);
  const int nt = pick_threads(num_threads, rows * cols);
  const bool stream = (size_t)rows * row_bytes >= kStreamBytes;
  auto bwd = dtype == ML_BF16 ? (rms ? bwd_bf16_rms : bwd_bf16_ln)
                              : (rms ? bwd_f32_rms : bwd_f32_ln);
  // Per-thread weight-gradient partials (each thread owns a contiguous block of rows), summed in
  // thread order: deterministic for a thread count.
  std::vector<float> partial((size_t)nt * cols * (db != nullptr ? 2 : 1), 0.0f);
#pragma omp parallel num_threads(nt)
  {
    ML_ROW_BLOCK(rows);
    float* dw_t = partial.data() + (size_t)t * cols;
    float* db_t = db != nullptr ? partial.data() + ((size_t)nt + t) * cols : nullptr;
    const char* xr = static_cast<const char*>(x) + r0 * row_bytes;
    const char* dyr = static_cast<const char*>(dy) + r0 * row_bytes;
    char* dxr = static_cast<char*>(dx) + r0 * row_bytes;
    if (dtype == ML_F32) {
      bwd(dyr, xr, w, mean + r0, rstd + r0, dxr, dw_t, db_t, r1 - r0, cols, stream);
    } else if (dtype == ML_BF16) {  // weights and partials in the kernel's lane order
      const std::vector<float> wp = permuted(w, nullptr, cols);
      bwd(dyr, xr, wp.data(), mean + r0, rstd + r0, dxr, dw_t, db_t, r1 - r0, cols, stream);
    } else {  // fp16: through fp32 row buffers
      std::vector<float> buf(3 * cols);
      float *xf = buf.data(), *dyf = xf + cols, *dxf = dyf + cols;
      for (int64_t r = r0; r < r1; r++, xr += row_bytes, dyr += row_bytes, dxr += row_bytes) {
        load_row(dtype, xr, xf, cols);
        load_row(dtype, dyr, dyf, cols);
        bwd(dyf, xf, w, mean + r, rstd + r, dxf, dw_t, db_t, 1, cols, false);
        store_row(dtype, dxf, dxr, cols);
      }
    }
  }
  const int64_t n16 = cols & ~(int64_t)15;
  for (int64_t j = 0; j < cols; j++) {
    float s = 0.0f, sb = 0.0f;
    const int64_t k = dtype == ML_BF16 ? perm16(j, n16) : j;
    for (int t = 0; t < nt; t++) {
      s += partial[(size_t)t * cols + k];
      if (db != nullptr) sb += partial[((size_t)nt + t) * cols + k];
    }
    dw[j] = s;
    if (db != nullptr) db[j] = sb;
  }
  return ML_OK;
}
