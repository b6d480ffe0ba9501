"""Loading the compiled kernel libraries, which one serves a tensor (``library_for``) and how a
kernel of it is called on that tensor's device (``launch``): the one place that knows CPU from CUDA.

``megalite._kernels_cpu`` / ``megalite._kernels_cuda`` are built by ``pip install -e .`` (see
setup.py); either may be absent (no compiler, no nvcc), and then the ops run the PyTorch reference
with one log line saying so. Arguments are checked and converted in ``megalite.ops._checks``.
"""
from __future__ import annotations

import ctypes
import logging
import os
from types import ModuleType
from typing import Callable, Optional

import torch

from megalite.ops._checks import DTYPE_CODES

log = logging.getLogger("megalite.ops")

# The CUDA kernels are compiled in CI but have not yet passed bench/gpu_check.sh on a real GPU, so
# models use PyTorch for CUDA tensors unless MEGALITE_CUDA_KERNELS=1. Set to True (and record it in
# the README) once the GPU check has passed.
CUDA_KERNELS_VERIFIED = False


def _load(name: str) -> tuple[Optional[ModuleType], str]:
    try:
        module = __import__(f"megalite.{name}", fromlist=[name])
        return module, ""
    except ImportError as e:
        return None, str(e)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def driver_cuda_version() -> Optional[int]:
    """The newest CUDA version this node's driver supports (``cuDriverGetVersion``: 12040 =
    12.4), or None without a driver. Reads libcuda only: no CUDA context is created."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
        return version.value or None
    except (OSError, AttributeError):
        return None


def _cuda_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def check_toolkit(lib: Optional[ModuleType], driver: Optional[int]) -> Optional[ModuleType]:
    """``lib``, or None (with one warning naming both versions) when it was built with a CUDA
    major version newer than the driver supports: every kernel call would fail
    (cudaErrorInsufficientDriver). A newer minor version of the same major runs (CUDA's minor
    version compatibility). A library or node that cannot tell is kept."""
    built_fn = getattr(lib, "cuda_runtime_version", None)
    if built_fn is None or driver is None:
        return lib
    built = int(built_fn())
    if built // 1000 <= driver // 1000:
        return lib
    _warn_once("cuda-driver",
               f"megalite.ops: the CUDA kernels were built with CUDA {_cuda_version_text(built)}"
               f" but this node's driver supports CUDA {_cuda_version_text(driver)} at most; "
               "using PyTorch. Rebuild them with a CUDA toolkit the driver supports "
               "(pip install -e . with that nvcc first on PATH) or update the driver.")
    return None


_warned: set = set()
cpu_lib, _cpu_error = _load("_kernels_cpu")
cuda_lib, _cuda_error = _load("_kernels_cuda")
if cuda_lib is not None:
    cuda_lib = check_toolkit(cuda_lib, driver_cuda_version())
    if cuda_lib is None:
        _cuda_error = "built for a newer CUDA than the driver"
        _warned.add("cuda")  # check_toolkit said why; library_for need not say it again


def library_for(x: torch.Tensor) -> Optional[ModuleType]:
    """The kernel library for this tensor's device and dtype, or None (use the reference)."""
    if x.dtype not in DTYPE_CODES:
        return None
    if x.device.type == "cpu":
        if cpu_lib is None:
            _warn_once("cpu", "megalite.ops: fused CPU kernels not built (megalite._kernels_cpu: "
                              f"{_cpu_error}); using PyTorch. Reinstall with a C++ compiler: "
                              "pip install -e .")
        return cpu_lib
    if x.device.type == "cuda":
        if cuda_lib is None:
            _warn_once("cuda", "megalite.ops: CUDA kernels not built (megalite._kernels_cuda: "
                               f"{_cuda_error}); using PyTorch. Reinstall where nvcc is found.")
        return cuda_lib
    return None


def cuda_kernels_enabled() -> bool:
    """Whether ``model.kernels=fused`` may take the CUDA kernels where they are built: the GPU
    check verified them, or ``MEGALITE_CUDA_KERNELS=1`` (the planner asks on any host)."""
    return CUDA_KERNELS_VERIFIED or os.environ.get("MEGALITE_CUDA_KERNELS") == "1"


def model_uses_kernels(device: torch.device) -> bool:
    """Whether ``model.kernels=fused`` runs the compiled kernels on ``device`` (else PyTorch)."""
    if device.type == "cpu":
        return cpu_lib is not None
    if device.type == "cuda":
        return cuda_lib is not None and cuda_kernels_enabled()
    return False


def num_threads() -> int:
    return torch.get_num_threads()


def cuda_stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def launch(lib: ModuleType, kernel: str, x: torch.Tensor, *args,
           workspace: Optional[Callable[[], int]] = None) -> None:
    """Runs ``lib.<kernel>(*args, ...)`` for the tensor ``x`` (``lib`` is ``library_for(x)``).

    The CPU kernels get torch's thread count as their last argument; the CUDA kernels run with
    x's device current and get its current stream last, preceded, when ``workspace`` is given, by
    the address of a scratch buffer of ``workspace()`` bytes (asked on that device, kept alive
    for the call; stream-ordered by the caching allocator)."""
    fn = getattr(lib, kernel)
    if x.device.type == "cpu":
        fn(*args, num_threads())
        return
    with torch.cuda.device(x.device):
        scratch = ()
        if workspace is not None:
            buf = torch.empty(max(workspace(), 1), dtype=torch.uint8, device=x.device)
            scratch = (buf.data_ptr(),)
        fn(*args, *scratch, cuda_stream(x))
