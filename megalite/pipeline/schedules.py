"""Pipeline schedules as plain functions: each returns, for one pipeline rank, the ordered list
of actions it performs in one step. ``executor.py`` runs them; communication follows from the
actions (a forward receives from the previous virtual stage and sends to the next, a backward
the other way), so a schedule is only an order.

    F(c, i)  forward of micro-batch i through this rank's chunk c
    B(c, i)  backward; with ``split`` schedules only the input gradient (zero bubble)
    W(c, i)  the weight gradients of a split backward

Notation: p = pipeline ranks, m = micro-batches per step, v = chunks per rank, r = this rank.
"""
from __future__ import annotations

from collections import deque
from typing import List, NamedTuple


class Action(NamedTuple):
    kind: str  # "F" | "B" | "W"
    chunk: int
    micro: int


def gpipe(p: int, m: int, r: int) -> List[Action]:
    """GPipe (Huang et al. 2019): all forwards, then all backwards. Holds m micro-batches'
    activations; bubble (p-1)/(m+p-1)."""
    return [Action("F", 0, i) for i in range(m)] + [Action("B", 0, i) for i in range(m)]


def one_f_one_b(p: int, m: int, r: int) -> List[Action]:
    """1F1B / PipeDream-Flush (Narayanan et al. 2021): same bubble as GPipe, but at most p - r
    micro-batches in flight on rank r."""
    warmup = min(p - r - 1, m)
    actions = [Action("F", 0, i) for i in range(warmup)]           # warm-up: fill the pipe
    for i in range(m - warmup):                                       # steady: one F, one B
        actions += [Action("F", 0, warmup + i), Action("B", 0, i)]
    actions += [Action("B", 0, i) for i in range(m - warmup, m)]     # cool-down: drain
    return actions


def zero_bubble_h1(p: int, m: int, r: int) -> List[Action]:
    """ZB-H1 (Qi et al. 2023): 1F1B whose backward is split into B (input gradient: on the
    critical path between stages) and W (weight gradient: local). Rank r defers p-r-1 W passes
    out of the steady phase and runs two per B in the cool-down, where 1F1B waits for the next
    gradient, so gradients travel back through the pipe at the speed of B alone and the queue
    is empty by the end (the memory of 1F1B plus the deferred W's inputs)."""
    warmup = min(p - r - 1, m)
    actions = [Action("F", 0, i) for i in range(warmup)]           # warm-up
    pending: deque = deque()
    for i in range(m - warmup):                                       # steady: F, B, (W)
        actions += [Action("F", 0, warmup + i), Action("B", 0, i)]
        pending.append(i)
        if len(pending) > warmup:
            actions.append(Action("W", 0, pending.popleft()))
    for i in range(m - warmup, m):                                    # cool-down: B, then W's
        actions.append(Action("B", 0, i))                             # fill the wait for the
        pending.append(i)                                             # next gradient
        for _ in range(min(2, len(pending))):
            actions.append(Action("W", 0, pending.popleft()))
    actions += [Action("W", 0, i) for i in pending]                   # whatever is left
    return actions


def interleaved(p: int, m: int, r: int, v: int) -> List[Action]:
    """Interleaved 1F1B (Narayanan et al. 2021): v chunks per rank, bubble (p-1)/(v*m+p-1).
    Micro-batches go through the chunks in groups of p; m must be a multiple of p."""
    if m % p:
        raise ValueError(f"interleaved schedule: micro-batches per step m={m} must be a multiple "
                         f"of the pipeline size p={p} (set train.grad_accum accordingly)")
    total = v * m

    def forward(k: int) -> Action:  # k-th forward of this rank: chunk and micro-batch
        return Action("F", (k // p) % v, (k // (p * v)) * p + k % p)

    def backward(k: int) -> Action:
        return Action("B", v - 1 - (k // p) % v, (k // (p * v)) * p + k % p)

    warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
    if m == p:  # too few micro-batches for a steady phase whose orders stay acyclic
        warmup = total
    actions = [forward(k) for k in range(warmup)]                    # warm-up
    for k in range(total - warmup):                                   # steady
        actions += [forward(warmup + k), backward(k)]
    actions += [backward(k) for k in range(total - warmup, total)]   # cool-down
    return actions


def forward_only(p: int, m: int, r: int, v: int = 1) -> List[Action]:
    """Evaluation: every micro-batch through every chunk, no backward."""
    return [Action("F", c, i) for i in range(m) for c in range(v)]


def build(name: str, p: int, m: int, r: int, v: int = 1) -> List[Action]:
    """This rank's actions for one step. One stage (p = 1) is plain gradient accumulation,
    F0 B0 F1 B1 ... (1F1B with p = 1), whatever the configured pipeline schedule."""
    if p == 1:
        return one_f_one_b(1, m, 0)
    if name == "gpipe":
        return gpipe(p, m, r)
    if name == "1f1b":
        return one_f_one_b(p, m, r)
    if name == "zb-h1":
        return zero_bubble_h1(p, m, r)
    if name == "interleaved":
        return interleaved(p, m, r, v)
    raise ValueError(f"parallel.schedule={name!r}: use gpipe, 1f1b, interleaved or zb-h1")


def max_in_flight(actions: List[Action]) -> int:
    """Most micro-batch chunks forwarded but not yet backwarded at any point (activation
    memory in units of one micro-batch's chunk)."""
    live = peak = 0
    for a in actions:
        live += {"F": 1, "B": -1}.get(a.kind, 0)
        peak = max(peak, live)
    return peak
