"""Save and load ``{key: ShardEntry}`` state with ``torch.distributed.checkpoint``.

Collective over ``group`` (every rank of the job) when a process group exists, one process
otherwise. Saving returns this rank's files with their sizes and CRCs and its items' block
CRCs (an item CRC for an item read whole), for the manifest; loading checks them.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata

from megalite.checkpoint.files import file_record
from megalite.checkpoint.planners import BoxLoadPlanner, BoxSavePlanner, Entries
from megalite.checkpoint.storage import SafeReader, item_records

_HAS_NO_DIST = "no_dist" in inspect.signature(dcp.save).parameters  # torch >= 2.5


@contextlib.contextmanager
def _quiet():
    """DCP warns on every single-process call that it assumes one process: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dist_kwargs(group) -> Dict[str, Any]:
    if dist.is_available() and dist.is_initialized():
        return {"process_group": group}
    return {"no_dist": True} if _HAS_NO_DIST else {}


def save_entries(directory: str, entries: Entries, group=None, rank: int = 0
                 ) -> Tuple[Dict[str, Dict[str, int]], Dict[str, int], Dict[str, list]]:
    """Write this rank's boxes into ``directory`` (fsynced). Returns ({file: size and CRC} of
    the files this rank wrote, {item: CRC} of its items read whole, {item: its block CRCs}),
    all from one read of its files (``storage.item_records``); rank 0 also owns
    ``.metadata``."""
    writer = FileSystemWriter(directory, single_file_per_rank=True, sync_files=True,
                              thread_count=1)
    with _quiet():
        metadata = dcp.save(entries, storage_writer=writer, planner=BoxSavePlanner(),
                            **_dist_kwargs(group))
    files, items, blocks = item_records(directory, metadata, f"__{rank}_")
    if rank == 0:
        files[".metadata"] = file_record(os.path.join(directory, ".metadata"))
    return files, items, blocks


def load_entries(directory: str, entries: Entries, crcs: Optional[Dict[str, int]],
                 group=None, blocks: Optional[Dict[str, list]] = None,
                 metadata: Optional[Metadata] = None) -> int:
    """Fill ``entries``' views from the checkpoint in ``directory`` (any saved layout); the
    number of bytes this rank read. ``metadata``: its ``.metadata`` already read (else read
    here)."""
    reader = SafeReader(directory, crcs, blocks, metadata)
    # checked here, before DCP's collectives (which would wrap the error in their traceback):
    # the metadata unpickles safely and holds every wanted tensor at its global shape
    planner = BoxLoadPlanner()
    planner.set_up_planner(entries, reader.read_metadata())
    planner.create_local_plan()
    with _quiet():
        dcp.load(entries, storage_reader=reader, planner=BoxLoadPlanner(),
                 **_dist_kwargs(group))
    return reader.bytes_read
