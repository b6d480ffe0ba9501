// Activation rows as fp32 vectors for the CPU norm kernels (GCC vector extensions: 8 floats per
// vector, so every ISA clone gets explicit SIMD code). Act<T> loads 16 elements of a row as two
// fp32 vectors and stores them back: fp32 as is, bf16 converted in registers in a lane-interleaved
// order (perm16). Streaming (non-temporal) stores for outputs too large to stay cached.
#pragma once
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#define ML_HAVE_NT 1
#else
#define ML_HAVE_NT 0
#endif

#include "simd.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector types only cross always_inline helpers

namespace ml {

#define ML_INLINE inline __attribute__((always_inline))

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef int16_t v16s __attribute__((vector_size(32)));

ML_INLINE v8f splat(float s) { return v8f{s, s, s, s, s, s, s, s}; }

ML_INLINE v8f ldf(const float* p) {
  v8f v;
  memcpy(&v, p, sizeof v);
  return v;
}
ML_INLINE void stf(float* p, v8f v) { memcpy(p, &v, sizeof v); }

ML_INLINE float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// 32 bytes to p (16-byte aligned), with streaming stores when NT.
template <bool NT>
ML_INLINE void store32(void* p, const void* v) {
#if ML_HAVE_NT
  if (NT) {
    _mm_stream_si128(static_cast<__m128i*>(p), _mm_loadu_si128(static_cast<const __m128i*>(v)));
    _mm_stream_si128(static_cast<__m128i*>(p) + 1,
                     _mm_loadu_si128(static_cast<const __m128i*>(v) + 1));
    return;
  }
#endif
  memcpy(p, v, 32);
}

// Activation rows. load16 gives 16 elements as two fp32 vectors and store16 is its inverse, in
// an element order of the type's own: weights and weight-gradient partials are kept in that order
// by the caller (the reductions do not care). more16(i, n, n16): whether a 16-element step fits at
// i (n16 = n rounded down to 16; each type keeps the loop test the compiler did best with).
// kTail8: fp32 rows also take 8-element steps between the 16-element loop and the scalar tail.
template <class T>
struct Act;

template <>
struct Act<float> {
  static constexpr bool kTail8 = true;
  static ML_INLINE bool more16(int64_t i, int64_t n, int64_t) { return i + 16 <= n; }
  static ML_INLINE float load1(const float* p) { return *p; }
  static ML_INLINE void store1(float* p, float v) { *p = v; }
  static ML_INLINE void load16(const float* p, v8f& lo, v8f& hi) {
    lo = ldf(p);
    hi = ldf(p + 8);
  }
  template <bool NT>
  static ML_INLINE void store8(float* p, v8f v) { store32<NT>(p, &v); }
  template <bool NT>
  static ML_INLINE void store16(float* p, v8f lo, v8f hi) {
    store32<NT>(p, &lo);
    store32<NT>(p + 8, &hi);
  }
};

// bf16: `lo` holds elements 0-3 and 8-11, `hi` elements 4-7 and 12-15 (the order of a
// per-128-bit-lane unpack and of the inverse per-lane pack, one instruction each), so that
// widening and narrowing cost one shuffle per vector.
template <>
struct Act<uint16_t> {
  static constexpr bool kTail8 = false;
  static ML_INLINE bool more16(int64_t i, int64_t, int64_t n16) { return i < n16; }
  static ML_INLINE float load1(const uint16_t* p) { return bf16_to_float(*p); }
  static ML_INLINE void store1(uint16_t* p, float v) { *p = float_to_bf16(v); }
  static ML_INLINE void load16(const uint16_t* p, v8f& lo, v8f& hi) {
    v16h h, z = {0};
    memcpy(&h, p, sizeof h);
    lo = (v8f)__builtin_shufflevector(z, h, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11,
                                      27);
    hi = (v8f)__builtin_shufflevector(z, h, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30,
                                      15, 31);
  }
  static ML_INLINE v8i round(v8f v) {  // bf16 bits in the high half (as a signed 32-bit value)
    v8i u = (v8i)v;
    v8i rounded = (v8i)(((v8u)u + 0x7fffu + (((v8u)u >> 16) & 1u)));
    v8i nan = (v8i)(v != v);
    return ((u | 0x400000) & nan) | (rounded & ~nan);
  }
  template <bool NT>
  static ML_INLINE void store16(uint16_t* p, v8f lo, v8f hi) {
    v8i a = round(lo) >> 16, b = round(hi) >> 16;  // arithmetic: fits int16 exactly
    v16s h = __builtin_shufflevector((v16s)a, (v16s)b, 0, 2, 4, 6, 16, 18, 20, 22, 8, 10, 12, 14,
                                     24, 26, 28, 30);
    store32<NT>(p, &h);
  }
};

// Where element j of a bf16 row sits in load16's order (the first n16 elements are loaded 16 at a
// time; an involution).
inline int64_t perm16(int64_t j, int64_t n16) {
  if (j >= n16) return j;
  int64_t k = j & 15;
  return (j & ~(int64_t)15) | ((k >= 4 && k < 12) ? (k ^ 12) : k);
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

}  // namespace ml
