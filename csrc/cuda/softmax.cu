// Scaled masked softmax and scaled causal softmax on CUDA, forward and backward, fp32 accumulation.
//
//   forward   y = softmax(scale * x + mask) over the last dim, mask True = -inf (padding) or
//             key j > query i (causal); a row with no visible key is zeros, not NaN.
//   backward  dx = scale * y * (dy - sum(dy * y)).
//
// Fast path: one block per row with the row in registers (ITEMS packs of VEC elements per
// thread): one read of x (and the mask), one write of y. Causal rows skip loading the masked
// upper triangle. Keys beyond what fits in registers (forward: sk > 32768 for 16-bit, 16384 for
// fp32, 4096 unaligned; backward: 24576 for 16-bit) take a generic path that re-reads the row
// from L1/L2.
#include "common.cuh"

namespace ml {
namespace {

// The largest block of each register-tile kernel (its __launch_bounds__, which the launch plan
// respects), by the fp32 values one thread holds per tile (VEC * ITEMS, at most 32). 1024 threads
// need <= 64 registers each, 768 <= 80 (a block's warps are spread over 4 quarters of 16K
// registers each: 800 threads put 7 warps in one quarter and allow only 72). nvcc 13
// (sm_80/sm_90) gives the forward (one tile) <= 44 registers up to 16 values and 69 at 32, which
// the bound brings to 56-60 without spilling; the backward (two tiles: y and dy) <= 52 up to 16
// values and 72-79 at 32: 768, the most 80 registers allow, so 16-bit rows of more than 24576
// keys take the generic kernel (those of up to 24576 launch as before).
// tests/test_kernel_resources.py checks every launch against nvcc's counts.
constexpr int forward_max_threads(int /*values*/) { return kMaxThreads; }
constexpr int backward_max_threads(int values) { return values <= 16 ? kMaxThreads : 768; }

struct RowInfo {
  int64_t row;
  const uint8_t* mask;  // this row's mask or nullptr
  int visible;          // keys [visible, sk) are masked by causality
};

__device__ __forceinline__ RowInfo row_info(const uint8_t* mask, int64_t heads, int64_t sq,
                                            int sk, int64_t mask_sq, bool causal) {
  RowInfo ri;
  ri.row = blockIdx.x;
  const int64_t q = ri.row % sq, b = ri.row / (heads * sq);
  ri.mask = mask ? mask + (b * mask_sq + (mask_sq == 1 ? 0 : q)) * sk : nullptr;
  ri.visible = causal ? (int)(q + 1 < sk ? q + 1 : sk) : sk;
  return ri;
}

template <class T, int VEC, int ITEMS>
__global__ void __launch_bounds__(forward_max_threads(VEC * ITEMS))
    softmax_forward_kernel(const T* __restrict__ x, const uint8_t* __restrict__ mask,
                           T* __restrict__ y, int64_t heads, int64_t sq, int sk, int64_t mask_sq,
                           float scale, bool causal) {
  __shared__ float smem[32];
  const RowInfo ri = row_info(mask, heads, sq, sk, mask_sq, causal);
  const int packs = sk / VEC;
  const T* xr = x + ri.row * sk;
  float v[ITEMS][VEC];
  float m = -INFINITY;
#pragma unroll
  for (int it = 0; it < ITEMS; it++) {
    const int p = it * blockDim.x + threadIdx.x;
    const bool load = p < packs && p * VEC < ri.visible;
    Pack<T, VEC> xp;
    Pack<uint8_t, VEC> mp;
    if (load) xp = reinterpret_cast<const Pack<T, VEC>*>(xr)[p];
    if (load && ri.mask) mp = reinterpret_cast<const Pack<uint8_t, VEC>*>(ri.mask)[p];
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      const bool on = load && p * VEC + k < ri.visible && !(ri.mask && mp.v[k]);
      v[it][k] = on ? to_f(xp.v[k]) * scale : -INFINITY;
      m = fmaxf(m, v[it][k]);
    }
  }
  m = block_max(m, smem);
  float s = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; it++)
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      v[it][k] = m == -INFINITY ? 0.0f : __expf(v[it][k] - m);  // exp(-inf) = 0
      s += v[it][k];
    }
  s = block_sum(s, smem);
  const float inv = s > 0.0f ? 1.0f / s : 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; it++) {
    const int p = it * blockDim.x + threadIdx.x;
    if (p >= packs) continue;
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; k++) out.v[k] = from_f<T>(v[it][k] * inv);
    reinterpret_cast<Pack<T, VEC>*>(y + ri.row * sk)[p] = out;
  }
}

template <class T>
__global__ void __launch_bounds__(kGenericThreads)
    softmax_forward_generic(const T* __restrict__ x, const uint8_t* __restrict__ mask,
                            T* __restrict__ y, int64_t heads, int64_t sq, int sk, int64_t mask_sq,
                            float scale, bool causal) {
  __shared__ float smem[32];
  const RowInfo ri = row_info(mask, heads, sq, sk, mask_sq, causal);
  const T* xr = x + ri.row * sk;
  T* yr = y + ri.row * sk;
  auto value = [&](int j) {
    const bool on = j < ri.visible && !(ri.mask && ri.mask[j]);
    return on ? to_f(xr[j]) * scale : -INFINITY;
  };
  float m = -INFINITY;
  for (int j = threadIdx.x; j < ri.visible; j += blockDim.x) m = fmaxf(m, value(j));
  m = block_max(m, smem);
  float s = 0.0f;
  if (m != -INFINITY)
    for (int j = threadIdx.x; j < ri.visible; j += blockDim.x) s += __expf(value(j) - m);
  s = block_sum(s, smem);
  const float inv = s > 0.0f ? 1.0f / s : 0.0f;
  for (int j = threadIdx.x; j < sk; j += blockDim.x)
    yr[j] = from_f<T>(m == -INFINITY || j >= ri.visible ? 0.0f : __expf(value(j) - m) * inv);
}

template <class T, int VEC, int ITEMS>
__global__ void __launch_bounds__(backward_max_threads(VEC * ITEMS))
    softmax_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                            int64_t sq, int sk, float scale, bool causal) {
  __shared__ float smem[32];
  const RowInfo ri = row_info(nullptr, 1, sq, sk, 1, causal);
  const int packs = sk / VEC;
  float yv[ITEMS][VEC], gv[ITEMS][VEC];
  float d = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; it++) {
    const int p = it * blockDim.x + threadIdx.x;
    const bool load = p < packs && p * VEC < ri.visible;
    Pack<T, VEC> yp, gp;
    if (load) {
      yp = reinterpret_cast<const Pack<T, VEC>*>(y + ri.row * sk)[p];
      gp = reinterpret_cast<const Pack<T, VEC>*>(dy + ri.row * sk)[p];
    }
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      const bool on = load && p * VEC + k < ri.visible;
      yv[it][k] = on ? to_f(yp.v[k]) : 0.0f;
      gv[it][k] = on ? to_f(gp.v[k]) : 0.0f;
      d += yv[it][k] * gv[it][k];
    }
  }
  d = block_sum(d, smem);
#pragma unroll
  for (int it = 0; it < ITEMS; it++) {
    const int p = it * blockDim.x + threadIdx.x;
    if (p >= packs) continue;
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; k++) out.v[k] = from_f<T>(scale * yv[it][k] * (gv[it][k] - d));
    reinterpret_cast<Pack<T, VEC>*>(dx + ri.row * sk)[p] = out;
  }
}

template <class T>
__global__ void __launch_bounds__(kGenericThreads)
    softmax_backward_generic(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                             int64_t sq, int sk, float scale, bool causal) {
  __shared__ float smem[32];
  const RowInfo ri = row_info(nullptr, 1, sq, sk, 1, causal);
  const T *yr = y + ri.row * sk, *gr = dy + ri.row * sk;
  float d = 0.0f;
  for (int j = threadIdx.x; j < ri.visible; j += blockDim.x) d += to_f(yr[j]) * to_f(gr[j]);
  d = block_sum(d, smem);
  for (int j = threadIdx.x; j < sk; j += blockDim.x)
    dx[ri.row * sk + j] =
        from_f<T>(j < ri.visible ? scale * to_f(yr[j]) * (to_f(gr[j]) - d) : 0.0f);
}

template <int VEC> Launch forward_launch(int64_t sk) {
  static constexpr int bounds[3] = {forward_max_threads(VEC), forward_max_threads(2 * VEC),
                                    forward_max_threads(4 * VEC)};
  return plan_launch(sk / VEC, bounds);
}

template <int VEC> Launch backward_launch(int64_t sk) {
  static constexpr int bounds[3] = {backward_max_threads(VEC), backward_max_threads(2 * VEC),
                                    backward_max_threads(4 * VEC)};
  return plan_launch(sk / VEC, bounds);
}

template <class T, int VEC>
void launch_forward(const void* x, const uint8_t* mask, void* y, int64_t rows, int64_t heads,
                    int64_t sq, int sk, int64_t mask_sq, float scale, bool causal,
                    cudaStream_t st) {
  const Launch l = forward_launch<VEC>(sk);
  auto xp = static_cast<const T*>(x);
  auto yp = static_cast<T*>(y);
  if (l.items == 0) {
    softmax_forward_generic<T><<<rows, l.threads, 0, st>>>(xp, mask, yp, heads, sq, sk, mask_sq,
                                                           scale, causal);
    return;
  }
  with_items(l.items, [&](auto I) {
    softmax_forward_kernel<T, VEC, decltype(I)::value>
        <<<rows, l.threads, 0, st>>>(xp, mask, yp, heads, sq, sk, mask_sq, scale, causal);
  });
}

template <class T, int VEC>
void launch_backward(const void* dy, const void* y, void* dx, int64_t rows, int64_t sq, int sk,
                     float scale, bool causal, cudaStream_t st) {
  const Launch l = backward_launch<VEC>(sk);
  auto dyp = static_cast<const T*>(dy);
  auto yp = static_cast<const T*>(y);
  auto dxp = static_cast<T*>(dx);
  if (l.items == 0) {
    softmax_backward_generic<T><<<rows, l.threads, 0, st>>>(dyp, yp, dxp, sq, sk, scale, causal);
    return;
  }
  with_items(l.items, [&](auto I) {
    softmax_backward_kernel<T, VEC, decltype(I)::value>
        <<<rows, l.threads, 0, st>>>(dyp, yp, dxp, sq, sk, scale, causal);
  });
}

template <class T, int VEC> int describe_launches(bool backward, int64_t sk, ml_cuda_launch* out) {
  if (backward)
    describe<T, VEC>(backward_launch<VEC>(sk), "softmax_backward_kernel",
                     "softmax_backward_generic", out);
  else
    describe<T, VEC>(forward_launch<VEC>(sk), "softmax_forward_kernel", "softmax_forward_generic",
                     out);
  return 1;
}

}  // namespace
}  // namespace ml

using namespace ml;

extern "C" int ml_cuda_softmax_forward(int dtype, const void* x, const uint8_t* mask, void* y,
                                       int64_t batch, int64_t heads, int64_t sq, int64_t sk,
                                       int64_t mask_sq, float scale, int causal, void* stream) {
  if (batch < 0 || heads < 0 || sq < 0 || sk <= 0 || sk > INT32_MAX) return ML_ERR_ARG;
  if (mask != nullptr && mask_sq != 1 && mask_sq != sq) return ML_ERR_ARG;
  const int64_t rows = batch * heads * sq;
  if (rows == 0) return ML_OK;
  if (rows > INT32_MAX) return ML_ERR_ARG;
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    const void* ptrs[] = {x, y, mask};
    // the mask's rows are read kVec bytes at a time, so sk must keep them kVec-aligned too
    if (vec_width<T>(sk, ptrs, 3) > 1 && (mask == nullptr || (uintptr_t)mask % kVec == 0))
      launch_forward<T, kVec>(x, mask, y, rows, heads, sq, (int)sk, mask_sq, scale, causal, st);
    else
      launch_forward<T, 1>(x, mask, y, rows, heads, sq, (int)sk, mask_sq, scale, causal, st);
    ML_LAUNCH_CHECK();
    return ML_OK;
  });
}

extern "C" int ml_cuda_softmax_backward(int dtype, const void* dy, const void* y, void* dx,
                                        int64_t rows, int64_t sq, int64_t sk, float scale,
                                        int causal, void* stream) {
  if (rows < 0 || sq <= 0 || sk <= 0 || sk > INT32_MAX || rows > INT32_MAX) return ML_ERR_ARG;
  if (rows == 0) return ML_OK;
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const void* ptrs[] = {dy, y, dx};
    if (vec_width<T>(sk, ptrs, 3) > 1)
      launch_backward<T, 16 / sizeof(T)>(dy, y, dx, rows, sq, (int)sk, scale, causal, st);
    else
      launch_backward<T, 1>(dy, y, dx, rows, sq, (int)sk, scale, causal, st);
    ML_LAUNCH_CHECK();
    return ML_OK;
  });
}

extern "C" int ml_cuda_softmax_launches(int dtype, int backward, int vectorized, int64_t sk,
                                        ml_cuda_launch* out) {
  if (sk <= 0 || sk > INT32_MAX || !out || dtype < ML_F32 || dtype > ML_BF16) return 0;
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    if (vectorized && sk % kVec == 0) return describe_launches<T, kVec>(backward, sk, out);
    return describe_launches<T, 1>(backward, sk, out);
  });
}
