"""Helpers for ``bench/pipeline.py``: a fake pipeline stage whose chunks cost fixed timed waits,
a timing wrapper around the real ``PipelineExecutor``, and a discrete-event simulator of the
schedules' action lists.

Fake stage, per chunk c:   y = XBranch(x) + WBranch(w)
  XBranch: forward sleeps F, backward sleeps B (the input-gradient share);
  WBranch: forward free, backward sleeps W (the weight-gradient share; on the very first virtual
  stage it sleeps B+W, because there the input needs no gradient but a real stage still has to
  back-propagate through its layers to reach their weights).
A full backward (gpipe, 1f1b, interleaved) therefore costs B+W; under zb-h1 the B action runs
the x branch (and the first stage's chain share) and defers the w branch's sleep to the W action
through the executor's weight-gradient store, as a linear layer defers its dW matmul. Every sleep is time-stamped and tagged with the action that
was running, so the split can be verified from the timestamps.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple  # noqa: F401

import torch
import torch.nn as nn

from megalite.pipeline.executor import PipelineExecutor

now = time.perf_counter  # CLOCK_MONOTONIC on Linux: comparable across processes


class Recorder:
    """Sleeps and time-stamps them, tagged with the index of the executor's current action."""

    def __init__(self):
        self.current = -1
        self.sleeps: List[Tuple[str, int, float, float]] = []

    def sleep(self, tag: str, seconds: float) -> None:
        t0 = now()
        if seconds > 0:
            time.sleep(seconds)
        self.sleeps.append((tag, self.current, t0, now()))


class _XBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rec: Recorder, f: float, b: float):
        ctx.rec, ctx.b = rec, b
        rec.sleep("F", f)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.rec.sleep("Bx", ctx.b)
        return g, None, None, None


class _WBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, shape: Tuple[int, ...], rec: Recorder, chain: float, cost: float,
                store):
        # ``shape``, not the input tensor: this node is off the path to the input
        ctx.rec, ctx.chain, ctx.cost, ctx.store = rec, chain, cost, store
        return w.new_zeros(shape)

    @staticmethod
    def backward(ctx, g):
        rec, cost = ctx.rec, ctx.cost
        if ctx.chain:  # first stage: the activation-gradient chain still runs in B
            rec.sleep("Bx", ctx.chain)
        # like a linear layer's dW matmul: deferred to the W pass under zero-bubble schedules
        if ctx.store is None or not ctx.store.defer(lambda: rec.sleep("Wp", cost)):
            rec.sleep("Wp", cost)
        return torch.zeros(1, dtype=g.dtype), None, None, None, None, None


class SleepStage(nn.Module):
    """Duck-typed ``PipelineStage``: v chunks, each with one tiny parameter; costs in seconds
    for one micro-batch through the FULL stage (each chunk costs 1/v of it)."""

    def __init__(self, pp: int, pp_rank: int, v: int, f: float, b: float, w: float,
                 rec: Recorder):
        super().__init__()
        self.pp, self.rank, self.rec = pp, pp_rank, rec
        self.chunks = [range(c, c + 1) for c in range(v)]
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(v)])
        self.f, self.b, self.w = f / v, b / v, w / v

    def vstage(self, chunk: int) -> int:
        return chunk * self.pp + self.rank

    def is_first(self, chunk: int) -> bool:
        return self.vstage(chunk) == 0

    def is_last(self, chunk: int) -> bool:
        return self.vstage(chunk) == self.pp * len(self.chunks) - 1

    def use_wgrad_store(self, store) -> None:
        """Called by the executor for split schedules (megalite.pipeline.zero_bubble)."""
        self.store = store

    def forward_chunk(self, chunk: int, x: torch.Tensor) -> torch.Tensor:
        chain = self.b if self.is_first(chunk) else 0.0
        return (_XBranch.apply(x, self.rec, self.f, self.b)
                + _WBranch.apply(self.weights[chunk], tuple(x.shape), self.rec, chain, self.w,
                                 getattr(self, "store", None)))


class TimedExecutor(PipelineExecutor):
    """The real executor, unchanged, with each action's compute interval recorded: from the end
    of its receive wait (or the action's start when it receives nothing) to its end. Sends are
    only queued inside an action, so the interval is compute plus queueing. ``eager_sends``
    (what-if, not the shipped behaviour) posts every send as soon as it is queued."""

    def __init__(self, *a, eager_sends: bool = False, on_action=None, **k):
        super().__init__(*a, **k)
        self.eager_sends, self.on_action, self.index = eager_sends, on_action, 0
        self.intervals: List[Tuple[str, int, int, float, float]] = []
        self._recv_end: Optional[float] = None

    def _instrument(self) -> None:
        p2p = self.p2p
        if getattr(p2p, "_bench_timed", False):
            return
        recv, send = p2p.recv, p2p.send

        def timed_recv(*a, **k):
            out = recv(*a, **k)
            self._recv_end = now()
            return out

        def eager_send(*a, **k):
            send(*a, **k)
            p2p._post([])

        p2p.recv = timed_recv
        if self.eager_sends:
            p2p.send = eager_send
        p2p._bench_timed = True

    def _timed(self, fn, a, *args):
        self._instrument()
        self._recv_end = None
        if self.on_action is not None:
            self.on_action(self.index)
        self.index += 1
        t0 = now()
        out = fn(a, *args)
        t1 = now()
        self.intervals.append((a.kind, a.chunk, a.micro, self._recv_end or t0, t1))
        return out

    def _forward(self, a, slot, batch):
        return self._timed(super()._forward, a, slot, batch)

    def _backward_input(self, a, slot, split):
        return self._timed(super()._backward_input, a, slot, split)

    def _backward_weight(self, a):
        return self._timed(super()._backward_weight, a)


def simulate(actions_of: Dict[int, list], p: int, v: int, cost, eager: bool,
             lat: float = 0.0) -> Tuple[List[float], float]:
    """Zero-latency discrete-event run of every rank's action list. ``cost(kind, vstage)`` in
    seconds. ``eager``: a send is visible when its compute ends; else (the executor's rule) only
    when the sender next posts (its next receive, or the end-of-step flush); ``lat`` is added to
    every transfer. Returns each rank's
    idle fraction and the step time; raises on a deadlock."""
    last_vs = p * v - 1
    t = [0.0] * p
    busy = [0.0] * p
    pc = [0] * p
    pending: List[list] = [[] for _ in range(p)]  # queued sends per rank
    avail: Dict[Tuple[int, int, int], float] = {}  # (vstage, micro, kind) -> visible at

    def post(r: int, at: float) -> None:
        for key in pending[r]:
            avail[key] = at + lat
        pending[r] = []

    done = [False] * p
    while not all(done):
        progress = False
        for r in range(p):
            while pc[r] < len(actions_of[r]):
                a = actions_of[r][pc[r]]
                s = a.chunk * p + r
                need = None
                if a.kind == "F" and s > 0:
                    need = (s - 1, a.micro, 0)
                elif a.kind == "B" and s < last_vs:
                    need = (s + 1, a.micro, 1)
                if need is not None:
                    post(r, t[r])
                    if need not in avail:
                        break
                    t[r] = max(t[r], avail[need])
                c = cost(a.kind, s)
                t[r] += c
                busy[r] += c
                out = None
                if a.kind == "F" and s < last_vs:
                    out = (s, a.micro, 0)
                elif a.kind == "B" and s > 0:
                    out = (s, a.micro, 1)
                if out is not None:
                    if eager:
                        avail[out] = t[r] + lat
                    else:
                        pending[r].append(out)
                pc[r] += 1
                progress = True
            if pc[r] == len(actions_of[r]) and not done[r]:
                post(r, t[r])
                done[r] = True
                progress = True
        if not progress:
            raise RuntimeError(f"simulated deadlock at actions {pc}")
    step = max(t)
    return [1 - busy[r] / step for r in range(p)], step
