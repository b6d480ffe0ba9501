// Helpers for the CPU kernels: run-time ISA selection, dtype conversion, a vectorisable exp and
// fp32 reductions written so GCC vectorises them (with -fno-trapping-math, see setup.py) and
// without -ffast-math, which would break the -inf of masked softmax entries.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

// One copy of each hot row function per ISA level, chosen at load time by the dynamic loader
// (GCC function multi-versioning). Never -march=native: the wheel must run on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ML_NO_CLONES)
#define ML_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ML_CLONES
#endif

namespace ml {

constexpr int kLanes = 32;  // independent accumulators: two AVX-512 or four AVX2 registers

inline float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40u) : (uint16_t)rounded;
}

#if defined(__FLT16_MAX__) && !defined(ML_SOFT_F16)
inline float f16_to_float(uint16_t h) {
  _Float16 v;
  memcpy(&v, &h, 2);
  return (float)v;
}
inline uint16_t float_to_f16(float f) {
  _Float16 v = (_Float16)f;
  uint16_t h;
  memcpy(&h, &v, 2);
  return h;
}
#else  // portable bit manipulation (exact half -> float; round to nearest even float -> half)
inline float f16_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do { man <<= 1; e++; } while (!(man & 0x400u));
    u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0));
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to inf
  if (a < 0x38800000u) {                                     // subnormal or zero half
    float v;
    memcpy(&v, &a, 4);
    return (uint16_t)(sign | (uint32_t)nearbyintf(v * 16777216.0f));
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;
  return (uint16_t)(sign | (r >> 13));
}
#endif

// e^x for x <= 0 region used by softmax (valid everywhere below 88); 0 below -87.3, so -inf -> 0.
// Cody-Waite range reduction and the Cephes polynomial: ~1 ulp, no calls, vectorises.
inline float exp_approx(float x) {
  const float lo = -87.3f, hi = 88.3f;
  float c = x < lo ? lo : (x > hi ? hi : x);
  // t = 1.5 * 2^23 + round(x / ln 2): n sits in t's low mantissa bits, no float->int conversion
  // (which GCC would not vectorise here)
  float t = c * 1.44269504088896341f + 12582912.0f;
  float fn = t - 12582912.0f;
  int32_t n = __builtin_bit_cast(int32_t, t) - 0x4B400000;
  float r = c - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float scale = __builtin_bit_cast(float, (n + 127) << 23);
  return x < lo ? 0.0f : p * scale;
}

inline float sum(const float* x, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; k++) acc[k] += x[i + k];
  float s = 0.0f;
  for (; i < n; i++) s += x[i];
  for (int k = 0; k < kLanes; k++) s += acc[k];
  return s;
}

inline float dot(const float* x, const float* y, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; k++) acc[k] += x[i + k] * y[i + k];
  float s = 0.0f;
  for (; i < n; i++) s += x[i] * y[i];
  for (int k = 0; k < kLanes; k++) s += acc[k];
  return s;
}

inline float max(const float* x, int64_t n) {
  float acc[kLanes];
  for (int k = 0; k < kLanes; k++) acc[k] = -INFINITY;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; k++) acc[k] = x[i + k] > acc[k] ? x[i + k] : acc[k];
  float m = -INFINITY;
  for (; i < n; i++) m = x[i] > m ? x[i] : m;
  for (int k = 0; k < kLanes; k++) m = acc[k] > m ? acc[k] : m;
  return m;
}

// Activations are read and written through these: fp32 in place, 16-bit through a float buffer.
// (Plain functions: the per-ISA clones stay inside convert.cpp, so no resolver crosses files.)
void load_row(int dtype, const void* src, float* dst, int64_t n);
void store_row(int dtype, const float* src, void* dst, int64_t n);
size_t dtype_size(int dtype);
int pick_threads(int requested, int64_t work_elems);

}  // namespace ml
