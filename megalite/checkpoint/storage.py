"""A DCP ``FileSystemReader`` that never runs code and checks what it reads.

* ``.metadata`` is a pickle (DCP writes it with ``pickle.dump``); it is read through an
  unpickler that admits only DCP's metadata classes, ``torch.Size`` and dtypes — a pickled
  callable is refused, never called.
* Every stored item's bytes are checked against the CRC-32 the manifest records for it before
  they are deserialized (DCP itself reads tensors with ``weights_only=True``); the bytes read are
  counted, so a test can see that a rank reads only what its layout needs.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zlib
from typing import Dict, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

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


def item_crcs(directory: str, metadata: Metadata, prefix: str) -> Dict[str, int]:
    """CRC-32 of every stored item in the files named ``prefix*`` (this rank's)."""
    out: Dict[str, int] = {}
    handles: Dict[str, io.BufferedReader] = {}
    try:
        for info in metadata.storage_data.values():
            if not info.relative_path.startswith(prefix):
                continue
            f = handles.get(info.relative_path)
            if f is None:
                f = handles[info.relative_path] = open(
                    os.path.join(directory, info.relative_path), "rb")
            f.seek(info.offset)
            out[item_key(info.relative_path, info.offset)] = zlib.crc32(f.read(info.length))
    finally:
        for f in handles.values():
            f.close()
    return out


class SafeReader(FileSystemReader):
    """``crcs``: item key -> CRC-32 from the manifest (None: unchecked, e.g. a test reading a
    bare DCP directory)."""

    def __init__(self, path: str, crcs: Optional[Dict[str, int]] = None):
        super().__init__(path)
        self.directory, self.crcs, self.bytes_read = str(path), crcs, 0
        self._last = None  # (file, offset), bytes of the item read last

    def read_metadata(self, *args, **kwargs) -> Metadata:
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
        return metadata

    def read_data(self, plan, planner):
        """DCP reads one request per (wanted box, stored item) overlap; sorted by item, each
        stored item is read (and checked) once however many wanted boxes it feeds."""
        def where(req):
            info = self.storage_data[req.storage_index]
            return info.relative_path, info.offset

        self._last = None
        try:
            return super().read_data(dataclasses.replace(plan, items=sorted(plan.items,
                                                                            key=where)), planner)
        finally:
            self._last = None

    def _slice_file(self, file, sinfo) -> io.IOBase:
        key = (sinfo.relative_path, sinfo.offset)
        if self._last is not None and self._last[0] == key:
            return io.BytesIO(self._last[1])
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        self.bytes_read += len(data)
        where = os.path.join(self.directory, sinfo.relative_path)
        if len(data) != sinfo.length:
            raise UnsafeCheckpoint(f"{where} is cut: item at byte {sinfo.offset} needs "
                                   f"{sinfo.length} bytes, {len(data)} are there")
        if self.crcs is not None:
            expected = self.crcs.get(item_key(sinfo.relative_path, sinfo.offset))
            if expected is None or zlib.crc32(data) != expected:
                raise UnsafeCheckpoint(f"{where} fails the CRC-32 check of its item at byte "
                                       f"{sinfo.offset}: the file is corrupted")
        self._last = (key, data)
        return io.BytesIO(data)
