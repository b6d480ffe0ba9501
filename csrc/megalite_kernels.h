/* megalite fused kernels: the plain C interface shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
 * implementations. Raw pointers, sizes and (for CUDA) a stream handle: no torch headers, so both
 * libraries build against any torch wheel, or none.
 *
 * Conventions
 *   dtype    ML_F32 / ML_F16 / ML_BF16 for activations. Weights, biases, statistics (mean, rstd)
 *            and weight gradients are fp32 whatever the activation dtype (callers cast weights).
 *   norms    x, y, dy, dx: [rows, cols] contiguous. LayerNorm: y = (x - mean) * rstd * w + b;
 *            RMSNorm (rms != 0): y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
 *            Backward overwrites dw and db (db may be NULL); b may be NULL (no bias).
 *   softmax  x, y: [batch, heads, sq, sk] contiguous; y = softmax(scale * x + mask) over sk with
 *            mask [batch, 1, mask_sq, sk] (mask_sq is sq or 1; 1 = masked out, may be NULL);
 *            causal != 0: key j is visible to query i when j <= i (upper triangle masked).
 *            A row with no visible key is all zeros. Backward: dx = scale * y * (dy - sum(dy*y)).
 * Every function returns 0 on success, or an error code (ML_ERR_*); for CUDA, ml_cuda_last_error()
 * says what (csrc/cuda/common.cu).
 */
#ifndef MEGALITE_KERNELS_H
#define MEGALITE_KERNELS_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { ML_F32 = 0, ML_F16 = 1, ML_BF16 = 2 };
enum { ML_OK = 0, ML_ERR_ARG = 1, ML_ERR_CUDA = 2 };

/* ---- CPU (OpenMP; vector width chosen at run time) ---- */
int ml_cpu_norm_forward(int dtype, int rms, const void* x, const float* w,
                        const float* b, void* y, float* mean, float* rstd, int64_t rows,
                        int64_t cols, float eps, int num_threads);
int ml_cpu_norm_backward(int dtype, int rms, const void* dy, const void* x,
                         const float* w, const float* mean, const float* rstd, void* dx, float* dw,
                         float* db, int64_t rows, int64_t cols, int num_threads);
int ml_cpu_softmax_forward(int dtype, const void* x, const uint8_t* mask, void* y, int64_t batch,
                           int64_t heads, int64_t sq, int64_t sk, int64_t mask_sq, float scale,
                           int causal, int num_threads);
int ml_cpu_softmax_backward(int dtype, const void* dy, const void* y, void* dx, int64_t rows,
                            int64_t sq, int64_t sk, float scale, int causal, int num_threads);
const char* ml_cpu_isa(void);

/* ---- CUDA (launched on `stream`, a cudaStream_t; launch errors name file and line) ---- */
int ml_cuda_norm_forward(int dtype, int rms, const void* x, const float* w,
                         const float* b, void* y, float* mean, float* rstd, int64_t rows,
                         int64_t cols, float eps, void* stream);
/* workspace: ml_cuda_norm_backward_workspace(rows, cols) bytes of device memory (fp32 partial
 * weight gradients), or NULL when that is 0. */
int64_t ml_cuda_norm_backward_workspace(int64_t rows, int64_t cols);
int ml_cuda_norm_backward(int dtype, int rms, const void* dy, const void* x,
                          const float* w, const float* mean, const float* rstd, void* dx, float* dw,
                          float* db, int64_t rows, int64_t cols, void* workspace, void* stream);
int ml_cuda_softmax_forward(int dtype, const void* x, const uint8_t* mask, void* y, int64_t batch,
                            int64_t heads, int64_t sq, int64_t sk, int64_t mask_sq, float scale,
                            int causal, void* stream);
int ml_cuda_softmax_backward(int dtype, const void* dy, const void* y, void* dx, int64_t rows,
                             int64_t sq, int64_t sk, float scale, int causal, void* stream);
const char* ml_cuda_last_error(void);
/* CUDART_VERSION the CUDA library was built with (1000 * major + 10 * minor). */
int ml_cuda_runtime_version(void);

/* The launches a call would make, without a GPU: the kernel's template name as a demangler prints
 * it (e.g. "norm_backward_kernel<__nv_bfloat16, 8, 4>"), threads per block and the kernel's
 * __launch_bounds__. `vectorized`: every pointer is 16-byte aligned. The launch functions above
 * launch exactly these; tests/test_kernel_resources.py checks each against the registers nvcc
 * gives the kernel. Writes up to 2 launches to out and returns how many (0: invalid arguments). */
typedef struct {
  char kernel[96];
  int threads;
  int max_threads;
} ml_cuda_launch;
int ml_cuda_norm_launches(int dtype, int backward, int vectorized, int64_t cols,
                          ml_cuda_launch* out);
int ml_cuda_softmax_launches(int dtype, int backward, int vectorized, int64_t sk,
                             ml_cuda_launch* out);

#ifdef __cplusplus
}
#endif
#endif
