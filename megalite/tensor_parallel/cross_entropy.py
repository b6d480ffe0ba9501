"""Cross-entropy over vocab-parallel logits, without ever gathering the full vocabulary.

Rank r holds ``z_r``, the logits of vocab ids ``[vocab_start, vocab_start + V_local)``. For a
token with label ``y``:

    m    = max_r max_j z_r[j]                    (all-reduce MAX)
    S    = sum_r sum_j exp(z_r[j] - m)           (all-reduce SUM)
    z_y  = sum_r [y in r's range] z_r[y]         (all-reduce SUM, same call as S)
    loss = log S - (z_y - m)

and the loss is summed, or averaged, over the tokens whose label is not ``ignore_index``. Backward, on the
local slice only: ``dL/dz_r = (softmax_r - onehot_r(y)) * grad_output / num_valid`` (zero rows
for ignored tokens). Columns whose GLOBAL index is >= ``vocab_size`` are vocab padding: they are
set to -inf first, so they get probability 0 and a gradient of exactly 0.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megalite.parallel import comm
from megalite.parallel.comm import CommMeter

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, group, vocab_start: int,
                vocab_size: int, meter: Optional[CommMeter], ignore_index: int,
                reduction: str) -> torch.Tensor:
        v_local = logits.shape[-1]
        # fp32 working copy (never modify the caller's logits): [N, V_local]
        z = logits.reshape(-1, v_local).to(torch.float32, copy=True)
        y = labels.reshape(-1)
        if z.shape[0] != y.shape[0]:
            raise ValueError(f"vocab_parallel_cross_entropy: {z.shape[0]} logit rows but "
                             f"{y.shape[0]} labels")
        n_real = vocab_size - vocab_start  # local columns [n_real, V_local) are padding
        if n_real < v_local:
            z[:, max(n_real, 0):] = float("-inf")

        m = z.max(dim=-1).values
        comm.all_reduce(m, group, meter, op=dist.ReduceOp.MAX)
        z.sub_(m.unsqueeze(-1))

        valid = y != ignore_index
        local = y - vocab_start
        mine = valid & (local >= 0) & (local < v_local)
        local = local.masked_fill(~mine, 0)
        target = z.gather(1, local.unsqueeze(-1)).squeeze(-1)
        target = torch.where(mine, target, torch.zeros_like(target))

        z.exp_()  # z is now exp(z - m)
        sums = torch.stack([z.sum(dim=-1), target])  # [2, N]: one all-reduce for both SUMs
        comm.all_reduce(sums, group, meter)
        sum_exp, target = sums[0], sums[1]

        per_token = torch.where(valid, torch.log(sum_exp) - target, torch.zeros_like(target))
        if reduction == "sum":
            num_valid = torch.ones((), dtype=torch.float32, device=z.device)
        else:
            num_valid = valid.sum().clamp(min=1).to(torch.float32)
        loss = per_token.sum() / num_valid

        z.div_(sum_exp.unsqueeze(-1))  # softmax over the full vocab, local slice
        ctx.save_for_backward(z, local, mine, valid, num_valid)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        softmax, local, mine, valid, num_valid = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local] -= mine.to(grad.dtype)
        grad.mul_((valid.to(grad.dtype) * (grad_output / num_valid)).unsqueeze(-1))
        return grad.reshape(ctx.shape).to(ctx.dtype), None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group,
                                 vocab_start: int, vocab_size: int,
                                 meter: Optional[CommMeter] = None,
                                 ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """Mean (or with ``reduction="sum"`` summed) cross-entropy over non-ignored tokens (a
    scalar, fp32).

    ``logits``: ``[..., V_local]``, this rank's vocab slice starting at global id
    ``vocab_start`` (any float dtype; computed in fp32). ``labels``: ``[...]`` full-vocab ids or
    ``ignore_index``. ``vocab_size``: the real (unpadded) vocab; global columns at or beyond it
    are padding. With no valid token the loss is 0 (and so is the gradient), where
    ``F.cross_entropy`` would return NaN. Collectives: one all-reduce MAX and one all-reduce
    SUM of ``[2, N]`` fp32 values (sum-exp and target logit), N = number of tokens.
    """
    return _VocabParallelCrossEntropy.apply(logits, labels, group, vocab_start, vocab_size,
                                            meter, ignore_index, reduction)
