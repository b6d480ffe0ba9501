"""Fused LayerNorm and RMSNorm as torch custom ops (``megalite::norm_forward`` / ``_backward``),
with autograd and fake (meta) implementations so ``torch.compile(fullgraph=True)`` traces them.

Forward: y = (x - mean) * rstd * w + b (LayerNorm) or y = x * rstd * w (RMSNorm) over the last dim,
rstd = 1 / sqrt(var + eps); mean and rstd are kept (fp32) for the backward:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w,  xhat = (x - mean) * rstd
    dw = sum_rows dy * xhat,  db = sum_rows dy
(RMSNorm drops the mean(g) term.) Weights enter the kernels as fp32; their gradients come back in
the weight's dtype.

Eager calls go through a plain ``autograd.Function`` (the custom-op dispatcher costs ~100 us a
call on a CPU); under ``torch.compile`` the custom ops are what dynamo sees.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from megalite.ops import _backend, _checks, reference
from megalite.ops._checks import ptr


def _name(rms: bool) -> str:
    return "rms_norm" if rms else "layer_norm"


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
             rms: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The custom op's implementation: checks its arguments (it may be called directly)."""
    _checks.norm_params(_name(rms), x, weight, bias)
    return _forward_checked(x, weight, bias, eps, rms)


def _forward_checked(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                     rms: bool) -> Tuple[Tensor, Tensor, Tensor]:
    lib = _backend.library_for(x)
    if lib is None:
        return reference.norm_forward(x, weight, bias, eps, rms)
    x = x.contiguous()
    h = x.shape[-1]
    y = torch.empty_like(x)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    w, b = _checks.as_fp32(weight), _checks.as_fp32(None if rms else bias)
    _backend.launch(lib, "norm_forward", x, _checks.dtype_code(x), rms, ptr(x), ptr(w), ptr(b),
                    ptr(y), ptr(mean), ptr(rstd), x.numel() // h, h, eps)
    return y, mean, rstd


norm_forward = torch.library.custom_op("megalite::norm_forward", _forward, mutates_args=())


@norm_forward.register_fake
def _(x, weight, bias, eps, rms):
    _checks.norm_params(_name(rms), x, weight, bias)
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x), mean, torch.empty_like(mean)


def _backward_impl(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                   rms: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The custom op's implementation: checks its arguments (it may be called directly)."""
    _checks.norm_backward_args(_name(rms), dy, x, weight, mean, rstd)
    return _backward_checked(dy, x, weight, mean, rstd, rms)


def _backward_checked(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                      rms: bool) -> Tuple[Tensor, Tensor, Tensor]:
    lib = _backend.library_for(x)
    if lib is None or dy.dtype != x.dtype:
        return reference.norm_backward(dy, x, weight, mean, rstd, rms)
    x, dy = x.contiguous(), dy.contiguous()
    h = x.shape[-1]
    rows = x.numel() // h
    dx = torch.empty_like(x)
    dw = torch.empty(h, dtype=torch.float32, device=x.device)
    db = torch.zeros_like(dw) if rms else torch.empty_like(dw)
    w = _checks.as_fp32(weight)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    _backend.launch(lib, "norm_backward", x, _checks.dtype_code(x), rms, ptr(dy), ptr(x), ptr(w),
                    ptr(mean), ptr(rstd), ptr(dx), ptr(dw), 0 if rms else ptr(db), rows, h,
                    workspace=lambda: lib.norm_backward_workspace(rows, h))
    return dx, dw, db


norm_backward = torch.library.custom_op("megalite::norm_backward", _backward_impl,
                                        mutates_args=())


@norm_backward.register_fake
def _(dy, x, weight, mean, rstd, rms):
    _checks.norm_backward_args(_name(rms), dy, x, weight, mean, rstd)
    h = x.shape[-1]
    return torch.empty_like(x), x.new_empty(h, dtype=torch.float32), x.new_empty(h, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.rms, ctx.has_bias = rms, bias is not None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = norm_backward(dy, x, weight, mean, rstd, ctx.rms)
    db = db.to(weight.dtype) if ctx.has_bias else None
    return dx, dw.to(weight.dtype), db, None, None


norm_forward.register_autograd(_backward, setup_context=_setup_context)


class _Norm(torch.autograd.Function):
    """The same forward/backward as the custom op, without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):  # arguments checked by layer_norm / rms_norm
        y, mean, rstd = _forward_checked(x, weight, bias, eps, rms)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.rms, ctx.has_bias = rms, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # dy as autograd gives it; the rest as forward checked or made it
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward_checked(dy, x, weight, mean, rstd, ctx.rms)
        db = db.to(weight.dtype) if ctx.has_bias else None
        return dx, dw.to(weight.dtype), db, None, None


def _apply(x, weight, bias, eps, rms):
    if torch.compiler.is_compiling():
        return norm_forward(x, weight, bias, eps, rms)[0]
    return _Norm.apply(x, weight, bias, eps, rms)


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim (as ``F.layer_norm(x, (h,), weight, bias, eps)``)."""
    _checks.norm_params("layer_norm", x, weight, bias)
    return _apply(x, weight, bias, eps, False)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight (statistics in fp32)."""
    _checks.norm_params("rms_norm", x, weight, None)
    return _apply(x, weight, None, eps, True)
