"""Engine and optimizer state as N-d boxes of global tensors — what a layout-free checkpoint
(``torch.distributed.checkpoint``: non-overlapping, in-bounds chunks per tensor) needs.

A rank holds, of each parameter, a TP slice (rows or columns of the global tensor, padded
vocabulary rows beyond the global size excluded) and of that slice, with ZeRO, a flat element
range [a, b). For a 2-D slice ``[R, C]`` such a range is at most three boxes: the tail of a
first row, whole rows, the head of a last row. Each box's tensor is a *view* of the owned
shard, so loading copies straight into place.

``replica`` marks entries another rank holds identically and writes instead: dp ranks > 0
without ZeRO sharding, TP ranks > 0 of a TP-replicated tensor, and a last stage's tied copy of
the embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

Box = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (offsets, sizes) in the global tensor


@dataclass
class ShardEntry:
    global_shape: Tuple[int, ...]
    boxes: List[Box] = field(default_factory=list)
    tensors: List[torch.Tensor] = field(default_factory=list)  # one per box, shaped as sizes
    replica: bool = False


def _row_boxes(a: int, b: int, cols: int) -> List[Tuple[int, int, int, int]]:
    """Boxes (row, col, rows, cols) covering flat elements [a, b) of a [*, cols] matrix."""
    out = []
    r0, c0 = divmod(a, cols)
    r1, c1 = divmod(b, cols)
    if r0 == r1:
        return [(r0, c0, 1, c1 - c0)] if c1 > c0 else []
    if c0:
        out.append((r0, c0, 1, cols - c0))
        r0 += 1
    if r1 > r0:
        out.append((r0, 0, r1 - r0, cols))
    if c1:
        out.append((r1, 0, 1, c1))
    return out


def boxes_of(local_shape: Sequence[int], start: int, numel: int, data: torch.Tensor,
             origin: Sequence[int], global_shape: Sequence[int]) -> List[Tuple[Box, torch.Tensor]]:
    """Boxes of elements [start, start + numel) of a local tensor placed at ``origin`` in the
    global tensor; ``data`` holds those elements (flat). Rows past ``global_shape`` (vocabulary
    padding) are dropped."""
    if len(local_shape) == 1:  # one run along dim 0
        lo = origin[0] + start
        n = min(numel, global_shape[0] - lo)
        return [(((lo,), (n,)), data[:n])] if n > 0 else []
    if len(local_shape) != 2:
        raise NotImplementedError(f"state boxes for {len(local_shape)}-d parameters")
    cols = local_shape[1]
    out = []
    for r, c, nr, nc in _row_boxes(start, start + numel, cols):
        flat_at = r * cols + c - start
        row = origin[0] + r
        nr = min(nr, global_shape[0] - row)
        if nr <= 0:
            continue
        view = data[flat_at:flat_at + (nr - 1) * cols + nc].as_strided((nr, nc), (cols, 1))
        out.append((((row, origin[1] + c), (nr, nc)), view))
    return out


def entries(engine, segment_data: Sequence) -> Dict[str, ShardEntry]:
    """Entries for per-group data laid out like the owned shard: ``segment_data[i]`` is either
    group i's flat owned shard or a list with one flat tensor per segment."""
    table, dims = engine.table, engine.dims
    out: Dict[str, ShardEntry] = {}
    for g, data in zip(engine.groups, segment_data):
        for k, s in enumerate(g.segments):
            name, p = g.names[s.index], g.params[s.index]
            info = table.info(name)
            seg = data[k] if isinstance(data, (list, tuple)) else \
                data[s.start:s.start + s.numel]
            origin = [0] * p.dim()
            if info.tp_dim is not None:
                origin[info.tp_dim] = dims.tp_rank * p.shape[info.tp_dim]
            replica = (info.tied_copy or (info.tp_dim is None and dims.tp_rank > 0)
                       or (not engine.shards_over_dp and dims.dp_rank > 0))
            entry = out.setdefault(name, ShardEntry(info.global_shape, replica=replica))
            for box, view in boxes_of(p.shape, s.param_start, s.numel, seg, origin,
                                      info.global_shape):
                entry.boxes.append(box)
                entry.tensors.append(view)
    return out


@torch.no_grad()
def load_entries(target: Dict[str, ShardEntry], source: Dict[str, ShardEntry]) -> None:
    """Copy ``source``'s box tensors into ``target``'s views (same names and boxes: what a
    checkpoint reader fills for this rank's layout)."""
    for name, entry in target.items():
        if name not in source:
            raise KeyError(f"state has no entry for parameter {name!r}")
        given = dict(zip(source[name].boxes, source[name].tensors))
        for box, view in zip(entry.boxes, entry.tensors):
            if box not in given:
                raise KeyError(f"state for {name!r} lacks box offsets={box[0]} sizes={box[1]}")
            src = given[box].reshape(view.shape)
            if not _same_memory(src, view):  # a reader that filled these views in place
                view.copy_(src)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same elements (strides of size-1 dims do not matter: reshape may change them)."""
    strides = [(n, sa, sb) for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1]
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype
            and a.device == b.device and all(sa == sb for _, sa, sb in strides))
