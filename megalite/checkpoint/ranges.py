"""Reading part of a stored tensor item: byte runs, CRC blocks, where the raw bytes start.

DCP's ``FileSystemWriter`` stores each tensor item as one ``torch.save`` zip; its tensor's bytes
are one uncompressed record (``<archive>/data/0``) in C order — every box megalite saves is
contiguous and DCP clones a view whose storage is larger, so the record is exactly the item's
``numel x element size`` bytes. At save, :func:`describe_item` finds where that record starts
and records a CRC-32 per block of it (:func:`block_bytes`: about 1/256 of the tensor, 256 B to
1 MiB, a power of two — so a block holds whole elements and a TP half of a row is usually whole
blocks). At load, :func:`box_runs` gives the byte runs of the sub-box a rank needs (one run for
a range of rows, one per row for a box split along a later dim; adjacent runs coalesced),
:func:`touched_blocks` the blocks holding them: only those are read, and each is checked
against its CRC before its bytes are used. The zip's headers and the pickle describing the
tensor are not read: dtype and shape come from DCP's ``.metadata`` (itself CRC-checked whole).
"""
from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from typing import List, Optional, Sequence, Tuple

MIN_BLOCK, MAX_BLOCK, BLOCKS_PER_ITEM = 256, 1 << 20, 256


def block_bytes(nbytes: int) -> int:
    """CRC block size of an item of ``nbytes`` raw bytes: a power of two near nbytes / 256,
    clamped to [256 B, 1 MiB]."""
    want = max(1, math.ceil(nbytes / BLOCKS_PER_ITEM))
    return min(MAX_BLOCK, max(MIN_BLOCK, 1 << (want - 1).bit_length()))


def data_offset(item: bytes, nbytes: int) -> Optional[int]:
    """Offset in a ``torch.save`` zip of its single tensor record's raw bytes, when the record
    is stored uncompressed and holds exactly ``nbytes``; None otherwise (read the item whole)."""
    try:
        with zipfile.ZipFile(io.BytesIO(item)) as z:
            records = [i for i in z.infolist() if i.filename.endswith("/data/0")]
            others = [i for i in z.infolist() if "/data/" in i.filename]
    except (zipfile.BadZipFile, ValueError, OSError):
        return None
    if len(records) != 1 or len(others) != 1:
        return None
    rec = records[0]
    if rec.compress_type != zipfile.ZIP_STORED or rec.file_size != nbytes:
        return None
    head = item[rec.header_offset:rec.header_offset + 30]
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = rec.header_offset + 30 + name_len + extra_len
    return start if start + nbytes <= len(item) else None


def block_crcs(data: memoryview, block: int) -> str:
    """The CRC-32 of every ``block`` bytes of ``data``, as 8 hex digits each."""
    return "".join(f"{zlib.crc32(data[i:i + block]):08x}" for i in range(0, len(data), block))


def describe_item(item: bytes, nbytes: int) -> Optional[list]:
    """``[raw bytes' offset in the item, block size, block CRCs]`` for the manifest, or None
    when the item's raw bytes cannot be located (it is then read and checked whole)."""
    start = data_offset(item, nbytes)
    if start is None:
        return None
    block = block_bytes(nbytes)
    return [start, block, block_crcs(memoryview(item)[start:start + nbytes], block)]


def box_runs(shape: Sequence[int], offsets: Sequence[int], lengths: Sequence[int]
             ) -> List[Tuple[int, int]]:
    """(first element, elements) of each contiguous run of the sub-box ``offsets``/``lengths``
    of a C-ordered tensor of ``shape``, in order, adjacent runs merged."""
    if any(n == 0 for n in lengths):
        return []
    dims = len(shape)
    if dims == 0:
        return [(0, 1)]
    strides = [1] * dims
    for d in range(dims - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    # the innermost dims the box spans whole form one run with the first partial dim
    k = dims - 1
    while k > 0 and lengths[k] == shape[k] and offsets[k] == 0:
        k -= 1
    run = lengths[k] * strides[k]
    base = sum(o * s for o, s in zip(offsets, strides))
    starts = [base]
    for d in range(k - 1, -1, -1):  # the outer dims, each repeating the runs inside it
        starts = [s + i * strides[d] for i in range(lengths[d]) for s in starts]
    starts.sort()
    out: List[Tuple[int, int]] = []
    for s in starts:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + run)
        else:
            out.append((s, run))
    return out


def touched_blocks(runs: Sequence[Tuple[int, int]], element: int, block: int) -> List[int]:
    """Sorted indices of the blocks holding any byte of ``runs`` (elements of ``element``
    bytes)."""
    found = set()
    for first, count in runs:
        lo, hi = first * element // block, ((first + count) * element - 1) // block
        found.update(range(lo, hi + 1))
    return sorted(found)


def spans(blocks: Sequence[int]) -> List[Tuple[int, int]]:
    """Consecutive block indices grouped as (first, count): one read each."""
    out: List[Tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def crc_list(text: str) -> List[int]:
    return [int(text[i:i + 8], 16) for i in range(0, len(text), 8)]


