"""A DCP ``FileSystemReader`` that never runs code and checks what it reads.

* ``.metadata`` is a pickle (DCP writes it with ``pickle.dump``); it is read through an
  unpickler that admits only DCP's metadata classes, ``torch.Size`` and dtypes — a pickled
  callable is refused, never called.
* A rank reads of a stored item only the CRC blocks holding the bytes its boxes need
  (``ranges.py``), checks each block against the CRC-32 the manifest records for it, and copies
  the raw bytes into its boxes — no unpickling at all. An item without block CRCs (one whose
  raw bytes ``describe_item`` could not locate, or any item of a checkpoint saved before block
  CRCs existed) is read whole, checked against its item CRC-32 and loaded with
  ``torch.load(weights_only=True)``. The bytes read are counted, so a test can see that a rank
  reads only what its layout needs.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import zlib
from typing import Dict, Optional, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from megalite.checkpoint.files import crc32_of
from megalite.checkpoint.ranges import box_runs, crc_list, describe_item, spans, touched_blocks

_DCP = "torch.distributed.checkpoint"
ALLOWED = {
    (f"{_DCP}.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch", "strided"),
     ("torch", "contiguous_format"), ("torch", "preserve_format"), ("collections", "OrderedDict"),
     ("enum", "Enum"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}
ALLOWED |= {("torch", str(d).replace("torch.", "")) for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int8, torch.uint8, torch.bool)}


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds something megalite will not load (code, a bad CRC)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise UnsafeCheckpoint(f"it asks to load {module}.{name}, which is not DCP metadata")
        return super().find_class(module, name)


def item_key(relative_path: str, offset: int) -> str:
    return f"{relative_path}@{offset}"


Shapes = Dict[Tuple[str, Tuple[int, ...]], Tuple[torch.Size, torch.dtype]]


def _chunk_shapes(metadata: Metadata) -> Shapes:
    """(fqn, offsets) -> (sizes, dtype) of every stored chunk."""
    out = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            for chunk in md.chunks:
                out[(fqn, tuple(chunk.offsets))] = (chunk.sizes, md.properties.dtype)
    return out


def item_records(directory: str, metadata: Metadata, prefix: str
                 ) -> Tuple[Dict[str, Dict[str, int]], Dict[str, int], Dict[str, list]]:
    """One sequential read of the files named ``prefix*`` (this rank's): each file's size and
    CRC-32, and of every stored item in them where its raw bytes start with a CRC-32 per block
    of them (``ranges.describe_item``) — or, for an item whose raw bytes cannot be located (it
    is read whole), its CRC-32. A block record checks every byte a load uses (the item's zip
    headers are never read), so an item CRC beside it would detect nothing more. The file's
    CRC runs over the same bytes as the items' (and the gaps between them), so nothing is
    read twice."""
    names = sorted(n for n in os.listdir(directory) if n.startswith(prefix))
    stored: Dict[str, list] = {name: [] for name in names}
    for index, info in metadata.storage_data.items():
        if info.relative_path in stored:
            stored[info.relative_path].append((info.offset, info.length, index, info))
    files: Dict[str, Dict[str, int]] = {}
    crcs: Dict[str, int] = {}
    blocks: Dict[str, list] = {}
    shapes = _chunk_shapes(metadata)
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            file_crc, pos = 0, 0
            for offset, length, index, info in sorted(stored[name], key=lambda s: s[0]):
                if offset >= pos:  # the bytes before the item count towards the file's CRC
                    file_crc, _ = crc32_of(f, file_crc, offset - pos)
                    data = f.read(length)
                    file_crc, pos = zlib.crc32(data, file_crc), offset + len(data)
                else:  # overlapping items (DCP writes none): this one read again
                    f.seek(offset)
                    data = f.read(length)
                    f.seek(pos)
                key = item_key(name, offset)
                shape = shapes.get((index.fqn, tuple(index.offset)))
                described = None
                if shape is not None and not getattr(info, "transform_descriptors", None):
                    described = describe_item(data, math.prod(shape[0]) * _element(shape[1]))
                if described is not None:
                    blocks[key] = described
                else:  # read whole at load: checked against its item CRC
                    crcs[key] = zlib.crc32(data)
            file_crc, tail = crc32_of(f, file_crc)
            files[name] = {"bytes": pos + tail, "crc32": file_crc}
    return files, crcs, blocks


def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafeReader(FileSystemReader):
    """``crcs``: item key -> CRC-32 from the manifest (None: unchecked, e.g. a test reading a
    bare DCP directory); ``blocks``: item key -> [raw bytes' offset, block size, block CRCs]
    (``ranges.describe_item``) for the items that can be read in part; ``metadata``: its
    ``.metadata`` as an earlier ``read_metadata`` returned it (not read again)."""

    def __init__(self, path: str, crcs: Optional[Dict[str, int]] = None,
                 blocks: Optional[Dict[str, list]] = None, metadata: Optional[Metadata] = None):
        super().__init__(path)
        self.directory, self.crcs, self.blocks = str(path), crcs, blocks or {}
        self._metadata = metadata
        self.bytes_read = 0
        self.shapes: Shapes = {}

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is not None:  # read once: DCP asks again after our own check
            self._metadata.storage_meta.load_id = self.load_id
            return self._metadata
        path = os.path.join(self.directory, ".metadata")
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except UnsafeCheckpoint as e:
                raise UnsafeCheckpoint(f"{path}: {e}") from None
            except Exception as e:  # noqa: BLE001 - a cut or garbled pickle
                raise UnsafeCheckpoint(f"{path} cannot be read ({type(e).__name__}: {e})") \
                    from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        self._metadata = metadata
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args,
                              **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.shapes = _chunk_shapes(metadata)

    def read_data(self, plan, planner) -> Future:
        """DCP asks one request per (wanted box, stored item) overlap. Grouped by stored item,
        each item's requests are served by one pass over the blocks they touch (the whole item
        when it has no block record: a checkpoint saved before them)."""
        by_item: Dict[Tuple[str, int], list] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            by_item.setdefault((info.relative_path, info.offset), []).append(req)
        handles: Dict[str, io.BufferedReader] = {}
        try:
            for (relative_path, offset), reqs in sorted(by_item.items(), key=lambda kv: kv[0]):
                f = handles.get(relative_path)
                if f is None:
                    f = handles[relative_path] = open(
                        os.path.join(self.directory, relative_path), "rb")
                if any(r.type == LoadItemType.BYTE_IO for r in reqs):
                    planner.load_bytes(reqs[0], None)  # refuses: megalite never stores bytes
                described = self.blocks.get(item_key(relative_path, offset))
                info = self.storage_data[reqs[0].storage_index]
                if described is None or getattr(info, "transform_descriptors", None):
                    self._read_whole(f, info, reqs, planner)
                else:
                    self._read_blocks(f, info, described, reqs, planner)
        finally:
            for f in handles.values():
                f.close()
        done: Future = Future()
        done.set_result(None)
        return done

    def _where(self, info) -> str:
        return os.path.join(self.directory, info.relative_path)

    def _read_blocks(self, f, info, described: list, reqs: list, planner) -> None:
        index = reqs[0].storage_index
        shape, dtype = self.shapes[(index.fqn, tuple(index.offset))]
        element = _element(dtype)
        nbytes = math.prod(shape) * element
        try:
            start, block, crc_text = described
            start, block, crcs = int(start), int(block), crc_list(crc_text)
        except (TypeError, ValueError):
            start, block, crcs = -1, 0, []
        if (start < 0 or block <= 0 or block % element or len(crcs) != -(-nbytes // block)
                or start + nbytes > info.length):
            raise UnsafeCheckpoint(f"meta.json's block record of the item at byte {info.offset} "
                                   f"of {self._where(info)} does not fit the item")
        runs = [box_runs(shape, r.storage_offsets, r.lengths) for r in reqs]
        needed = touched_blocks([run for rs in runs for run in rs], element, block)
        if not needed:  # empty boxes
            for req in reqs:
                self._commit(req, torch.empty(tuple(req.lengths), dtype=dtype), planner)
            return
        base, end = needed[0] * block, min((needed[-1] + 1) * block, nbytes)
        # raw bytes [base, end) land in the box itself when they are exactly its bytes (a
        # whole-block run into a contiguous box: no copy), else in a buffer the boxes copy from
        direct = None
        if len(reqs) == 1 and len(runs[0]) == 1 and runs[0][0][0] * element == base \
                and sum(runs[0][0]) * element == end:
            target = planner.resolve_tensor(reqs[0]).detach()
            if target.is_contiguous() and target.dtype == dtype and target.device.type == "cpu":
                direct = target
        buf = (direct.reshape(-1).view(torch.uint8) if direct is not None
               else torch.empty(end - base, dtype=torch.uint8))
        view = memoryview(buf.numpy())
        for first, count in spans(needed):
            a, b = first * block, min((first + count) * block, nbytes)
            f.seek(info.offset + start + a)
            got = f.readinto(view[a - base:b - base])
            self.bytes_read += got
            if got != b - a:
                raise UnsafeCheckpoint(f"{self._where(info)} is cut: its item at byte "
                                       f"{info.offset} needs {start + b} bytes, fewer are there")
            for i in range(first, first + count):
                lo, hi = i * block - base, min((i + 1) * block, nbytes) - base
                if zlib.crc32(view[lo:hi]) != crcs[i]:
                    raise UnsafeCheckpoint(
                        f"{self._where(info)} fails the CRC-32 check of block {i} of its item at "
                        f"byte {info.offset}: the file is corrupted")
        if direct is not None:
            planner.commit_tensor(reqs[0], direct)
            return
        values = buf.view(dtype)
        strides = torch.empty(tuple(shape), device="meta").stride()
        for req in reqs:
            first = sum(o * s for o, s in zip(req.storage_offsets, strides))
            src = values.as_strided(tuple(req.lengths), strides, first - base // element)
            self._commit(req, src, planner)

    def _read_whole(self, f, info, reqs: list, planner) -> None:
        f.seek(info.offset)
        data = f.read(info.length)
        self.bytes_read += len(data)
        if len(data) != info.length:
            raise UnsafeCheckpoint(f"{self._where(info)} is cut: item at byte {info.offset} "
                                   f"needs {info.length} bytes, {len(data)} are there")
        if self.crcs is not None:
            expected = self.crcs.get(item_key(info.relative_path, info.offset))
            if expected is None or zlib.crc32(data) != expected:
                raise UnsafeCheckpoint(f"{self._where(info)} fails the CRC-32 check of its item "
                                       f"at byte {info.offset}: the file is corrupted")
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        for req in reqs:
            part = tensor
            for dim, (offset, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                part = part.narrow(dim, offset, length)
            self._commit(req, part, planner)

    @staticmethod
    def _commit(req, src: torch.Tensor, planner) -> None:
        target = planner.resolve_tensor(req).detach()
        if target.size() != src.size():
            raise AssertionError(f"{req.storage_index}: {list(src.size())} read for a "
                                 f"{list(target.size())} box")
        target.copy_(src)
        planner.commit_tensor(req, target)
