"""Fused scaled masked softmax and scaled causal softmax as torch custom ops, the replacements of
Megatron's ``scaled_masked_softmax`` and ``scaled_upper_triang_masked_softmax``, for any key length.

Forward:  y = softmax(scale * x + M) over the last dim, M = -inf where masked (padding mask True, or
          key j > query i for causal), 0 elsewhere; a row with every key masked gives zeros.
Backward: dx = scale * y * (dy - sum(dy * y)), from the saved output only.

Eager calls go through a plain ``autograd.Function`` (the custom-op dispatcher costs ~100 us a
call on a CPU); under ``torch.compile`` the custom ops are what dynamo sees.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megalite.ops import _backend, reference


def _forward(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
    """x [b, heads, sq, sk]; mask None or bool [b, 1, mask_sq, sk] with mask_sq in (1, sq)."""
    lib = _backend.library_for(x)
    if lib is None:
        return reference.softmax_forward(x, mask, scale, causal)
    x = x.contiguous()
    b, heads, sq, sk = x.shape
    y = torch.empty_like(x)
    mask_sq = 1
    if mask is not None:
        mask = mask.expand(b, 1, mask.shape[2], sk).contiguous()
        mask_sq = mask.shape[2]
    args = (_backend.DTYPE_CODES[x.dtype], x.data_ptr(), 0 if mask is None else mask.data_ptr(),
            y.data_ptr(), b, heads, sq, sk, mask_sq, scale, causal)
    if x.device.type == "cpu":
        lib.softmax_forward(*args, _backend.num_threads())
    else:
        with torch.cuda.device(x.device):
            lib.softmax_forward(*args, _backend.cuda_stream(x))
    return y


softmax_forward = torch.library.custom_op("megalite::softmax_forward", _forward,
                                          mutates_args=())


@softmax_forward.register_fake
def _(x, mask, scale, causal):
    return torch.empty_like(x)


def _backward_impl(dy: Tensor, y: Tensor, scale: float, causal: bool) -> Tensor:
    lib = _backend.library_for(y)
    if lib is None or dy.dtype != y.dtype:
        return reference.softmax_backward(dy, y, scale)
    dy, y = dy.contiguous(), y.contiguous()
    sq, sk = y.shape[-2], y.shape[-1]
    dx = torch.empty_like(y)
    args = (_backend.DTYPE_CODES[y.dtype], dy.data_ptr(), y.data_ptr(), dx.data_ptr(),
            y.numel() // sk, sq, sk, scale, causal)
    if y.device.type == "cpu":
        lib.softmax_backward(*args, _backend.num_threads())
    else:
        with torch.cuda.device(y.device):
            lib.softmax_backward(*args, _backend.cuda_stream(y))
    return dx


softmax_backward = torch.library.custom_op("megalite::softmax_backward", _backward_impl,
                                           mutates_args=())


@softmax_backward.register_fake
def _(dy, y, scale, causal):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    _, _, scale, causal = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.causal = scale, causal


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return softmax_backward(dy, y, ctx.scale, ctx.causal), None, None, None


softmax_forward.register_autograd(_backward, setup_context=_setup_context)


class _Softmax(torch.autograd.Function):
    """The same forward/backward as the custom op, without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, x, mask, scale, causal):
        y = _forward(x, mask, scale, causal)
        ctx.save_for_backward(y)
        ctx.scale, ctx.causal = scale, causal
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return _backward_impl(dy, y, ctx.scale, ctx.causal), None, None, None


def _apply(x, mask, scale, causal):
    if torch.compiler.is_compiling():
        return softmax_forward(x, mask, scale, causal)
    return _Softmax.apply(x, mask, scale, causal)


def scaled_masked_softmax(x: Tensor, mask: Optional[Tensor], scale: float = 1.0) -> Tensor:
    """softmax(scale * x, masked_fill(mask, -inf)) over the last dim of x [b, heads, sq, sk].

    ``mask``: bool, True = masked out (as ``masked_fill``), shaped [b, 1, sq, sk] or [b, 1, 1, sk]
    (a batch of 1 broadcasts); None = no mask. Fully masked rows give zeros, not NaN.
    """
    if x.dim() != 4:
        raise ValueError(f"scaled_masked_softmax: x must be [b, heads, sq, sk], got shape "
                         f"{tuple(x.shape)}")
    if mask is not None:
        b, _, sq, sk = x.shape
        ok = (mask.dim() == 4 and mask.shape[0] in (1, b) and mask.shape[1] == 1
              and mask.shape[2] in (1, sq) and mask.shape[3] == sk)
        if not ok:
            raise ValueError(f"scaled_masked_softmax: mask of shape {tuple(mask.shape)} does not "
                             f"broadcast over heads to x {tuple(x.shape)}: expected [{b}, 1, {sq} "
                             f"or 1, {sk}]")
        if mask.dtype != torch.bool:
            raise ValueError(f"scaled_masked_softmax: mask must be bool (True = masked), got "
                             f"{mask.dtype}")
    return _apply(x, mask, float(scale), False)


def scaled_causal_softmax(x: Tensor, scale: float = 1.0) -> Tensor:
    """softmax(scale * x) over the last dim of x [..., sq, sk] (e.g. [b*heads, sq, sk]) with key j
    hidden from query i when j > i (upper triangle), as ``is_causal`` in
    ``F.scaled_dot_product_attention``."""
    if x.dim() < 2:
        raise ValueError(f"scaled_causal_softmax: x must be [..., sq, sk], got shape "
                         f"{tuple(x.shape)}")
    sq, sk = x.shape[-2], x.shape[-1]
    y = _apply(x.reshape(1, -1, sq, sk), None, float(scale), True)
    return y.view(x.shape)
