"""PyTorch reference implementations: the semantics the kernels are checked against, and what the
ops compute when no kernel library serves a tensor. Statistics in fp32, result in the input dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def norm_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                 rms: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """LayerNorm y = (x - mean) * rstd * w + b, or RMSNorm y = x * rstd * w (mean = 0), over the
    last dim; returns y and the fp32 mean and rstd of each row (shape x.shape[:-1])."""
    xf = x.float()
    mean = torch.zeros(x.shape[:-1], device=x.device) if rms else xf.mean(-1)
    centered = xf if rms else xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(centered.pow(2).mean(-1) + eps)
    y = centered * rstd.unsqueeze(-1) * weight.float()
    if bias is not None and not rms:
        y = y + bias.float()
    return y.to(x.dtype), mean, rstd


def norm_backward(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                  rms: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w (RMSNorm: no mean(g));
    dw = sum over rows of dy * xhat, db = sum of dy (fp32)."""
    xhat = (x.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dyf = dy.float()
    g = dyf * weight.float()
    proj = (g * xhat).mean(-1, keepdim=True)
    dx = g - xhat * proj if rms else g - g.mean(-1, keepdim=True) - xhat * proj
    dx = dx * rstd.unsqueeze(-1)
    h = x.shape[-1]
    dw = (dyf * xhat).reshape(-1, h).sum(0)
    db = dyf.reshape(-1, h).sum(0)
    return dx.to(x.dtype), dw, db


def softmax_forward(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool) -> Tensor:
    """softmax(scale * x) over the last dim with masked entries (mask True, or key j > query i
    when causal) at -inf; rows with nothing visible give zeros."""
    logits = x.float() * scale
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    if causal:
        sq, sk = x.shape[-2], x.shape[-1]
        above = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(1)
        logits = logits.masked_fill(above, float("-inf"))
    y = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(y, nan=0.0).to(x.dtype)  # all -inf row: 0/0 -> 0


def softmax_backward(dy: Tensor, y: Tensor, scale: float) -> Tensor:
    """dx = scale * y * (dy - sum(dy * y)) (masked entries have y = 0, so dx = 0 there)."""
    yf, dyf = y.float(), dy.float()
    return (scale * yf * (dyf - (dyf * yf).sum(-1, keepdim=True))).to(y.dtype)
