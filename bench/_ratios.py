"""The benchmarks' rule for a time ratio on a noisy machine.

A ratio is the median over >= 5 interleaved blocks (each side runs >= 20 iterations per block,
alternating, so noise hits both alike) of the per-block ratios. A run is scored only when every
per-block ratio lies within +-10% of that median; a run with a wider spread is repeated (up to
``attempts`` times) and reported as not scored. The caller runs it twice and reports both.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List

SPREAD_LIMIT = 0.10


@dataclass
class RatioRun:
    ratios: List[float]  # per block: ours / reference
    ours_s: List[float]  # per block: seconds per iteration
    ref_s: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        """Largest relative distance of a block's ratio from the median."""
        m = self.median
        return max(abs(r / m - 1.0) for r in self.ratios)

    @property
    def scored(self) -> bool:
        return self.spread <= SPREAD_LIMIT

    def line(self) -> str:
        return (f"ratio {self.median:.3f} (blocks {min(self.ratios):.3f}-{max(self.ratios):.3f}, "
                f"spread +-{100 * self.spread:.1f}%{'' if self.scored else ', NOT SCORED'}); "
                f"ours {1e3 * statistics.median(self.ours_s):.2f} ms, reference "
                f"{1e3 * statistics.median(self.ref_s):.2f} ms per iteration")


def _per_iter(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def interleaved_ratio(ours: Callable[[], object], ref: Callable[[], object], blocks: int = 5,
                      iters: int = 20, attempts: int = 3) -> RatioRun:
    """Time ``ours`` against ``ref`` in alternating blocks; repeat a run whose spread is over
    the limit (the last attempt is returned either way, marked by ``scored``)."""
    blocks, iters = max(blocks, 5), max(iters, 20)
    run = RatioRun([], [], [])
    for _ in range(attempts):
        run = RatioRun([], [], [])
        for b in range(blocks):  # alternate which side goes first
            first, second = (ours, ref) if b % 2 == 0 else (ref, ours)
            t1, t2 = _per_iter(first, iters), _per_iter(second, iters)
            o, r = (t1, t2) if b % 2 == 0 else (t2, t1)
            run.ours_s.append(o)
            run.ref_s.append(r)
            run.ratios.append(o / r)
        if run.scored:
            break
    return run
