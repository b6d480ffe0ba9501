"""ParallelDims: the one object that turns (dp, tp, pp) and the launcher's environment into ranks
and process groups. It is built once and passed to whoever needs a group.

Rank layout, TP fastest so a TP group stays inside a node, then DP, then PP:

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megalite.parallel.comm import CommMeter
from megalite.parallel.device import DeviceError, cuda_index, resolve_backend
from megalite.parallel.env import LaunchEnv
from megalite.parallel.store import rendezvous_store

# Set once this process has started torch.distributed: its entry point then ends it with
# megalite.cli.exit_process (no interpreter finalisation).
STARTED_PROCESS_GROUP = False


class LayoutError(ValueError):
    """The parallel degrees, backend or devices do not fit the world the launcher started."""


@dataclass
class ParallelDims:
    dp: int
    tp: int
    pp: int
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "none"  # of the process group: gloo | nccl | none (one process)
    meter: CommMeter = field(default_factory=CommMeter)
    # Process groups of this rank (None when the axis has size 1 or there is no process group).
    world_group: Optional[object] = None
    dp_group: Optional[object] = None
    tp_group: Optional[object] = None
    pp_group: Optional[object] = None
    mp_group: Optional[object] = None  # tp x pp: everything one data-parallel replica spans
    embed_group: Optional[object] = None  # first + last stage: tied embedding gradients
    # pp > 1: one two-rank group per direction between neighbouring stages, keyed (source
    # pp_rank, destination pp_rank), the last -> first wrap included: NCCL runs a group's
    # transfers in order on one stream, so each direction needs its own (pipeline/p2p.py)
    p2p_groups: Dict[Tuple[int, int], object] = field(default_factory=dict)

    def __post_init__(self):
        for axis in ("dp", "tp", "pp"):
            if getattr(self, axis) < 1:
                raise LayoutError(f"parallel.{axis}={getattr(self, axis)} must be >= 1")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def reports_loss(self) -> bool:
        """One rank per data-parallel replica contributes the loss to the step's all-reduce: TP
        rank 0 of the last pipeline stage (the other TP ranks hold the same value)."""
        return self.tp_rank == 0 and self.is_last_stage

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise LayoutError(
                f"world size {world_size} != dp*pp*tp = {self.dp}*{self.pp}*{self.tp} = "
                f"{self.world_size}: start {self.world_size} ranks or change parallel.dp/pp/tp")

    def describe(self) -> str:
        return (f"world {self.world_size} = dp {self.dp} x pp {self.pp} x tp {self.tp}; "
                f"rank {self.rank} = (pp {self.pp_rank}, dp {self.dp_rank}, tp {self.tp_rank}); "
                f"device {self.device}, backend {self.backend}")

    @classmethod
    def single(cls, backend: str = "gloo") -> "ParallelDims":
        """One process, no process group: the reference every parallel test compares against.
        With backend ``auto`` it runs on the GPU when there is one, with ``nccl`` it must
        (megalite.parallel.device's rules; LayoutError naming the fix otherwise)."""
        try:
            cuda = resolve_backend(backend) == "nccl"
        except DeviceError as e:
            raise LayoutError(str(e)) from None
        return cls(dp=1, tp=1, pp=1, device=torch.device("cuda" if cuda else "cpu"))

    @classmethod
    def initialize(cls, dp: int, tp: int, pp: int, env: LaunchEnv, backend: str = "auto",
                   timeout_s: float = 600.0) -> "ParallelDims":
        """Check the layout against the launcher's world, start torch.distributed, build groups."""
        dims = cls(dp=dp, tp=tp, pp=pp, rank=env.rank, local_rank=env.local_rank)
        dims.check_world(env.world_size)
        try:  # backend and GPU before the process group: a mistake is one line, not a hang
            backend = resolve_backend(backend)
            if backend == "nccl":
                sizes = {"LOCAL_WORLD_SIZE", "LOCAL_SIZE"} & set(os.environ)
                guessed = env.source == "env" and not sizes
                index = cuda_index(env.local_rank, env.local_world_size, env.source == "slurm",
                                   why_local=" (LOCAL_WORLD_SIZE unset: all WORLD_SIZE ranks "
                                             "counted as local)" if guessed else "")
                torch.cuda.set_device(index)
                dims.device = torch.device("cuda", index)
        except DeviceError as e:
            raise LayoutError(str(e)) from None
        dims.backend = backend
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        global STARTED_PROCESS_GROUP
        STARTED_PROCESS_GROUP = True
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    store=rendezvous_store(env, timeout_s))
        dims._build_groups()
        return dims

    def _build_groups(self) -> None:
        """Every rank creates every group in the same order (torch.distributed requires it)
        and keeps the ones it belongs to."""
        self.world_group = dist.group.WORLD if self.world_size > 1 else None
        r = range
        layouts = {
            "tp_group": [[self.rank_of(p, d, t) for t in r(self.tp)]
                         for p in r(self.pp) for d in r(self.dp)],
            "dp_group": [[self.rank_of(p, d, t) for d in r(self.dp)]
                         for p in r(self.pp) for t in r(self.tp)],
            "pp_group": [[self.rank_of(p, d, t) for p in r(self.pp)]
                         for d in r(self.dp) for t in r(self.tp)],
            "mp_group": [[self.rank_of(p, d, t) for p in r(self.pp) for t in r(self.tp)]
                         for d in r(self.dp)],
            "embed_group": [sorted({self.rank_of(0, d, t), self.rank_of(self.pp - 1, d, t)})
                            for d in r(self.dp) for t in r(self.tp)],
        }
        for name, groups in layouts.items():
            setattr(self, name, self._new_groups(groups))
        for src in r(self.pp if self.pp > 1 else 0):
            for dst in sorted({(src + 1) % self.pp, (src - 1) % self.pp}):
                ranks = [[self.rank_of(src, d, t), self.rank_of(dst, d, t)]
                         for d in r(self.dp) for t in r(self.tp)]
                group = self._new_groups(ranks)
                if group is not None:
                    self.p2p_groups[(src, dst)] = group

    def _new_groups(self, rank_lists: List[List[int]]):
        mine = None
        for ranks in rank_lists:
            if len(ranks) == 1:
                continue  # an axis of size 1 needs no group; comm treats None as "no peers"
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        return mine

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
