"""Per-request KV caches in one preallocated buffer, and the batched single-token decode step.

Each active request owns one row of ``SlotCache`` (per layer: keys and values
[rows, nkv, max_seq_len, d]) and its own length. The active requests always fill rows
0..B-1: a finished request's row is refilled by moving the last active row into it, so a decode
step reads the views ``[:B]`` and copies nothing.

A new request is prefilled alone by ``megalite.generate``'s own prefill (the same forward as
``megalite generate``); its cache is then copied into its row. One decode step runs the B active
requests' next tokens as one batch [B, 1]: each row's token sits at its own position (its
length), attends to its own first ``length + 1`` keys (a padding mask hides the rest of the
row) and writes its key/value at that position. The math is ``Block.forward`` with a cache,
row by row; only the per-row position and the padding mask are new, so the logits equal
``generate``'s up to the order of floating-point sums (tests/test_serve.py bounds it).
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from megalite.models import CausalLM, KVCache
from megalite.models.transformer import apply_rope, rope_cos_sin


class SlotCache:
    """Keys/values of up to ``rows`` requests, one row each, allocated once for the context."""

    def __init__(self, model: CausalLM, rows: int):
        a = model.args
        p = next(model.parameters())
        shape = (rows, a.num_kv_heads, a.max_seq_len, a.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(a.num_layers)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(a.num_layers)]
        self.lengths: List[int] = [0] * rows

    @staticmethod
    def bytes_needed(model: CausalLM, rows: int) -> int:
        """Keys and values of every layer, ``rows`` x the whole context."""
        a, p = model.args, next(model.parameters())
        return 2 * a.num_layers * rows * a.num_kv_heads * a.max_seq_len * a.head_dim * (
            p.element_size())

    def fill(self, row: int, caches: Sequence[KVCache]) -> None:
        """Row ``row`` takes a prefilled request's caches (batch 1)."""
        n = caches[0].length
        for i, c in enumerate(caches):
            self.k[i][row, :, :n] = c.k[0]
            self.v[i][row, :, :n] = c.v[0]
        self.lengths[row] = n

    def move(self, src: int, dst: int) -> None:
        """Row ``dst`` takes row ``src``'s cache (keeps the active rows contiguous)."""
        n = self.lengths[src]
        for k, v in zip(self.k, self.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n


@torch.no_grad()
def decode_step(model: CausalLM, cache: SlotCache, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] of the next token of rows 0..B-1, given their newest tokens [B]; each
    row's key/value is appended to its cache and its length advanced."""
    b = tokens.shape[0]
    lengths = cache.lengths[:b]
    span = max(lengths) + 1  # the longest row's keys, its new one included
    pos = torch.tensor(lengths, device=tokens.device)  # [B]: each new token's position
    rows = torch.arange(b, device=tokens.device)
    # [B, 1, 1, span]: row r attends to its keys 0..lengths[r] (its new one last)
    attend = (torch.arange(span, device=tokens.device)[None, :] <= pos[:, None])[:, None, None]
    x = model.embed(tokens[:, None], positions=pos[:, None])  # [B, 1, h]
    first = model.layers[0].attn
    if first.rope_theta is not None:  # the same rotation in every layer: [B, 1, 1, d]
        cos, sin = rope_cos_sin(pos[:, None], first.head_dim, first.rope_theta,
                                x.dtype, first.rope_scaling)
    for i, block in enumerate(model.layers):
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x))
        q = q.view(b, 1, -1, attn.head_dim).transpose(1, 2)  # [B, nh, 1, d]
        k = k.view(b, 1, -1, attn.head_dim).transpose(1, 2)  # [B, nkv, 1, d]
        v = v.view(b, 1, -1, attn.head_dim).transpose(1, 2)
        if attn.rope_theta is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[i][rows, :, pos] = k[:, :, 0]  # [B, nkv, d] into each row's next position
        cache.v[i][rows, :, pos] = v[:, :, 0]
        keys, values = cache.k[i][:b, :, :span], cache.v[i][:b, :, :span]
        y = attn.core(q, keys, values, attend, False, None)  # grouped-query expansion, SDPA
        x = x + block.drop(attn.o_proj(y.transpose(1, 2).reshape(b, 1, -1)))
        x = x + block.drop(block.mlp(block.mlp_norm(x)))
    for r in range(b):
        cache.lengths[r] += 1
    return model.head(x)[:, -1]
