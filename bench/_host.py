"""Helpers the benchmarks share: a plain-text table for their figures, and pinning glibc's heap
so a measured step or save does not pay for trimming and faulting memory back in."""
from __future__ import annotations

import ctypes
from typing import List

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def pin_malloc(mmap_threshold: int) -> bool:
    """Stop glibc from trimming the heap (freed memory stays mapped) and fix its mmap
    threshold at ``mmap_threshold`` bytes (glibc otherwise moves it as blocks are freed): the
    RSS and the page faults of a step then do not depend on which allocation happens to sit at
    the heap top. False where there is no glibc or it refused."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
                and libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold))


def table(rows: List[List[str]], header: List[str]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(row: List[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
