// LayerNorm and RMSNorm on CUDA, forward and backward, fp32/fp16/bf16 activations with fp32
// statistics, weights and weight gradients.
//
// Fast path: one block per row, the row held in registers (ITEMS packs of VEC elements per thread),
// so x is read once and y written once. Backward loops each block over a strided set of rows,
// keeping that block's partial dw/db for the columns it owns in registers, then a second kernel
// sums the partials of all blocks (no atomics: deterministic). Rows too wide for registers or not
// 16-byte aligned take a generic path that re-reads from L1/L2.
#include "common.cuh"

namespace ml {
namespace {

// The largest block of each register-tile kernel (its __launch_bounds__, which the launch plan
// respects), by the fp32 values one thread holds per tile (VEC * ITEMS, at most 32). A block has
// 64K registers, so 1024 threads need <= 64 registers each, 512 <= 128, 384 <= 168. nvcc 13 gives
// (sm_80/sm_90): the forward, one tile, <= 56 registers at 32 values (63-64 under the bound, no
// spill): 1024. The backward keeps four tiles (x-hat, g, and the dw and db sums): 4 values ~55
// registers (1024), 8 and 16 values 62-121 (512), 32 values 159-168 (384, so bf16/fp16 rows above
// 12288 and fp32 above 8192 take the generic kernel). tests/test_kernel_resources.py checks
// every launch against nvcc's counts.
constexpr int forward_max_threads(int /*values*/) { return kMaxThreads; }
constexpr int backward_max_threads(int values) {
  return values <= 4 ? kMaxThreads : values <= 16 ? 512 : 384;
}

template <class T, int VEC, int ITEMS>
__global__ void __launch_bounds__(forward_max_threads(VEC * ITEMS))
    norm_forward_kernel(const T* __restrict__ x, const float* __restrict__ w,
                        const float* __restrict__ b, T* __restrict__ y,
                        float* __restrict__ mean_out, float* __restrict__ rstd_out, int cols,
                        float eps, bool rms) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const int packs = cols / VEC;
  const T* xr = x + row * cols;
  float v[ITEMS][VEC];
  float s = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; it++) {
    int p = it * blockDim.x + threadIdx.x;
    Pack<T, VEC> pk;
    if (p < packs) pk = reinterpret_cast<const Pack<T, VEC>*>(xr)[p];
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      v[it][k] = p < packs ? to_f(pk.v[k]) : 0.0f;
      s += v[it][k];
    }
  }
  const float mean = rms ? 0.0f : block_sum(s, smem) / cols;
  float ss = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; it++) {
    int p = it * blockDim.x + threadIdx.x;
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      float d = p < packs ? v[it][k] - mean : 0.0f;
      ss += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(ss, smem) / cols + eps);
#pragma unroll
  for (int it = 0; it < ITEMS; it++) {
    int p = it * blockDim.x + threadIdx.x;
    if (p >= packs) continue;
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      int c = p * VEC + k;
      float o = (v[it][k] - mean) * rstd * w[c];
      out.v[k] = from_f<T>(b != nullptr ? o + b[c] : o);
    }
    reinterpret_cast<Pack<T, VEC>*>(y + row * cols)[p] = out;
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Any width: three strided passes over the row (the re-reads hit L1/L2).
template <class T>
__global__ void __launch_bounds__(kGenericThreads)
    norm_forward_generic(const T* __restrict__ x, const float* __restrict__ w,
                         const float* __restrict__ b, T* __restrict__ y,
                         float* __restrict__ mean_out, float* __restrict__ rstd_out, int cols,
                         float eps, bool rms) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  float s = 0.0f;
  if (!rms)
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += to_f(xr[c]);
  const float mean = rms ? 0.0f : block_sum(s, smem) / cols;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float d = to_f(xr[c]) - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(block_sum(ss, smem) / cols + eps);
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float o = (to_f(xr[c]) - mean) * rstd * w[c];
    y[row * cols + c] = from_f<T>(b != nullptr ? o + b[c] : o);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w. Block `blockIdx.x` handles rows
// blockIdx.x, +gridDim.x, ... and writes its dw (and db) partial sums to partial[blockIdx.x].
template <class T, int VEC, int ITEMS>
__global__ void __launch_bounds__(backward_max_threads(VEC * ITEMS))
    norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                         const float* __restrict__ w, const float* __restrict__ mean,
                         const float* __restrict__ rstd, T* __restrict__ dx,
                         float* __restrict__ partial, int64_t rows, int cols, bool rms,
                         bool has_bias) {
  __shared__ float smem[32];
  const int packs = cols / VEC;
  float dw_acc[ITEMS][VEC] = {}, db_acc[ITEMS][VEC] = {};
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float mu = mean[row], rs = rstd[row];
    float xh[ITEMS][VEC], g[ITEMS][VEC];
    float sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int it = 0; it < ITEMS; it++) {
      int p = it * blockDim.x + threadIdx.x;
      Pack<T, VEC> xp, gp;
      if (p < packs) {
        xp = reinterpret_cast<const Pack<T, VEC>*>(x + row * cols)[p];
        gp = reinterpret_cast<const Pack<T, VEC>*>(dy + row * cols)[p];
      }
#pragma unroll
      for (int k = 0; k < VEC; k++) {
        float d = p < packs ? to_f(gp.v[k]) : 0.0f;
        xh[it][k] = p < packs ? (to_f(xp.v[k]) - mu) * rs : 0.0f;
        g[it][k] = p < packs ? d * w[p * VEC + k] : 0.0f;
        dw_acc[it][k] += d * xh[it][k];
        db_acc[it][k] += d;
        sg += g[it][k];
        sgx += g[it][k] * xh[it][k];
      }
    }
    const float mean_g = rms ? 0.0f : block_sum(sg, smem) / cols;
    const float mean_gx = block_sum(sgx, smem) / cols;
#pragma unroll
    for (int it = 0; it < ITEMS; it++) {
      int p = it * blockDim.x + threadIdx.x;
      if (p >= packs) continue;
      Pack<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; k++)
        out.v[k] = from_f<T>(rs * (g[it][k] - mean_g - xh[it][k] * mean_gx));
      reinterpret_cast<Pack<T, VEC>*>(dx + row * cols)[p] = out;
    }
  }
  float* dw_part = partial + (int64_t)blockIdx.x * cols;
  float* db_part = partial + ((int64_t)gridDim.x + blockIdx.x) * cols;
#pragma unroll
  for (int it = 0; it < ITEMS; it++) {
    int p = it * blockDim.x + threadIdx.x;
    if (p >= packs) continue;
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      dw_part[p * VEC + k] = dw_acc[it][k];
      if (has_bias) db_part[p * VEC + k] = db_acc[it][k];
    }
  }
}

// Any width: partial sums go through this block's own row of `partial` (no other block touches it).
template <class T>
__global__ void __launch_bounds__(kGenericThreads)
    norm_backward_generic(const T* __restrict__ dy, const T* __restrict__ x,
                          const float* __restrict__ w, const float* __restrict__ mean,
                          const float* __restrict__ rstd, T* __restrict__ dx,
                          float* __restrict__ partial, int64_t rows, int cols, bool rms,
                          bool has_bias) {
  __shared__ float smem[32];
  float* dw_part = partial + (int64_t)blockIdx.x * cols;
  float* db_part = partial + ((int64_t)gridDim.x + blockIdx.x) * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    dw_part[c] = 0.0f;
    if (has_bias) db_part[c] = 0.0f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float mu = mean[row], rs = rstd[row];
    const T *xr = x + row * cols, *dyr = dy + row * cols;
    float sg = 0.0f, sgx = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
      float d = to_f(dyr[c]), xh = (to_f(xr[c]) - mu) * rs, g = d * w[c];
      sg += g;
      sgx += g * xh;
      dw_part[c] += d * xh;
      if (has_bias) db_part[c] += d;
    }
    const float mean_g = rms ? 0.0f : block_sum(sg, smem) / cols;
    const float mean_gx = block_sum(sgx, smem) / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
      float xh = (to_f(xr[c]) - mu) * rs, g = to_f(dyr[c]) * w[c];
      dx[row * cols + c] = from_f<T>(rs * (g - mean_g - xh * mean_gx));
    }
  }
}

// out[c] = sum over blocks of partial[block, c], for dw and (when db != NULL) db.
constexpr int kSumThreads = 256;
__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(const float* __restrict__ partial, int num_blocks, int cols,
                        float* __restrict__ dw, float* __restrict__ db) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0.0f, sb = 0.0f;
  for (int i = 0; i < num_blocks; i++) {
    s += partial[(int64_t)i * cols + c];
    if (db != nullptr) sb += partial[((int64_t)num_blocks + i) * cols + c];
  }
  dw[c] = s;
  if (db != nullptr) db[c] = sb;
}

template <int VEC> Launch forward_launch(int64_t cols) {
  static constexpr int bounds[3] = {forward_max_threads(VEC), forward_max_threads(2 * VEC),
                                    forward_max_threads(4 * VEC)};
  return plan_launch(cols / VEC, bounds);
}

template <int VEC> Launch backward_launch(int64_t cols) {
  static constexpr int bounds[3] = {backward_max_threads(VEC), backward_max_threads(2 * VEC),
                                    backward_max_threads(4 * VEC)};
  return plan_launch(cols / VEC, bounds);
}

template <class T, int VEC> int launch_forward(const void* x, const float* w, const float* b,
                                               void* y, float* mean, float* rstd, int64_t rows,
                                               int cols, float eps, bool rms, cudaStream_t st) {
  const Launch l = forward_launch<VEC>(cols);
  auto xp = static_cast<const T*>(x);
  auto yp = static_cast<T*>(y);
  if (l.items == 0) {
    norm_forward_generic<T><<<rows, l.threads, 0, st>>>(xp, w, b, yp, mean, rstd, cols, eps, rms);
  } else {
    with_items(l.items, [&](auto I) {
      norm_forward_kernel<T, VEC, decltype(I)::value>
          <<<rows, l.threads, 0, st>>>(xp, w, b, yp, mean, rstd, cols, eps, rms);
    });
  }
  ML_LAUNCH_CHECK();
  return ML_OK;
}

int backward_blocks(int64_t rows) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    sms = 132;
  const int64_t blocks = 4 * (int64_t)sms;
  return (int)(rows < blocks ? (rows < 1 ? 1 : rows) : blocks);
}

template <class T, int VEC>
int launch_backward(const void* dy, const void* x, const float* w, const float* mean,
                    const float* rstd, void* dx, float* dw, float* db, int64_t rows, int cols,
                    bool rms, float* partial, cudaStream_t st) {
  const Launch l = backward_launch<VEC>(cols);
  const int blocks = backward_blocks(rows);
  auto dyp = static_cast<const T*>(dy);
  auto xp = static_cast<const T*>(x);
  auto dxp = static_cast<T*>(dx);
  const bool bias = db != nullptr;
  if (l.items == 0) {
    norm_backward_generic<T><<<blocks, l.threads, 0, st>>>(dyp, xp, w, mean, rstd, dxp, partial,
                                                           rows, cols, rms, bias);
  } else {
    with_items(l.items, [&](auto I) {
      norm_backward_kernel<T, VEC, decltype(I)::value><<<blocks, l.threads, 0, st>>>(
          dyp, xp, w, mean, rstd, dxp, partial, rows, cols, rms, bias);
    });
  }
  ML_LAUNCH_CHECK();
  sum_partials_kernel<<<(cols + kSumThreads - 1) / kSumThreads, kSumThreads, 0, st>>>(
      partial, blocks, cols, dw, db);
  ML_LAUNCH_CHECK();
  return ML_OK;
}

template <class T, int VEC> int describe_launches(bool backward, int64_t cols,
                                                  ml_cuda_launch* out) {
  if (!backward) {
    describe<T, VEC>(forward_launch<VEC>(cols), "norm_forward_kernel", "norm_forward_generic",
                     out);
    return 1;
  }
  describe<T, VEC>(backward_launch<VEC>(cols), "norm_backward_kernel", "norm_backward_generic",
                   out);
  snprintf(out[1].kernel, sizeof out[1].kernel, "sum_partials_kernel");
  out[1].threads = out[1].max_threads = kSumThreads;
  return 2;
}

}  // namespace
}  // namespace ml

using namespace ml;

extern "C" int ml_cuda_norm_forward(int dtype, int rms, const void* x, const float* w,
                                    const float* b, void* y, float* mean, float* rstd,
                                    int64_t rows, int64_t cols, float eps, void* stream) {
  if (rows < 0 || cols <= 0 || cols > INT32_MAX || rows > INT32_MAX) return ML_ERR_ARG;
  if (rows == 0) return ML_OK;
  const float* bias = rms ? nullptr : b;
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const void* ptrs[] = {x, y};
    if (vec_width<T>(cols, ptrs, 2) > 1)
      return launch_forward<T, 16 / sizeof(T)>(x, w, bias, y, mean, rstd, rows, (int)cols, eps,
                                               rms, st);
    return launch_forward<T, 1>(x, w, bias, y, mean, rstd, rows, (int)cols, eps, rms, st);
  });
}

extern "C" int64_t ml_cuda_norm_backward_workspace(int64_t rows, int64_t cols) {
  return 2 * (int64_t)backward_blocks(rows) * cols * (int64_t)sizeof(float);
}

extern "C" int ml_cuda_norm_backward(int dtype, int rms, const void* dy, const void* x,
                                     const float* w, const float* mean, const float* rstd,
                                     void* dx, float* dw, float* db, int64_t rows, int64_t cols,
                                     void* workspace, void* stream) {
  if (rows < 0 || cols <= 0 || cols > INT32_MAX || workspace == nullptr) return ML_ERR_ARG;
  auto st = static_cast<cudaStream_t>(stream);
  float* partial = static_cast<float*>(workspace);
  float* bias_grad = rms ? nullptr : db;
  if (rows == 0) {
    ML_CUDA_CHECK(cudaMemsetAsync(dw, 0, cols * sizeof(float), st));
    if (bias_grad) ML_CUDA_CHECK(cudaMemsetAsync(bias_grad, 0, cols * sizeof(float), st));
    return ML_OK;
  }
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const void* ptrs[] = {dy, x, dx};
    if (vec_width<T>(cols, ptrs, 3) > 1)
      return launch_backward<T, 16 / sizeof(T)>(dy, x, w, mean, rstd, dx, dw, bias_grad, rows,
                                                (int)cols, rms, partial, st);
    return launch_backward<T, 1>(dy, x, w, mean, rstd, dx, dw, bias_grad, rows, (int)cols, rms,
                                 partial, st);
  });
}

extern "C" int ml_cuda_norm_launches(int dtype, int backward, int vectorized, int64_t cols,
                                     ml_cuda_launch* out) {
  if (cols <= 0 || cols > INT32_MAX || !out || dtype < ML_F32 || dtype > ML_BF16) return 0;
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    if (vectorized && cols % kVec == 0) return describe_launches<T, kVec>(backward, cols, out);
    return describe_launches<T, 1>(backward, cols, out);
  });
}
