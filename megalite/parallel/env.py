"""Where am I? Rank discovery from the environment a launcher leaves behind.

Precedence (first match wins):
1. ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``: torchrun, the deepspeed
   launcher and megalite's own local launcher.
2. ``OMPI_COMM_WORLD_*``: ranks started by OpenMPI's ``mpirun``.
3. ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, only inside an ``srun`` step
   (``SLURM_STEP_ID`` set): in a batch script's own shell they describe the batch step, not a rank.
4. mpi4py, last resort, only when an MPI launcher left a trace (``PMI_RANK``, ``PMIX_RANK``,
   ``MPI_LOCALRANKID``, ``MV2_COMM_WORLD_RANK``...) or ``MEGALITE_MPI4PY=1``: rank and size from
   ``COMM_WORLD``, local rank from the shared-memory sub-communicator, master address and port
   broadcast from rank 0. (MPICH/Intel MPI/MVAPICH ``mpiexec``; ``srun --mpi=pmix`` without the
   SLURM step variables.)
5. Nothing: a bare run, which the CLI turns into a local launch of the ranks the config asks for.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "env" | "openmpi" | "slurm" | "mpi4py"


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = env.get(key)
    if value is None:
        if default is None:
            raise RuntimeError(f"launcher environment: {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"launcher environment: {key}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[03-05,9],login1`` -> ``gpu03``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise RuntimeError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def tasks_on_node(tasks_per_node: str, node_id: int) -> Optional[int]:
    """``SLURM_STEP_TASKS_PER_NODE`` such as ``4(x2),3`` -> the count of node ``node_id``."""
    counts = []
    for part in filter(None, tasks_per_node.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else None


MPI_TRACES = ("PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_RANK",
              "OMPI_COMM_WORLD_RANK")


def discover(env: Mapping[str, str] = os.environ) -> Optional[LaunchEnv]:
    """The launch environment of this process, or None for a bare (launcher-less) run."""
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", world))  # deepspeed
        # without LOCAL_RANK, ranks are taken to fill nodes in order (all on one node when
        # LOCAL_WORLD_SIZE is unset too): rank 5 of 4 per node is local rank 1, never 0 for all
        local_rank = _int(env, "LOCAL_RANK", rank % max(local_world, 1))
        return LaunchEnv(rank, world, local_rank, local_world,
                         env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 29500),
                         "env")
    if "OMPI_COMM_WORLD_RANK" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world)
        if "MASTER_ADDR" not in env and local_world < world:
            # several nodes and nobody said where rank 0 is: only MPI itself can tell
            found = from_mpi4py(env, "openmpi")
            if found is not None:
                return found
            raise RuntimeError("mpirun across nodes: set MASTER_ADDR (mpirun -x MASTER_ADDR=...) "
                               "or install mpi4py (pip install megalite[mpi])")
        return LaunchEnv(_int(env, "OMPI_COMM_WORLD_RANK"), world,
                         _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0), local_world,
                         env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 29500),
                         "openmpi")
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world = _int(env, "SLURM_NTASKS")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        port = 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000
        per_node = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""),
                                 _int(env, "SLURM_NODEID", 0))
        return LaunchEnv(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0),
                         per_node or world,
                         env.get("MASTER_ADDR") or first_slurm_host(nodelist),
                         _int(env, "MASTER_PORT", port), "slurm")
    if env.get("MEGALITE_MPI4PY") == "1" or any(k in env for k in MPI_TRACES):
        return from_mpi4py(env)
    return None


def from_mpi4py(env: Mapping[str, str], source: str = "mpi4py") -> Optional[LaunchEnv]:
    """Ask MPI itself (None when mpi4py is not installed or the world has one process)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1 and env.get("MEGALITE_MPI4PY") != "1":
        return None
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    master = None
    if comm.Get_rank() == 0:
        import socket

        from megalite.launcher.local import free_port

        master = (env.get("MASTER_ADDR") or socket.gethostname(),
                  int(env.get("MASTER_PORT") or 0) or free_port())
    addr, port = comm.bcast(master, root=0)
    return LaunchEnv(comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size(), addr,
                     port, source)
