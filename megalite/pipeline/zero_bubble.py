"""Zero-bubble backward split (Qi et al. 2023) at the level of each linear layer.

A B pass runs the whole backward of a micro-batch except the weight-gradient matmuls of the
linear layers (dW = dYᵀX, about half of a layer's backward FLOPs): those are stored as closures
holding (X, dY) and run later by the W pass, where the schedule has a bubble to fill. Everything
else — the activation-gradient chain, norm/bias/embedding gradients — happens in B, so W
recomputes nothing.

The layers defer by themselves: every linear layer of ``megalite.tensor_parallel.layers`` has a
``wgrad_store`` attribute (None: no deferral), and so does :class:`DeferrableLinear`, the twin
of ``nn.Linear`` that ``defer_weight_grads`` puts in place of plain linears (pipeline without
tensor parallelism). In a backward, a layer whose store's ``defer(fn)`` returns True leaves
dW to ``fn``, which adds it with :meth:`WeightGradStore.accumulate`.

With tensor parallelism the column-parallel backward normally hides its dX all-reduce behind the
dW matmuls; in a B pass dW is deferred, so it waits on that all-reduce with only the bias sums
to overlap, and the dW matmuls fill the bubble in W instead.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from megalite.tensor_parallel.layers import deferrable_linear

Key = Tuple[int, int]  # (chunk, micro-batch)


class WeightGradStore:
    """The deferred dW closures of each (chunk, micro-batch) whose B pass has run."""

    def __init__(self):
        self.key: Optional[Key] = None  # set by the executor around a B pass
        # Called with each weight once a deferred dW was added to its gradient: the ZeRO
        # engine's gradient-ready bookkeeping, so a weight whose last contribution is deferred
        # is reduced right after the W pass.
        self.on_accumulate: Optional[Callable[[nn.Parameter], None]] = None
        self._pending: Dict[Key, List[Callable[[], None]]] = defaultdict(list)

    def defer(self, fn: Callable[[], None]) -> bool:
        """Keep ``fn`` for the W pass of the current key; False when nothing is deferring."""
        if self.key is None:
            return False
        self._pending[self.key].append(fn)
        return True

    def run(self, key: Key) -> None:
        """The W pass of ``key``: every stored weight-gradient matmul (outside autograd)."""
        with torch.no_grad():
            for fn in self._pending.pop(key, []):
                fn()

    def accumulate(self, weight: nn.Parameter, grad: torch.Tensor) -> None:
        """Add a deferred ``grad`` into ``weight.main_grad`` when it has one, else into
        ``weight.grad``; then tell ``on_accumulate``."""
        target = getattr(weight, "main_grad", None)
        if target is not None:
            target.add_(grad)
        elif weight.grad is None:
            weight.grad = grad.to(weight.dtype)
        else:
            weight.grad.add_(grad)
        if self.on_accumulate is not None:
            self.on_accumulate(weight)


class DeferrableLinear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose dW can be deferred into
    ``wgrad_store``."""

    wgrad_store: Optional[WeightGradStore] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return deferrable_linear(x, self, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DeferrableLinear":
        """A twin holding the very same parameter objects (nothing is copied)."""
        twin = cls(linear.in_features, linear.out_features, linear.bias is not None,
                   device="meta")
        twin.weight, twin.bias = linear.weight, linear.bias
        return twin


def defer_weight_grads(module: nn.Module, store: WeightGradStore) -> None:
    """Make every linear layer of ``module`` defer its dW into ``store`` during B passes: plain
    ``nn.Linear`` children are replaced by their :class:`DeferrableLinear` twins, then every
    layer with a ``wgrad_store`` is given ``store`` (a module with its own
    ``use_wgrad_store(store)`` is told the store instead)."""
    if hasattr(module, "use_wgrad_store"):
        module.use_wgrad_store(store)
        return
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, DeferrableLinear.from_linear(child))
    for m in module.modules():
        if hasattr(m, "wgrad_store"):
            m.wgrad_store = store
