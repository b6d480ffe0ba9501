"""Argument checks and conversions of the fused kernels, on the Python side.

The compiled kernels (``csrc/bind_cpu.cpp``, ``csrc/bind_cuda.cpp``) receive raw pointers and sizes
only: they cannot tell a weight on another device, of another dtype or of another length from a
good one. So every tensor whose pointer an op hands to a kernel is checked here first, before any
``data_ptr()`` is taken, and a mismatch is a one-line ``ValueError`` naming the op, the argument,
what it got and what it expected. The same checks run whichever backend serves the call (CPU or
CUDA kernel, or the PyTorch reference), so an argument is accepted or refused the same everywhere.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

# activation dtypes the kernels implement, with their code in csrc/megalite_kernels.h (ML_F32...)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _fail(op: str, name: str, what: str, got, expected: str) -> None:
    raise ValueError(f"{op}: {name} has {what} {got}, expected {expected}")


def expect(op: str, name: str, t: Tensor, *, device: Optional[torch.device] = None,
           dtypes: Sequence[torch.dtype] = (), shape: Optional[Sequence[int]] = None,
           why: str = "") -> None:
    """``t`` (argument ``name`` of ``op``) is on ``device``, of one of ``dtypes`` and of ``shape``
    (each when given); ``why``, appended to the expectation, says where it comes from."""
    why = f" {why}" if why else ""
    if device is not None and t.device != device:
        _fail(op, name, "device", t.device, f"{device}{why}")
    if dtypes and t.dtype not in dtypes:
        _fail(op, name, "dtype", t.dtype, " or ".join(map(str, dtypes)) + why)
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(op, name, "shape", tuple(t.shape), f"{tuple(shape)}{why}")


def norm_params(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """LayerNorm/RMSNorm weight and bias: shape (h,) for an input normalised over its last dim h,
    on the input's device, and of the input's dtype or fp32 (an fp32 master weight with 16-bit
    activations: the kernels read both as fp32)."""
    h = x.shape[-1] if x.dim() else 0
    device, dtype = x.device, x.dtype
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None or (t.shape == (h,) and t.device == device
                         and (t.dtype == dtype or t.dtype == torch.float32)):
            continue  # the common case, without building any message
        expect(op, name, t, shape=(h,),
               why=f"for input of shape {tuple(x.shape)} (normalised over the last dim)")
        expect(op, name, t, device=device, why="(the input's)")
        also = "" if dtype == torch.float32 else " or torch.float32"
        _fail(op, name, "dtype", t.dtype, f"{dtype} (the input's){also}")


def norm_backward_args(op: str, dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                       rstd: Tensor) -> None:
    """The backward's gradient (x's shape and device) and saved fp32 statistics (one per row)."""
    norm_params(op, x, weight, None)
    device, rows = x.device, x.shape[:-1]
    if (dy.shape == x.shape and dy.device == device and mean.shape == rows
            and rstd.shape == rows and mean.device == device and rstd.device == device
            and mean.dtype == torch.float32 and rstd.dtype == torch.float32):
        return
    expect(op, "dy", dy, device=device, shape=x.shape, why="(the input's)")
    for name, t in (("mean", mean), ("rstd", rstd)):
        expect(op, name, t, device=device, dtypes=(torch.float32,), shape=rows,
               why="(one fp32 value per row of the input)")


def softmax_mask(op: str, x: Tensor, mask: Optional[Tensor]) -> None:
    """x [b, heads, sq, sk] and its padding mask: bool, on x's device, broadcasting over heads (and
    batch, query) to x."""
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [b, heads, sq, sk], got shape {tuple(x.shape)}")
    if mask is None:
        return
    b, _, sq, sk = x.shape
    ok = (mask.dim() == 4 and mask.shape[0] in (1, b) and mask.shape[1] == 1
          and mask.shape[2] in (1, sq) and mask.shape[3] == sk)
    if not ok:
        raise ValueError(f"{op}: mask of shape {tuple(mask.shape)} does not broadcast over heads "
                         f"to x {tuple(x.shape)}: expected [{b}, 1, {sq} or 1, {sk}]")
    if mask.dtype != torch.bool:
        raise ValueError(f"{op}: mask must be bool (True = masked), got {mask.dtype}")
    if mask.device != x.device:
        expect(op, "mask", mask, device=x.device, why="(x's)")


def same_as(op: str, name: str, t: Tensor, like: Tensor, like_name: str) -> None:
    """A gradient ``t`` with the device and shape of ``like``."""
    if t.shape != like.shape or t.device != like.device:
        expect(op, name, t, device=like.device, shape=like.shape, why=f"({like_name}'s)")


# ---- conversions: what the kernels are given, once the checks have passed

def dtype_code(x: Tensor) -> int:
    return DTYPE_CODES[x.dtype]


def as_fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    """A weight or bias as the kernels read it: fp32, contiguous (None stays None)."""
    return None if t is None else t.float().contiguous()


def ptr(t: Optional[Tensor]) -> int:
    """The address handed to a kernel; 0 (NULL) for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()
