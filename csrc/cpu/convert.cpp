// dtype conversion of whole rows (vectorised per ISA), shared by the CPU kernels.
#include <omp.h>

#include "../megalite_kernels.h"
#include "simd.h"

namespace ml {

namespace {

ML_CLONES void load_row_isa(int dtype, const void* src, float* dst, int64_t n) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (dtype == ML_BF16) {
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(h[i]);
  } else if (dtype == ML_F16) {
    for (int64_t i = 0; i < n; i++) dst[i] = f16_to_float(h[i]);
  } else {
    memcpy(dst, src, n * sizeof(float));
  }
}

ML_CLONES void store_row_isa(int dtype, const float* src, void* dst, int64_t n) {
  uint16_t* h = static_cast<uint16_t*>(dst);
  if (dtype == ML_BF16) {
    for (int64_t i = 0; i < n; i++) h[i] = float_to_bf16(src[i]);
  } else if (dtype == ML_F16) {
    for (int64_t i = 0; i < n; i++) h[i] = float_to_f16(src[i]);
  } else {
    memcpy(dst, src, n * sizeof(float));
  }
}

}  // namespace

void load_row(int dtype, const void* src, float* dst, int64_t n) { load_row_isa(dtype, src, dst, n); }
void store_row(int dtype, const float* src, void* dst, int64_t n) {
  store_row_isa(dtype, src, dst, n);
}

size_t dtype_size(int dtype) { return dtype == ML_F32 ? 4 : 2; }

// Below ~32k elements per thread the OpenMP fork costs more than it saves.
int pick_threads(int requested, int64_t work_elems) {
  int64_t useful = work_elems / 32768 + 1;
  int n = requested > 0 ? requested : omp_get_max_threads();
  return (int)(useful < n ? useful : n);
}

}  // namespace ml

extern "C" const char* ml_cpu_isa(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2+FMA)";
  return "x86-64 (SSE2)";
#else
  return "generic";
#endif
}
