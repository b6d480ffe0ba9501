"""Rotary position embeddings (LLaMA), with LLaMA-3.x long-context scaling."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch


def rope_inv_freq(dim: int, theta: float, scaling: Optional[Dict[str, Any]] = None,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2. LLaMA-3.x scaling (``rope_type`` llama3)
    keeps wavelengths shorter than original_max / high_freq_factor, divides those longer than
    original_max / low_freq_factor by ``factor``, and interpolates smoothly between (as HF's
    ``_compute_llama3_parameters``; its attention scaling is 1)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
    if not scaling:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype,
                 scaling: Optional[Dict[str, Any]] = None):
    """cos/sin tables for the given positions, computed in fp32 then cast (as HF does):
    [s, d] for positions [s]; [b, 1, s, d] (broadcast over heads) for per-sample positions
    [b, s]."""
    inv_freq = rope_inv_freq(dim, theta, scaling, positions.device)
    if positions.dim() == 1:
        freqs = torch.outer(positions.float(), inv_freq)  # [s, d/2]
    else:
        freqs = (positions.float()[..., None] * inv_freq).unsqueeze(1)  # [b, 1, s, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [b, heads, s, d] by the half-split convention (HF ``rotate_half``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
