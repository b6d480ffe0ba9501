"""Collect the results of a benchmark's spawned world: one ``(rank, "ok" | "error", value)``
tuple per rank on ``out``; the processes are joined (killed after 10 s) whatever happens."""
from __future__ import annotations

import queue
import time
from typing import Dict, List, Optional, Tuple


def collect(procs: List, out, timeout_s: float) -> Tuple[Dict[int, object],
                                                         Optional[Tuple[Optional[int], str]]]:
    """Start ``procs`` and gather one result per process. Returns (results by rank, failure):
    failure is None, ``(rank, its error text)``, or ``(None, "timeout")`` when no result came
    within ``timeout_s``."""
    for p in procs:
        p.start()
    results: Dict[int, object] = {}
    failure: Optional[Tuple[Optional[int], str]] = None
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < len(procs):
            try:
                rank, status, value = out.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                failure = (None, "timeout")
                break
            if status != "ok":
                failure = (rank, value)
                break
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return results, failure
