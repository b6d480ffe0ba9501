"""Tensor-parallel linear and embedding layers (Megatron-LM style), batch-first ``[b, s, h]``.

These are the layers the plan trains with and ``bench/tp.py`` measures. Parameters are created
EMPTY with this rank's shard shape; ``load_full`` (or ``from_linear`` / ``from_embedding``)
copies in this rank's exact slice of a full weight. Which parameters are split, and which get
only a partial gradient, is recorded by the plan (``ShardLayout``), not on the tensors.

Zero-bubble (``megalite.pipeline.zero_bubble``): every linear layer here has a ``wgrad_store``
(None by default). When it is set and ``store.defer(fn)`` accepts ``fn``, the backward returns
no weight gradient; ``fn`` computes ``dW = dYᵀX`` later (the W pass) and adds it with
``store.accumulate(weight, dW)``. Input and bias gradients are always computed at once.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.parallel import comm
from megalite.parallel.comm import CommMeter
from megalite.tensor_parallel.collectives import (gather_along, reduce_from_tp,
                                                  reduce_scatter_seq, start_all_reduce,
                                                  start_reduce_scatter, tp_rank_of)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "column_parallel", "deferrable_linear", "pad_vocab"]


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp != 0:
        raise ValueError(f"tensor parallel: {what}={n} is not divisible by the TP size {tp}")
    return n // tp


def _empty(shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"{what}: shard of shape {tuple(src.shape)} does not fit the parameter "
                         f"of shape {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def _weight_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dW = dYᵀ X`` over all leading dims: [..., out], [..., in] -> [out, in]."""
    return dy.reshape(-1, dy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))


def _weight_grad_or_defer(layer: nn.Module, dy: torch.Tensor,
                          x: torch.Tensor) -> Optional[torch.Tensor]:
    """``layer``'s dW now, or None when its zero-bubble store takes it for the W pass."""
    store = layer.wgrad_store
    if store is not None:
        weight = layer.weight
        if store.defer(lambda: store.accumulate(weight, _weight_grad(dy, x))):
            return None
    return _weight_grad(dy, x)


def _bias_grad(dy: torch.Tensor) -> torch.Tensor:
    return dy.reshape(-1, dy.shape[-1]).sum(0)


class _ColumnParallel(torch.autograd.Function):
    """``Y_i = f(X) W_iᵀ + b_i`` for the weights of one or more column-parallel layers that
    read the same X (Megatron's LinearWithGradAccumulationAndAsyncCommunication, over several
    weights).

    Forward: f is the identity, or with sequence parallelism ḡ, the all-gather of the sequence
    chunks ``[b, s/p, h] -> [b, s, h]`` (the gathered X is kept for backward, not re-gathered).
    Backward: ``dX = Σ_i dY_i W_i``; its all-reduce over the TP group (with SP: its
    reduce-scatter along the sequence) is started asynchronously, the weight gradients
    ``dW_i = dY_iᵀ X`` and ``db_i`` are computed while it is in flight, then it is waited for.
    When the layers' zero-bubble store defers dW (zb-h1's B pass), only the ``db_i`` sums
    overlap the collective and the backward waits on it almost at once; the dW matmuls run in
    the W pass instead, where they fill a pipeline bubble.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layers: Tuple["ColumnParallelLinear", ...],
                *params: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        first = layers[0]
        ctx.layers, ctx.sequence_parallel = layers, first.sequence_parallel
        if ctx.sequence_parallel:
            x = gather_along(x, first.group, 1, first.meter)  # [b, s, h]
        weights, biases = params[0::2], params[1::2]
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = [b is not None for b in biases]
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor):
        x, *weights = ctx.saved_tensors
        first = ctx.layers[0]
        grads = [g.to(w.dtype) for g, w in zip(grads, weights)]
        finish = None
        if ctx.needs_input_grad[0]:
            dx = grads[0].matmul(weights[0])  # a fresh tensor: reduced in place
            flat = dx.view(-1, dx.shape[-1])
            for g, w in zip(grads[1:], weights[1:]):
                flat.addmm_(g.reshape(-1, g.shape[-1]), w)
            if ctx.sequence_parallel:
                finish = start_reduce_scatter(dx, first.group, 1, first.meter)
            else:
                finish = start_all_reduce(dx, first.group, first.meter)
        param_grads = []
        for i, (layer, g) in enumerate(zip(ctx.layers, grads)):
            need_w, need_b = ctx.needs_input_grad[2 + 2 * i], ctx.needs_input_grad[3 + 2 * i]
            param_grads.append(_weight_grad_or_defer(layer, g, x) if need_w else None)
            param_grads.append(_bias_grad(g) if ctx.has_bias[i] and need_b else None)
        return (finish() if finish is not None else None, None, *param_grads)


def column_parallel(x: torch.Tensor,
                    layers: Sequence["ColumnParallelLinear"]) -> Tuple[torch.Tensor, ...]:
    """``(Y_1, ..., Y_n)``, ``Y_i = layers[i](x)``, with ONE entry collective for all of them
    (attention's q/k/v, SwiGLU's gate/up): this rank's shard of the fused weight
    ``[A_1,r; ...; A_n,r]`` without ever concatenating it. The layers share the TP group and
    the sequence-parallel setting."""
    first = layers[0]
    assert all(m.group is first.group and m.sequence_parallel == first.sequence_parallel
               for m in layers), "column_parallel: layers of one region share group and SP"
    params = [p for m in layers for p in (m.weight, m.bias)]
    return _ColumnParallel.apply(x, tuple(layers), *params)


class ColumnParallelLinear(nn.Module):
    """``Y = XA + b`` with ``A = [A_1 ... A_p]`` split along its output columns.

    Rank r holds ``A_r`` (stored as ``weight[out/p, in]``, rows of nn.Linear's ``[out, in]``) and
    ``b_r``, and computes ``Y_r = f(X) A_r + b_r``: the output stays split, ready for a
    :class:`RowParallelLinear` (or the vocab-parallel cross-entropy). f, identity forward and
    all-reduce of ``dL/dX`` backward, is fused into the layer so that all-reduce overlaps the
    weight-gradient matmuls; with ``sequence_parallel`` the input arrives split along the
    sequence and f becomes ḡ (all-gather forward, reduce-scatter backward). Several layers
    reading one input share a single f through :func:`column_parallel`.

    ``split=False`` keeps the whole ``A`` on every rank (grouped-query attention with fewer kv
    heads than TP ranks: each rank then uses only the heads its queries need, so its weight
    gradient is partial, which the plan records).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group,
                 meter: Optional[CommMeter] = None, sequence_parallel: bool = False,
                 split: bool = True, device=None, dtype=None):
        super().__init__()
        self.group, self.meter = group, meter
        self.in_features, self.out_features = in_features, out_features
        self.tp_size, self.tp_rank = comm.group_size(group), tp_rank_of(group)
        self.sequence_parallel, self.split = sequence_parallel, split
        self.wgrad_store = None  # zero-bubble: see the module docstring
        parts = self.tp_size if split else 1
        self.out_per_rank = _divide(out_features, parts, "out_features")
        self.weight = _empty((self.out_per_rank, in_features), device, dtype)
        if bias:
            self.bias = _empty((self.out_per_rank,), device, dtype)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel(x, (self,))[0]

    def _mine(self, full: torch.Tensor) -> torch.Tensor:
        return full.chunk(self.tp_size, 0)[self.tp_rank] if self.split else full

    def load_full(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Copy this rank's rows ``weight.chunk(p, 0)[r]`` (and ``bias.chunk(p)[r]``)."""
        _copy(self.weight, self._mine(weight), "ColumnParallelLinear")
        if bias is not None:
            if self.bias is None:
                raise ValueError("ColumnParallelLinear: got a bias for a layer without one")
            _copy(self.bias, self._mine(bias), "ColumnParallelLinear")

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, meter: Optional[CommMeter] = None,
                    sequence_parallel: bool = False) -> "ColumnParallelLinear":
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group,
                    meter, sequence_parallel, device=w.device, dtype=w.dtype)
        layer.load_full(w.detach(), None if linear.bias is None else linear.bias.detach())
        return layer

    def extra_repr(self) -> str:
        split = f"/{self.tp_size}" if self.split else "replicated"
        return (f"in={self.in_features}, out={self.out_features} ({split}), "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}")


class _DeferrableLinear(torch.autograd.Function):
    """``Y = X Wᵀ (+ b)``; backward returns dX (and db) at once, dW now or through the layer's
    zero-bubble store."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.to(weight.dtype)
        dx = dy.matmul(weight) if ctx.needs_input_grad[0] else None
        dw = _weight_grad_or_defer(ctx.layer, dy, x) if ctx.needs_input_grad[2] else None
        db = _bias_grad(dy) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, None, dw, db


def deferrable_linear(x: torch.Tensor, layer: nn.Module,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, layer.weight, bias)``, its dW deferred while ``layer.wgrad_store`` is set
    and deferring."""
    if layer.wgrad_store is None:
        return F.linear(x, layer.weight, bias)
    return _DeferrableLinear.apply(x, layer, layer.weight, bias)


class RowParallelLinear(nn.Module):
    """``Y = XA + b`` with ``A = [A_1; ...; A_p]`` split along its input rows and ``X = [X_1 ...
    X_p]`` already split along the last dim (a column-parallel layer's output).

    Rank r holds ``A_r`` (stored as ``weight[out, in/p]``, columns of nn.Linear's weight) and
    computes the partial sum ``X_r A_r``; g sums them, ``Y = g(sum_r X_r A_r) + b``: an
    all-reduce forward, identity backward (``reduce_from_tp``), or with ``sequence_parallel`` a
    reduce-scatter along the sequence forward and an all-gather backward. The bias ``b`` is
    replicated and added AFTER the reduction, so it counts once; under sequence parallelism its
    gradient on each rank covers only its sequence chunk (a partial gradient).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group,
                 meter: Optional[CommMeter] = None, sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.group, self.meter = group, meter
        self.in_features, self.out_features = in_features, out_features
        self.tp_size, self.tp_rank = comm.group_size(group), tp_rank_of(group)
        self.sequence_parallel = sequence_parallel
        self.wgrad_store = None  # zero-bubble: see the module docstring
        self.in_per_rank = _divide(in_features, self.tp_size, "in_features")
        self.weight = _empty((out_features, self.in_per_rank), device, dtype)
        if bias:
            self.bias = _empty((out_features,), device, dtype)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = deferrable_linear(x, self)  # [b, s, out], this rank's partial sum
        if self.sequence_parallel:
            y = reduce_scatter_seq(y, self.group, self.meter)  # [b, s/p, out]
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


class VocabParallelEmbedding(nn.Module):
    """``Y = onehot(T) E`` with ``E = [E_1; ...; E_p]`` split along the vocabulary.

    Rank r holds rows ``[r V/p, (r+1) V/p)``; tokens outside them look up row 0 and are zeroed,
    so ``Y^(r)`` is a partial sum and ``Y = sum_r Y^(r)``: g all-reduces it (identity backward),
    or with ``sequence_parallel`` a reduce-scatter along the sequence gives this rank's chunk
    ``[b, s/p, h]`` (all-gather backward). Each rank's weight gradient only receives its own
    rows' tokens.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group,
                 meter: Optional[CommMeter] = None, sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.group, self.meter, self.sequence_parallel = group, meter, sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_size, self.tp_rank = comm.group_size(group), tp_rank_of(group)
        per_rank = _divide(num_embeddings, self.tp_size, "num_embeddings (vocab size)")
        self.vocab_start, self.vocab_end = self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank
        self.weight = _empty((per_rank, embedding_dim), device, dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        y = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_seq(y, self.group, self.meter)
        return reduce_from_tp(y, self.group, self.meter)

    def load_full(self, weight: torch.Tensor) -> None:
        """Copy this rank's rows ``weight[vocab_start:vocab_end]`` (``weight`` already padded)."""
        if weight.shape[0] != self.num_embeddings:
            raise ValueError(f"VocabParallelEmbedding: full weight has {weight.shape[0]} rows, "
                             f"expected {self.num_embeddings} (pad the vocab first: pad_vocab)")
        _copy(self.weight, weight[self.vocab_start:self.vocab_end], "VocabParallelEmbedding")

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group, meter: Optional[CommMeter] = None,
                       sequence_parallel: bool = False) -> "VocabParallelEmbedding":
        w = emb.weight
        layer = cls(emb.num_embeddings, emb.embedding_dim, group, meter, sequence_parallel,
                    device=w.device, dtype=w.dtype)
        layer.load_full(w.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (/{self.tp_size}: [{self.vocab_start}, "
                f"{self.vocab_end})), {self.embedding_dim}, sp={self.sequence_parallel}")


def pad_vocab(vocab_size: int, tp: int, multiple: int = 64) -> int:
    """Smallest multiple of ``tp * multiple`` that is >= ``vocab_size``."""
    if vocab_size < 1 or tp < 1 or multiple < 1:
        raise ValueError(f"pad_vocab: vocab_size={vocab_size}, tp={tp}, multiple={multiple} "
                         f"must all be >= 1")
    step = tp * multiple
    return -(-vocab_size // step) * step
