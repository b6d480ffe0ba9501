"""Tensor-parallel linear and embedding layers (Megatron-LM style), batch-first ``[b, s, h]``.

Parameters are created EMPTY with this rank's shard shape; ``load_full`` (or ``from_linear`` /
``from_embedding``) copies in this rank's exact slice of a full weight. Attributes the trainer
reads on parameters:

* ``tp_sharded = True``: split over the TP group, each rank holds a different piece
  (``tp_dim`` says along which dim); absent on replicated parameters.
* ``tp_partial_grad = True``: replicated, but under sequence parallelism each rank's gradient is
  only its sequence chunk's share, so the trainer sums it over the TP group.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.parallel import comm
from megalite.parallel.comm import CommMeter
from megalite.tensor_parallel.collectives import (gather_from_tp, gather_seq, reduce_from_tp,
                                                  reduce_scatter_seq, tp_rank_of)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "pad_vocab"]


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp != 0:
        raise ValueError(f"tensor parallel: {what}={n} is not divisible by the TP size {tp}")
    return n // tp


def _shard_param(shape, dim: int, device, dtype) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
    p.tp_sharded = True
    p.tp_dim = dim
    return p


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"{what}: shard of shape {tuple(src.shape)} does not fit the parameter "
                         f"of shape {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


class _LinearAllReduceGrad(torch.autograd.Function):
    """``Y = f(X) W^T + b`` with f fused in: forward a plain linear; backward computes
    ``dL/dX = dY W``, starts its all-reduce asynchronously and computes ``dL/dW = dY^T X`` and
    ``dL/db`` while it runs (Megatron's overlap), then waits."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                group, meter: Optional[CommMeter]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.meter, ctx.has_bias = group, meter, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = work = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight)  # a fresh tensor: reduced in place
            work = comm.all_reduce(grad_x, ctx.group, ctx.meter, async_op=True)
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = g2.t().matmul(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if work is not None:
            work.wait()
        return grad_x, grad_w, grad_b, None, None


class ColumnParallelLinear(nn.Module):
    """``Y = XA + b`` with ``A = [A_1 ... A_p]`` split along its output columns.

    Rank r holds ``A_r`` (stored as ``weight[out/p, in]``, rows of nn.Linear's ``[out, in]``) and
    ``b_r``, and computes ``Y_r = f(X) A_r + b_r``. f is the identity forward and an all-reduce
    of ``dL/dX`` backward (``copy_to_tp``, fused here so that all-reduce overlaps the weight
    gradient's matmul); with ``sequence_parallel`` the input arrives split
    along the sequence and f becomes ḡ (all-gather forward, reduce-scatter backward).
    ``gather_output`` all-gathers ``Y = [Y_1 ... Y_p]`` along the last dim (backward: keep own
    chunk); otherwise the output stays split, ready for a :class:`RowParallelLinear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group,
                 meter: Optional[CommMeter] = None, sequence_parallel: bool = False,
                 gather_output: bool = False, device=None, dtype=None):
        super().__init__()
        self.group, self.meter = group, meter
        self.in_features, self.out_features = in_features, out_features
        self.tp_size, self.tp_rank = comm.group_size(group), tp_rank_of(group)
        self.sequence_parallel, self.gather_output = sequence_parallel, gather_output
        self.out_per_rank = _divide(out_features, self.tp_size, "out_features")
        self.weight = _shard_param((self.out_per_rank, in_features), 0, device, dtype)
        if bias:
            self.bias = _shard_param((self.out_per_rank,), 0, device, dtype)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            y = F.linear(gather_seq(x, self.group, self.meter), self.weight, self.bias)
        elif self.tp_size > 1:  # copy_to_tp + F.linear, its all-reduce overlapped with dL/dW
            y = _LinearAllReduceGrad.apply(x, self.weight, self.bias, self.group, self.meter)
        else:
            y = F.linear(x, self.weight, self.bias)
        return gather_from_tp(y, self.group, -1, self.meter) if self.gather_output else y

    def load_full(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Copy this rank's rows ``weight.chunk(p, 0)[r]`` (and ``bias.chunk(p)[r]``)."""
        _copy(self.weight, weight.chunk(self.tp_size, 0)[self.tp_rank], "ColumnParallelLinear")
        if bias is not None:
            if self.bias is None:
                raise ValueError("ColumnParallelLinear: got a bias for a layer without one")
            _copy(self.bias, bias.chunk(self.tp_size, 0)[self.tp_rank], "ColumnParallelLinear")

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, meter: Optional[CommMeter] = None,
                    sequence_parallel: bool = False,
                    gather_output: bool = False) -> "ColumnParallelLinear":
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group,
                    meter, sequence_parallel, gather_output, device=w.device, dtype=w.dtype)
        layer.load_full(w.detach(), None if linear.bias is None else linear.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (/{self.tp_size}), "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``Y = XA + b`` with ``A = [A_1; ...; A_p]`` split along its input rows and ``X = [X_1 ...
    X_p]`` already split along the last dim (a column-parallel layer's output).

    Rank r holds ``A_r`` (stored as ``weight[out, in/p]``, columns of nn.Linear's weight) and
    computes the partial sum ``X_r A_r``; g sums them, ``Y = g(sum_r X_r A_r) + b``: an
    all-reduce forward, identity backward (``reduce_from_tp``), or with ``sequence_parallel`` a
    reduce-scatter along the sequence forward and an all-gather backward. The bias ``b`` is
    replicated and added AFTER the reduction, so it counts once; under sequence parallelism its
    gradient on each rank covers only its sequence chunk (``bias.tp_partial_grad = True``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group,
                 meter: Optional[CommMeter] = None, sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.group, self.meter = group, meter
        self.in_features, self.out_features = in_features, out_features
        self.tp_size, self.tp_rank = comm.group_size(group), tp_rank_of(group)
        self.sequence_parallel = sequence_parallel
        self.in_per_rank = _divide(in_features, self.tp_size, "in_features")
        self.weight = _shard_param((out_features, self.in_per_rank), 1, device, dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
            if sequence_parallel and self.tp_size > 1:
                self.bias.tp_partial_grad = True
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_seq(y, self.group, self.meter)
        else:
            y = reduce_from_tp(y, self.group, self.meter)
        return y if self.bias is None else y + self.bias

    def load_full(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Copy this rank's columns ``weight.chunk(p, 1)[r]`` and the whole bias."""
        _copy(self.weight, weight.chunk(self.tp_size, 1)[self.tp_rank], "RowParallelLinear")
        if bias is not None:
            if self.bias is None:
                raise ValueError("RowParallelLinear: got a bias for a layer without one")
            _copy(self.bias, bias, "RowParallelLinear")

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, meter: Optional[CommMeter] = None,
                    sequence_parallel: bool = False) -> "RowParallelLinear":
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group,
                    meter, sequence_parallel, device=w.device, dtype=w.dtype)
        layer.load_full(w.detach(), None if linear.bias is None else linear.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (/{self.tp_size}), out={self.out_features}, "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}")


_REDUCE_MODES = ("all", "scatter_seq", "none")


class VocabParallelEmbedding(nn.Module):
    """``Y = onehot(T) E`` with ``E = [E_1; ...; E_p]`` split along the vocabulary.

    Rank r holds rows ``[r V/p, (r+1) V/p)``; tokens outside them look up row 0 and are zeroed,
    so ``Y^(r)`` is a partial sum and ``Y = sum_r Y^(r)``. ``reduce``: ``"all"`` -> g
    (all-reduce forward, identity backward); ``"scatter_seq"`` -> reduce-scatter along the
    sequence (sequence parallelism, output ``[b, s/p, h]``; all-gather backward); ``"none"`` ->
    return the partial sum. Each rank's weight gradient only receives its own rows' tokens.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group,
                 meter: Optional[CommMeter] = None, reduce: str = "all", device=None, dtype=None):
        super().__init__()
        if reduce not in _REDUCE_MODES:
            raise ValueError(f"VocabParallelEmbedding: reduce={reduce!r}, expected one of "
                             f"{_REDUCE_MODES}")
        self.group, self.meter, self.reduce = group, meter, reduce
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_size, self.tp_rank = comm.group_size(group), tp_rank_of(group)
        per_rank = _divide(num_embeddings, self.tp_size, "num_embeddings (vocab size)")
        self.vocab_start, self.vocab_end = self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank
        self.weight = _shard_param((per_rank, embedding_dim), 0, device, dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        y = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce == "all":
            return reduce_from_tp(y, self.group, self.meter)
        if self.reduce == "scatter_seq":
            return reduce_scatter_seq(y, self.group, self.meter)
        return y

    def load_full(self, weight: torch.Tensor) -> None:
        """Copy this rank's rows ``weight[vocab_start:vocab_end]`` (``weight`` already padded)."""
        if weight.shape[0] != self.num_embeddings:
            raise ValueError(f"VocabParallelEmbedding: full weight has {weight.shape[0]} rows, "
                             f"expected {self.num_embeddings} (pad the vocab first: pad_vocab)")
        _copy(self.weight, weight[self.vocab_start:self.vocab_end], "VocabParallelEmbedding")

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group, meter: Optional[CommMeter] = None,
                       reduce: str = "all") -> "VocabParallelEmbedding":
        w = emb.weight
        layer = cls(emb.num_embeddings, emb.embedding_dim, group, meter, reduce,
                    device=w.device, dtype=w.dtype)
        layer.load_full(w.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (/{self.tp_size}: [{self.vocab_start}, "
                f"{self.vocab_end})), {self.embedding_dim}, reduce={self.reduce}")


def pad_vocab(vocab_size: int, tp: int, multiple: int = 64) -> int:
    """Smallest multiple of ``tp * multiple`` that is >= ``vocab_size``."""
    if vocab_size < 1 or tp < 1 or multiple < 1:
        raise ValueError(f"pad_vocab: vocab_size={vocab_size}, tp={tp}, multiple={multiple} "
                         f"must all be >= 1")
    step = tp * multiple
    return -(-vocab_size // step) * step
