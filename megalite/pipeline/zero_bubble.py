"""Zero-bubble backward split (Qi et al. 2023) at the level of each linear layer.

A B pass runs the whole backward of a micro-batch except the weight-gradient matmuls of the
linear layers (dW = dYᵀX, about half of a layer's backward FLOPs): those are stored as closures
holding (X, dY) and run later by the W pass, where the schedule has a bubble to fill. Everything
else — the activation-gradient chain, norm/bias/embedding gradients — happens in B, so W
recomputes nothing.

Linear modules are switched to this behaviour by class (same parameters and names):
``nn.Linear``, the plan's ``ColumnInRegion`` and ``RowParallelLinear``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.tensor_parallel.collectives import reduce_from_tp, reduce_scatter_seq
from megalite.tensor_parallel.layers import RowParallelLinear
from megalite.tensor_parallel.plan import ColumnInRegion

Key = Tuple[int, int]  # (chunk, micro-batch)


class WeightGradStore:
    """The deferred dW closures of each (chunk, micro-batch) whose B pass has run."""

    def __init__(self):
        self.key: Optional[Key] = None  # set by the executor around a B pass
        self.on_accumulate = None
        self._pending: Dict[Key, List[Callable[[], None]]] = defaultdict(list)

    def defer(self, fn: Callable[[], None]) -> bool:
        """Keep ``fn`` for the W pass of the current key; False when nothing is deferring."""
        if self.key is None:
            return False
        self._pending[self.key].append(fn)
        return True

    def run(self, key: Key) -> None:
        """The W pass of ``key``: every stored weight-gradient matmul."""
        for fn in self._pending.pop(key, []):
            fn()


def _accumulate(weight: nn.Parameter, grad: torch.Tensor) -> None:
    target = getattr(weight, "main_grad", None)
    if target is not None:
        target.add_(grad)
    elif weight.grad is None:
        weight.grad = grad.to(weight.dtype)
    else:
        weight.grad.add_(grad)


class _DeferrableLinear(torch.autograd.Function):
    """y = x Wᵀ (+ b). Backward returns dX (and db) at once; dW now or, in a B pass, later."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.has_bias = store, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy.matmul(weight)
        db = dy.flatten(0, -2).sum(0) if ctx.has_bias else None

        def weight_grad() -> torch.Tensor:
            return dy.flatten(0, -2).t().matmul(x.flatten(0, -2))

        def deferred() -> None:  # runs in the W pass, outside autograd
            with torch.no_grad():
                _accumulate(weight, weight_grad())
                if ctx.store.on_accumulate is not None:
                    ctx.store.on_accumulate(weight)

        if ctx.store.defer(deferred):
            return dx, None, db, None
        return dx, weight_grad(), db, None


class _Linear(nn.Linear):
    def forward(self, x):
        return _DeferrableLinear.apply(x, self.weight, self.bias, self.wgrad_store)


class _Column(ColumnInRegion):
    def forward(self, x):
        return _DeferrableLinear.apply(x, self.weight, self.bias, self.wgrad_store)


class _Row(RowParallelLinear):
    def forward(self, x):
        y = _DeferrableLinear.apply(x, self.weight, None, self.wgrad_store)
        if self.sequence_parallel:
            y = reduce_scatter_seq(y, self.group, self.meter)
        else:
            y = reduce_from_tp(y, self.group, self.meter)
        return y if self.bias is None else y + self.bias


_SWAP = [(ColumnInRegion, _Column), (RowParallelLinear, _Row), (nn.Linear, _Linear)]


def defer_weight_grads(module: nn.Module, store: WeightGradStore) -> None:
    """Make every linear layer of ``module`` defer its dW into ``store`` during B passes
    (a module with its own ``use_wgrad_store(store)`` is told the store instead)."""
    if hasattr(module, "use_wgrad_store"):
        module.use_wgrad_store(store)
        return
    for m in module.modules():
        for base, deferring in _SWAP:
            if type(m) is base:
                m.__class__ = deferring
                m.wgrad_store = store
                break
