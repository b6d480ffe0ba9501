// Shared pieces of the CUDA kernels: error checks that name file and line, dtype dispatch,
// packed vector loads, block-wide reductions and the register-tile launch plan. Only CUDA
// headers: no torch. Inline and templated helpers only: the one definition they need (the error
// state behind ml_cuda_last_error) lives in common.cu, so every kernel file links with common.cu
// alone.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>

#include "../megalite_kernels.h"

namespace ml {

// Records msg as this host thread's last error, returned by ml_cuda_last_error() (common.cu).
void set_error(const char* msg);

// Returns ML_ERR_CUDA from the calling C entry point with "file:line: cuda error" recorded.
#define ML_CUDA_CHECK(expr)                                                        \
  do {                                                                             \
    cudaError_t err_ = (expr);                                                     \
    if (err_ != cudaSuccess) {                                                     \
      char msg_[512];                                                              \
      snprintf(msg_, sizeof msg_, "%s:%d: %s: %s", __FILE__, __LINE__, #expr,      \
               cudaGetErrorString(err_));                                          \
      ml::set_error(msg_);                                                         \
      return ML_ERR_CUDA;                                                          \
    }                                                                              \
  } while (0)
#define ML_LAUNCH_CHECK() ML_CUDA_CHECK(cudaGetLastError())

// Calls fn with a value of the activation type chosen by the dtype code.
template <class Fn> int dispatch_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case ML_F32: return fn(float());
    case ML_F16: return fn(__half());
    case ML_BF16: return fn(__nv_bfloat16());
    default: return ML_ERR_ARG;
  }
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements moved as one aligned load/store (16 bytes for the fast path).
template <class T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// 16-byte vectors when every row starts aligned, else scalar.
template <class T> inline int vec_width(int64_t cols, const void* const* ptrs, int n) {
  int vec = 16 / (int)sizeof(T);
  if (cols % vec) return 1;
  for (int i = 0; i < n; i++)
    if (ptrs[i] != nullptr && reinterpret_cast<uintptr_t>(ptrs[i]) % 16) return 1;
  return vec;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum/max; every thread gets the result. `smem` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read from a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < warps ? smem[lane] : 0.0f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* smem) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < warps ? smem[lane] : -INFINITY;
  return warp_max(v);
}

constexpr int kMaxThreads = 1024;
// Block of the generic (any width) kernels, which hold no row in registers (~25 registers).
constexpr int kGenericThreads = 512;

// Threads per block for a row of `packs` vectors held `items` per thread: a multiple of 32.
inline int threads_for(int64_t packs, int items) {
  int64_t t = (packs + items - 1) / items;
  t = (t + 31) / 32 * 32;
  return (int)(t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t));
}

// One launch of a row kernel: the register tile (`items` packs per thread; 0 = the generic
// kernel), the block size, and the largest block that kernel accepts: its __launch_bounds__.
struct Launch {
  int items, threads, max_threads;
};

// The launch for a row of `packs` vectors. max_threads[i] is the __launch_bounds__ of the tile
// kernel holding 1 << i packs per thread (a multiple of 32, at least 512 for i < 2): a tile keeps
// its fp32 values in registers, so the wider the tile the fewer threads fit in a block's 64K
// registers. The smallest ITEMS in {1, 2, 4} with at most 512 threads per row, else 4 with up to
// max_threads[2]; the generic kernel when the row does not fit (it re-reads the row from L1/L2).
inline Launch plan_launch(int64_t packs, const int (&max_threads)[3]) {
  for (int i = 0; i < 3; i++) {
    const int items = 1 << i, cap = max_threads[i] < 512 ? max_threads[i] : 512;
    if (packs <= (int64_t)items * cap) return {items, threads_for(packs, items), max_threads[i]};
  }
  if (packs <= 4 * (int64_t)max_threads[2]) return {4, threads_for(packs, 4), max_threads[2]};
  return {0, kGenericThreads, kGenericThreads};
}

// The C++ name of the activation type, as a demangler prints it in the kernel's name.
template <class T> constexpr const char* type_name() {
  return std::is_same<T, float>::value ? "float"
         : std::is_same<T, __half>::value ? "__half" : "__nv_bfloat16";
}

// Describes `l` (of the kernel `tile` / `generic` for activation T and vector width VEC) into
// out: the kernel's template name and block, as ml_cuda_launch reports it.
template <class T, int VEC>
void describe(const Launch& l, const char* tile, const char* generic, ml_cuda_launch* out) {
  if (l.items == 0)
    snprintf(out->kernel, sizeof out->kernel, "%s<%s>", generic, type_name<T>());
  else
    snprintf(out->kernel, sizeof out->kernel, "%s<%s, %d, %d>", tile, type_name<T>(), VEC, l.items);
  out->threads = l.threads;
  out->max_threads = l.max_threads;
}

// Calls fn(std::integral_constant<int, I>()) for I = items (1, 2 or 4, from plan_launch), so that a
// launch can name the register tile as a template argument: decltype(I)::value.
template <class Fn> void with_items(int items, Fn&& fn) {
  if (items == 1) fn(std::integral_constant<int, 1>());
  else if (items == 2) fn(std::integral_constant<int, 2>());
  else fn(std::integral_constant<int, 4>());
}

}  // namespace ml
