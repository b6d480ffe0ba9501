// LayerNorm and RMSNorm on the CPU: rows split over OpenMP threads (contiguous blocks), statistics
// and weight gradients in fp32 whatever the activation dtype.
//
// The row loops are written with GCC vector extensions (8 floats per vector, 4 independent
// accumulators = 32 lanes), so every ISA clone gets explicit SIMD code instead of relying on the
// auto-vectoriser (which does not vectorise fp32 reductions without -ffast-math). bf16 rows are
// converted to and from fp32 in registers, inside the same loops (forward_rows_bf16 /
// backward_rows_bf16); fp16 goes through fp32 row buffers (load_row/store_row). Each row is
// read from memory once: the second pass (normalise, or dx) re-reads it from cache. Large
// outputs are written with streaming stores (kStreamBytes).
#include <omp.h>

#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#define ML_HAVE_NT 1
#else
#define ML_HAVE_NT 0
#endif

#include "../megalite_kernels.h"
#include "simd.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector types only cross always_inline helpers

namespace ml {
namespace {

#define ML_INLINE inline __attribute__((always_inline))

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

ML_INLINE v8f splat(float s) { return v8f{s, s, s, s, s, s, s, s}; }

ML_INLINE v8f ldf(const float* p) {
  v8f v;
  memcpy(&v, p, sizeof v);
  return v;
}
ML_INLINE void stf(float* p, v8f v) { memcpy(p, &v, sizeof v); }

// Activation rows: float or bf16 (uint16_t); loads and stores convert to and from fp32.
// forward_rows / backward_rows are instantiated for float only (fp16 goes through fp32 buffers).
template <bool BF>
struct Act;
template <>
struct Act<false> {
  typedef float T;
  static ML_INLINE v8f load(const T* p) { return ldf(p); }
  static ML_INLINE float load1(const T* p) { return *p; }
  static ML_INLINE void store(T* p, v8f v) { stf(p, v); }
  static ML_INLINE void store_nt(T* p, v8f v) {  // p 16-byte aligned
#if ML_HAVE_NT
    __m128 lo, hi;
    memcpy(&lo, &v, 16);
    memcpy(&hi, reinterpret_cast<const char*>(&v) + 16, 16);
    _mm_stream_ps(p, lo);
    _mm_stream_ps(p + 4, hi);
#else
    stf(p, v);
#endif
  }
  static ML_INLINE void store1(T* p, float v) { *p = v; }
};
template <>
struct Act<true> {  // scalar tails only: the bf16 vector loops are below (bf16_load2 / bf16_store2)
  typedef uint16_t T;
  static ML_INLINE float load1(const T* p) { return bf16_to_float(*p); }
  static ML_INLINE void store1(T* p, float v) { *p = float_to_bf16(v); }
};

ML_INLINE float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// y = (x - mean) * rstd * w + b over rows [0, rows) (RMSNorm: mean = 0, no b).
// One pass for the statistics, on data shifted by x[0] so that var = E[d^2] - E[d]^2 does not
// cancel catastrophically when |mean| >> std (the "shifted data" algorithm).
template <bool BF, bool RMS, bool NT>
ML_INLINE void forward_rows(const typename Act<BF>::T* x, const float* w, const float* b,
                            typename Act<BF>::T* y, int64_t rows, int64_t n, float eps,
                            float* mean_out, float* rstd_out) {
  typedef Act<BF> A;
  const float inv_n = 1.0f / (float)n;
  for (int64_t r = 0; r < rows; r++, x += n, y += n) {
    const float shift = RMS ? 0.0f : A::load1(x);
    const v8f vs = splat(shift);
    v8f s1a = splat(0), s1b = s1a, s1c = s1a, s1d = s1a;
    v8f s2a = s1a, s2b = s1a, s2c = s1a, s2d = s1a;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      v8f d0 = A::load(x + i) - vs, d1 = A::load(x + i + 8) - vs;
      v8f d2 = A::load(x + i + 16) - vs, d3 = A::load(x + i + 24) - vs;
      if (!RMS) {
        s1a += d0;
        s1b += d1;
        s1c += d2;
        s1d += d3;
      }
      s2a += d0 * d0;
      s2b += d1 * d1;
      s2c += d2 * d2;
      s2d += d3 * d3;
    }
    for (; i + 8 <= n; i += 8) {
      v8f d = A::load(x + i) - vs;
      if (!RMS) s1a += d;
      s2a += d * d;
    }
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
    i = 0;
    for (; i + 16 <= n; i += 16) {
      v8f y0, y1;
      if (!RMS && b != nullptr) {  // fused multiply-add with the bias
        y0 = ((A::load(x + i) - vm) * vr) * ldf(w + i) + ldf(b + i);
        y1 = ((A::load(x + i + 8) - vm) * vr) * ldf(w + i + 8) + ldf(b + i + 8);
      } else {
        y0 = (A::load(x + i) - vm) * vr * ldf(w + i);
        y1 = (A::load(x + i + 8) - vm) * vr * ldf(w + i + 8);
      }
      if (NT) {
        A::store_nt(y + i, y0);
        A::store_nt(y + i + 8, y1);
      } else {
        A::store(y + i, y0);
        A::store(y + i + 8, y1);
      }
    }
    for (; i + 8 <= n; i += 8) {
      v8f y0 = (A::load(x + i) - vm) * vr * ldf(w + i);
      if (!RMS && b != nullptr) y0 += ldf(b + i);
      if (NT)
        A::store_nt(y + i, y0);
      else
        A::store(y + i, y0);
    }
    for (; i < n; i++) {
      float v = (A::load1(x + i) - mean) * rstd * w[i];
      if (!RMS && b != nullptr) v += b[i];
      A::store1(y + i, v);
    }
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w; dw += dy * xhat, db += dy.
// Pass 1 (one read of x, dy) gives both row reductions and the weight-gradient updates; pass 2
// re-reads the row (now in cache) for dx.
template <bool BF, bool RMS, bool NT>
ML_INLINE void backward_rows(const typename Act<BF>::T* dy, const typename Act<BF>::T* x,
                             const float* w, const float* mean, const float* rstd,
                             typename Act<BF>::T* dx, float* dw, float* db, int64_t rows,
                             int64_t n) {
  typedef Act<BF> A;
  const float inv_n = 1.0f / (float)n;
  const bool has_db = db != nullptr;
  for (int64_t r = 0; r < rows; r++, x += n, dy += n, dx += n) {
    const float m = RMS ? 0.0f : mean[r], rs = rstd[r];
    const v8f vm = splat(m), vr = splat(rs);
    v8f sga = splat(0), sgb = sga, sxa = sga, sxb = sga;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      v8f d0 = A::load(dy + i), d1 = A::load(dy + i + 8);
      v8f xh0 = (A::load(x + i) - vm) * vr, xh1 = (A::load(x + i + 8) - vm) * vr;
      v8f g0 = d0 * ldf(w + i), g1 = d1 * ldf(w + i + 8);
      if (!RMS) {
        sga += g0;
        sgb += g1;
      }
      sxa += g0 * xh0;
      sxb += g1 * xh1;
      stf(dw + i, ldf(dw + i) + d0 * xh0);
      stf(dw + i + 8, ldf(dw + i + 8) + d1 * xh1);
      if (has_db) {
        stf(db + i, ldf(db + i) + d0);
        stf(db + i + 8, ldf(db + i + 8) + d1);
      }
    }
    for (; i + 8 <= n; i += 8) {
      v8f d0 = A::load(dy + i);
      v8f xh0 = (A::load(x + i) - vm) * vr;
      v8f g0 = d0 * ldf(w + i);
      if (!RMS) sga += g0;
      sxa += g0 * xh0;
      stf(dw + i, ldf(dw + i) + d0 * xh0);
      if (has_db) stf(db + i, ldf(db + i) + d0);
    }
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
    i = 0;
    for (; i + 8 <= n; i += 8) {
      v8f xh = (A::load(x + i) - vm) * vr;
      v8f g = A::load(dy + i) * ldf(w + i);
      if (NT)
        A::store_nt(dx + i, vr * (g - vg - xh * vgx));
      else
        A::store(dx + i, vr * (g - vg - xh * vgx));
    }
    for (; i < n; i++) {
      float xh = (A::load1(x + i) - m) * rs, g = A::load1(dy + i) * w[i];
      A::store1(dx + i, rs * (g - mean_g - xh * mean_gx));
    }
  }
}

// bf16 rows, 16 elements at a time as two fp32 vectors in a lane-interleaved order: `lo` holds
// elements 0-3 and 8-11, `hi` elements 4-7 and 12-15 (the order of a per-128-bit-lane unpack and
// of the inverse per-lane pack, one instruction each), so that widening and narrowing cost one
// shuffle per vector. Weights, biases and weight-gradient partials are kept in the same order
// (perm16 below); the reductions do not care about order.
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef int16_t v16s __attribute__((vector_size(32)));

inline int64_t perm16(int64_t j, int64_t n16) {  // an involution
  if (j >= n16) return j;
  int64_t k = j & 15;
  return (j & ~(int64_t)15) | ((k >= 4 && k < 12) ? (k ^ 12) : k);
}

ML_INLINE void bf16_load2(const uint16_t* p, v8f& lo, v8f& hi) {
  v16h h, z = {0};
  memcpy(&h, p, sizeof h);
  lo = (v8f)__builtin_shufflevector(z, h, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27);
  hi = (v8f)__builtin_shufflevector(z, h, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15,
                                    31);
}

ML_INLINE v8i bf16_round(v8f v) {  // bf16 bits in the high half (as a signed 32-bit value)
  v8i u = (v8i)v;
  v8i rounded = (v8i)(((v8u)u + 0x7fffu + (((v8u)u >> 16) & 1u)));
  v8i nan = (v8i)(v != v);
  return ((u | 0x400000) & nan) | (rounded & ~nan);
}

template <bool NT>
ML_INLINE void bf16_store2(uint16_t* p, v8f lo, v8f hi) {
  v8i a = bf16_round(lo) >> 16, b = bf16_round(hi) >> 16;  // arithmetic: fits int16 exactly
  v16s h = __builtin_shufflevector((v16s)a, (v16s)b, 0, 2, 4, 6, 16, 18, 20, 22, 8, 10, 12, 14, 24,
                                   26, 28, 30);
#if ML_HAVE_NT
  if (NT) {
    __m128i q0, q1;
    memcpy(&q0, &h, 16);
    memcpy(&q1, reinterpret_cast<const char*>(&h) + 16, 16);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), q0);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p + 8), q1);
    return;
  }
#endif
  memcpy(p, &h, sizeof h);
}

// forward_rows for bf16 with permuted weights `wp` and biases `bp` (nullptr: none).
template <bool RMS, bool NT>
ML_INLINE void forward_rows_bf16(const uint16_t* x, const float* wp, const float* bp, uint16_t* y,
                                 int64_t rows, int64_t n, float eps, float* mean_out,
                                 float* rstd_out) {
  typedef Act<true> A;
  const float inv_n = 1.0f / (float)n;
  const int64_t n16 = n & ~(int64_t)15;
  for (int64_t r = 0; r < rows; r++, x += n, y += n) {
    const float shift = RMS ? 0.0f : A::load1(x);
    const v8f vs = splat(shift);
    v8f s1a = splat(0), s1b = s1a, s1c = s1a, s1d = s1a;
    v8f s2a = s1a, s2b = s1a, s2c = s1a, s2d = s1a;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      v8f d0, d1, d2, d3;
      bf16_load2(x + i, d0, d1);
      bf16_load2(x + i + 16, d2, d3);
      d0 -= vs;
      d1 -= vs;
      d2 -= vs;
      d3 -= vs;
      if (!RMS) {
        s1a += d0;
        s1b += d1;
        s1c += d2;
        s1d += d3;
      }
      s2a += d0 * d0;
      s2b += d1 * d1;
      s2c += d2 * d2;
      s2d += d3 * d3;
    }
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
    for (i = 0; i < n16; i += 16) {
      v8f lo, hi;
      bf16_load2(x + i, lo, hi);
      lo = ((lo - vm) * vr) * ldf(wp + i);
      hi = ((hi - vm) * vr) * ldf(wp + i + 8);
      if (!RMS && bp != nullptr) {
        lo += ldf(bp + i);
        hi += ldf(bp + i + 8);
      }
      bf16_store2<NT>(y + i, lo, hi);
    }
    for (; i < n; i++) {
      float v = (A::load1(x + i) - mean) * rstd * wp[i];
      if (!RMS && bp != nullptr) v += bp[i];
      A::store1(y + i, v);
    }
  }
}

// backward_rows for bf16: weights `wp` and the gradient partials dw, db in the permuted order.
template <bool RMS, bool NT>
ML_INLINE void backward_rows_bf16(const uint16_t* dy, const uint16_t* x, const float* wp,
                                  const float* mean, const float* rstd, uint16_t* dx, float* dw,
                                  float* db, int64_t rows, int64_t n) {
  typedef Act<true> A;
  const float inv_n = 1.0f / (float)n;
  const int64_t n16 = n & ~(int64_t)15;
  const bool has_db = db != nullptr;
  for (int64_t r = 0; r < rows; r++, x += n, dy += n, dx += n) {
    const float m = RMS ? 0.0f : mean[r], rs = rstd[r];
    const v8f vm = splat(m), vr = splat(rs);
    v8f sga = splat(0), sgb = sga, sxa = sga, sxb = sga;
    int64_t i = 0;
    for (; i < n16; i += 16) {
      v8f d0, d1, x0, x1;
      bf16_load2(dy + i, d0, d1);
      bf16_load2(x + i, x0, x1);
      v8f xh0 = (x0 - vm) * vr, xh1 = (x1 - vm) * vr;
      v8f g0 = d0 * ldf(wp + i), g1 = d1 * ldf(wp + i + 8);
      if (!RMS) {
        sga += g0;
        sgb += g1;
      }
      sxa += g0 * xh0;
      sxb += g1 * xh1;
      stf(dw + i, ldf(dw + i) + d0 * xh0);
      stf(dw + i + 8, ldf(dw + i + 8) + d1 * xh1);
      if (has_db) {
        stf(db + i, ldf(db + i) + d0);
        stf(db + i + 8, ldf(db + i + 8) + d1);
      }
    }
    float sg = 0.0f, sx = 0.0f;
    for (; i < n; i++) {
      float d = A::load1(dy + i), xh = (A::load1(x + i) - m) * rs, g = d * wp[i];
      sg += g;
      sx += g * xh;
      dw[i] += d * xh;
      if (has_db) db[i] += d;
    }
    const float mean_g = RMS ? 0.0f : (sg + hsum(sga + sgb)) * inv_n;
    const float mean_gx = (sx + hsum(sxa + sxb)) * inv_n;
    const v8f vg = splat(mean_g), vgx = splat(mean_gx);
    for (i = 0; i < n16; i += 16) {
      v8f d0, d1, x0, x1;
      bf16_load2(dy + i, d0, d1);
      bf16_load2(x + i, x0, x1);
      v8f xh0 = (x0 - vm) * vr, xh1 = (x1 - vm) * vr;
      v8f g0 = d0 * ldf(wp + i), g1 = d1 * ldf(wp + i + 8);
      bf16_store2<NT>(dx + i, vr * (g0 - vg - xh0 * vgx), vr * (g1 - vg - xh1 * vgx));
    }
    for (; i < n; i++) {
      float xh = (A::load1(x + i) - m) * rs, g = A::load1(dy + i) * wp[i];
      A::store1(dx + i, rs * (g - mean_g - xh * mean_gx));
    }
  }
}

// Non-temporal (streaming) stores of the output when the whole output (`stream`: at least
// kStreamBytes) is too big to be still cached when the next op reads it: no read-for-ownership of
// the destination lines, which would otherwise be a third of the memory traffic. Needs every row
// start 16-byte aligned. 32 MiB: as large as a typical server last-level cache, so an output the
// next op could still find in cache is written normally.
constexpr size_t kStreamBytes = size_t(32) << 20;
ML_INLINE bool nt_ok(const void* out, size_t row_bytes, bool stream) {
  return ML_HAVE_NT && stream && row_bytes % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out) % 16 == 0;
}
ML_INLINE void nt_fence() {
#if ML_HAVE_NT
  _mm_sfence();
#endif
}

// One clone set per (dtype, rms) combination; each processes a block of contiguous rows.
#define ML_FWD(NAME, BF, RMS)                                                                 \
  ML_CLONES void NAME(const void* x, const float* w, const float* b, void* y, int64_t rows,   \
                      int64_t n, float eps, float* mean, float* rstd, bool stream) {                        \
    if (nt_ok(y, n * sizeof(Act<BF>::T), stream))                                              \
      forward_rows<BF, RMS, true>(static_cast<const Act<BF>::T*>(x), w, b,                     \
                                  static_cast<Act<BF>::T*>(y), rows, n, eps, mean, rstd);      \
    else                                                                                       \
      forward_rows<BF, RMS, false>(static_cast<const Act<BF>::T*>(x), w, b,                    \
                                   static_cast<Act<BF>::T*>(y), rows, n, eps, mean, rstd);     \
    nt_fence();                                                                                \
  }
ML_FWD(fwd_f32_ln, false, false)
ML_FWD(fwd_f32_rms, false, true)
#undef ML_FWD
// bf16: w and b already permuted (perm16)
#define ML_FWD16(NAME, RMS)                                                                   \
  ML_CLONES void NAME(const void* x, const float* w, const float* b, void* y, int64_t rows,   \
                      int64_t n, float eps, float* mean, float* rstd, bool stream) {                        \
    const uint16_t* xs = static_cast<const uint16_t*>(x);                                      \
    uint16_t* ys = static_cast<uint16_t*>(y);                                                  \
    if (nt_ok(y, n * 2, stream))                                                                 \
      forward_rows_bf16<RMS, true>(xs, w, b, ys, rows, n, eps, mean, rstd);                    \
    else                                                                                       \
      forward_rows_bf16<RMS, false>(xs, w, b, ys, rows, n, eps, mean, rstd);                   \
    nt_fence();                                                                                \
  }
ML_FWD16(fwd_bf16_ln, false)
ML_FWD16(fwd_bf16_rms, true)
#undef ML_FWD16

#define ML_BWD(NAME, BF, RMS)                                                                  \
  ML_CLONES void NAME(const void* dy, const void* x, const float* w, const float* mean,        \
                      const float* rstd, void* dx, float* dw, float* db, int64_t rows,         \
                      int64_t n, bool stream) {                                                             \
    if (nt_ok(dx, n * sizeof(Act<BF>::T), stream))                                             \
      backward_rows<BF, RMS, true>(static_cast<const Act<BF>::T*>(dy),                         \
                                   static_cast<const Act<BF>::T*>(x), w, mean, rstd,           \
                                   static_cast<Act<BF>::T*>(dx), dw, db, rows, n);             \
    else                                                                                       \
      backward_rows<BF, RMS, false>(static_cast<const Act<BF>::T*>(dy),                        \
                                    static_cast<const Act<BF>::T*>(x), w, mean, rstd,          \
                                    static_cast<Act<BF>::T*>(dx), dw, db, rows, n);            \
    nt_fence();                                                                                \
  }
ML_BWD(bwd_f32_ln, false, false)
ML_BWD(bwd_f32_rms, false, true)
#undef ML_BWD
// bf16: w, dw and db permuted (perm16)
#define ML_BWD16(NAME, RMS)                                                                    \
  ML_CLONES void NAME(const void* dy, const void* x, const float* w, const float* mean,        \
                      const float* rstd, void* dx, float* dw, float* db, int64_t rows,         \
                      int64_t n, bool stream) {                                                             \
    const uint16_t* dys = static_cast<const uint16_t*>(dy);                                    \
    const uint16_t* xs = static_cast<const uint16_t*>(x);                                      \
    uint16_t* dxs = static_cast<uint16_t*>(dx);                                                \
    if (nt_ok(dx, n * 2, stream))                                                                \
      backward_rows_bf16<RMS, true>(dys, xs, w, mean, rstd, dxs, dw, db, rows, n);             \
    else                                                                                       \
      backward_rows_bf16<RMS, false>(dys, xs, w, mean, rstd, dxs, dw, db, rows, n);            \
    nt_fence();                                                                                \
  }
ML_BWD16(bwd_bf16_ln, false)
ML_BWD16(bwd_bf16_rms, true)
#undef ML_BWD16

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
  const bool stream = (size_t)rows * cols * es >= kStreamBytes;
  auto fwd = dtype == ML_BF16 ? (rms ? fwd_bf16_rms : fwd_bf16_ln)
                              : (rms ? fwd_f32_rms : fwd_f32_ln);
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num(), n_t = omp_get_num_threads();
    int64_t r0 = rows * t / n_t, r1 = rows * (t + 1) / n_t;
    const char* xr = static_cast<const char*>(x) + r0 * cols * es;
    char* yr = static_cast<char*>(y) + r0 * cols * es;
    if (dtype == ML_F32) {
      fwd(xr, w, bp, yr, r1 - r0, cols, eps, mean + r0, rstd + r0, stream);
    } else if (dtype == ML_BF16) {  // weights in the kernel's lane order
      const int64_t n16 = cols & ~(int64_t)15;
      std::vector<float> wb(bp != nullptr ? 2 * cols : cols);
      for (int64_t j = 0; j < cols; j++) wb[j] = w[perm16(j, n16)];
      if (bp != nullptr)
        for (int64_t j = 0; j < cols; j++) wb[cols + j] = bp[perm16(j, n16)];
      fwd(xr, wb.data(), bp != nullptr ? wb.data() + cols : nullptr, yr, r1 - r0, cols, eps,
          mean + r0, rstd + r0, stream);
    } else {  // fp16: through fp32 row buffers
      std::vector<float> xbuf(2 * cols);
      float *xf = xbuf.data(), *yf = xbuf.data() + cols;
      for (int64_t r = r0; r < r1; r++, xr += cols * es, yr += cols * es) {
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
  size_t es = dtype_size(dtype);
  int nt = pick_threads(num_threads, rows * cols);
  const int64_t n16 = cols & ~(int64_t)15;
  const bool stream = (size_t)rows * cols * es >= kStreamBytes;
  auto bwd = dtype == ML_BF16 ? (rms ? bwd_bf16_rms : bwd_bf16_ln)
                              : (rms ? bwd_f32_rms : bwd_f32_ln);
  // Per-thread weight-gradient partials (each thread owns a contiguous block of rows), summed in
  // thread order: deterministic for a thread count.
  std::vector<float> partial((size_t)nt * cols * (db != nullptr ? 2 : 1), 0.0f);
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num(), n_t = omp_get_num_threads();
    int64_t r0 = rows * t / n_t, r1 = rows * (t + 1) / n_t;
    float* dw_t = partial.data() + (size_t)t * cols;
    float* db_t = db != nullptr ? partial.data() + ((size_t)nt + t) * cols : nullptr;
    const char* xr = static_cast<const char*>(x) + r0 * cols * es;
    const char* dyr = static_cast<const char*>(dy) + r0 * cols * es;
    char* dxr = static_cast<char*>(dx) + r0 * cols * es;
    if (dtype == ML_F32) {
      bwd(dyr, xr, w, mean + r0, rstd + r0, dxr, dw_t, db_t, r1 - r0, cols, stream);
    } else if (dtype == ML_BF16) {  // weights and partials in the kernel's lane order
      std::vector<float> wp(cols);
      for (int64_t j = 0; j < cols; j++) wp[j] = w[perm16(j, n16)];
      bwd(dyr, xr, wp.data(), mean + r0, rstd + r0, dxr, dw_t, db_t, r1 - r0, cols, stream);
    } else {  // fp16: through fp32 row buffers
      std::vector<float> buf(3 * cols);
      float *xf = buf.data(), *dyf = xf + cols, *dxf = dyf + cols;
      for (int64_t r = r0; r < r1; r++, xr += cols * es, dyr += cols * es, dxr += cols * es) {
        load_row(dtype, xr, xf, cols);
        load_row(dtype, dyr, dyf, cols);
        bwd(dyf, xf, w, mean + r, rstd + r, dxf, dw_t, db_t, 1, cols, false);
        store_row(dtype, dxf, dxr, cols);
      }
    }
  }
  for (int64_t j = 0; j < cols; j++) {
    float s = 0.0f, sb = 0.0f;
    int64_t k = dtype == ML_BF16 ? perm16(j, n16) : j;
    for (int t = 0; t < nt; t++) {
      s += partial[(size_t)t * cols + k];
      if (db != nullptr) sb += partial[((size_t)nt + t) * cols + k];
    }
    dw[j] = s;
    if (db != nullptr) db[j] = sb;
  }
  return ML_OK;
}
