// The CUDA kernels' one shared definition: the error state behind ml_cuda_last_error(), which
// ML_CUDA_CHECK (common.cuh) fills through set_error. Each kernel file links with this one alone.
#include "common.cuh"

namespace ml {
namespace {
thread_local char last_error[512] = "";  // per host thread, as the C API promises
}  // namespace

void set_error(const char* msg) { snprintf(last_error, sizeof last_error, "%s", msg); }

}  // namespace ml

extern "C" const char* ml_cuda_last_error(void) { return ml::last_error; }

// The CUDA runtime this library was compiled against (CUDART_VERSION, 13000 = 13.0): megalite.ops
// compares it with the driver's at import, since a toolkit newer than the driver fails every call.
extern "C" int ml_cuda_runtime_version(void) { return CUDART_VERSION; }
