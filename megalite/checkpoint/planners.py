"""DCP planners for N-d boxes (``zero.state.ShardEntry``) instead of DTensors.

A rank's state is ``{key: ShardEntry}``: the global shape and, per owned box, (offsets, sizes)
and a view of the rank's memory holding it. Saving, each box of a non-replica entry becomes one
DCP SHARD write item (a chunk of the global tensor): DCP's global plan checks that the chunks of
all ranks tile every tensor. Loading, DCP's resharding (``create_read_items_for_chunk_list``)
intersects the wanted boxes with the saved chunks; each read lands in a narrowed view of the
wanted box, i.e. straight in the rank's own memory.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, ReadItem, SavePlan,
                                                  TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megalite.zero.state import ShardEntry

Entries = Dict[str, ShardEntry]


class StateMismatch(ValueError):
    """The checkpoint lacks a wanted tensor or holds it at another global shape."""


class BoxSavePlanner(DefaultSavePlanner):
    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: Entries, storage_meta=None,
                       is_coordinator: bool = False) -> None:
        self.entries, self.state_dict, self.is_coordinator = state_dict, {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        items: List[WriteItem] = []
        for key, entry in self.entries.items():
            if entry.replica:  # another rank writes the same values
                continue
            for (offsets, sizes), view in zip(entry.boxes, entry.tensors):
                items.append(WriteItem(
                    index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                        properties=TensorProperties(dtype=view.dtype),
                        size=torch.Size(entry.global_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        entry = self.entries[write_item.index.fqn]
        for (offsets, _), view in zip(entry.boxes, entry.tensors):
            if torch.Size(offsets) == write_item.index.offset:
                # a view: the writer copies just the box, not its buffer; contiguous, so the
                # stored bytes are in C order (storage.py reads sub-boxes of them in place)
                return view.detach() if view.is_contiguous() else view.contiguous()
        raise AssertionError(f"no box at {write_item.index}")


class BoxLoadPlanner(DefaultLoadPlanner):
    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: Entries, metadata=None,
                       is_coordinator: bool = False) -> None:
        self.entries, self.state_dict = state_dict, {}
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items: List[ReadItem] = []
        for key, entry in self.entries.items():
            md = self.metadata.state_dict_metadata.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise StateMismatch(f"the checkpoint has no tensor {key!r}")
            if tuple(md.size) != tuple(entry.global_shape):
                raise StateMismatch(f"{key} is {list(md.size)} in the checkpoint, "
                                    f"{list(entry.global_shape)} in this model")
            chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in entry.boxes]
            items.extend(create_read_items_for_chunk_list(key, md, chunks))
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.entries[index.fqn].tensors[index.index]

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise StateMismatch(f"the checkpoint stores {read_item.dest_index.fqn!r} as pickled "
                            "bytes; megalite never unpickles those")
