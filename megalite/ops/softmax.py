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

from megalite.ops import _backend, _checks, reference
from megalite.ops._checks import ptr


def _name(causal: bool) -> str:
    return "scaled_causal_softmax" if causal else "scaled_masked_softmax"


def _forward(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
    """The custom op's implementation: checks its arguments (it may be called directly)."""
    _checks.softmax_mask(_name(causal), x, mask)
    return _forward_checked(x, mask, scale, causal)


def _forward_checked(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
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
    _backend.launch(lib, "softmax_forward", x, _checks.dtype_code(x), ptr(x), ptr(mask), ptr(y),
                    b, heads, sq, sk, mask_sq, scale, causal)
    return y


softmax_forward = torch.library.custom_op("megalite::softmax_forward", _forward,
                                          mutates_args=())


@softmax_forward.register_fake
def _(x, mask, scale, causal):
    _checks.softmax_mask(_name(causal), x, mask)
    return torch.empty_like(x)


def _backward_impl(dy: Tensor, y: Tensor, scale: float, causal: bool) -> Tensor:
    """The custom op's implementation: checks its arguments (it may be called directly)."""
    _checks.same_as(_name(causal), "dy", dy, y, "the output")
    return _backward_checked(dy, y, scale, causal)


def _backward_checked(dy: Tensor, y: Tensor, scale: float, causal: bool) -> Tensor:
    lib = _backend.library_for(y)
    if lib is None or dy.dtype != y.dtype:
        return reference.softmax_backward(dy, y, scale)
    dy, y = dy.contiguous(), y.contiguous()
    sq, sk = y.shape[-2], y.shape[-1]
    dx = torch.empty_like(y)
    _backend.launch(lib, "softmax_backward", y, _checks.dtype_code(y), ptr(dy), ptr(y), ptr(dx),
                    y.numel() // sk, sq, sk, scale, causal)
    return dx


softmax_backward = torch.library.custom_op("megalite::softmax_backward", _backward_impl,
                                           mutates_args=())


@softmax_backward.register_fake
def _(dy, y, scale, causal):
    _checks.same_as(_name(causal), "dy", dy, y, "the output")
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
    def forward(ctx, x, mask, scale, causal):  # arguments checked by the public functions
        y = _forward_checked(x, mask, scale, causal)
        ctx.save_for_backward(y)
        ctx.scale, ctx.causal = scale, causal
        return y

    @staticmethod
    def backward(ctx, dy):  # dy as autograd gives it, for the y forward made
        (y,) = ctx.saved_tensors
        return _backward_checked(dy, y, ctx.scale, ctx.causal), None, None, None


def _apply(x, mask, scale, causal):
    if torch.compiler.is_compiling():
        return softmax_forward(x, mask, scale, causal)
    return _Softmax.apply(x, mask, scale, causal)


def scaled_masked_softmax(x: Tensor, mask: Optional[Tensor], scale: float = 1.0) -> Tensor:
    """softmax(scale * x, masked_fill(mask, -inf)) over the last dim of x [b, heads, sq, sk].

    ``mask``: bool, True = masked out (as ``masked_fill``), shaped [b, 1, sq, sk] or [b, 1, 1, sk]
    (a batch of 1 broadcasts); None = no mask. Fully masked rows give zeros, not NaN.
    """
    _checks.softmax_mask("scaled_masked_softmax", x, mask)
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
