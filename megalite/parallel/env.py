"""Where am I? Rank discovery from the environment a launcher leaves behind.

Precedence (first match wins):
1. ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``: torchrun, the deepspeed
   launcher and megalite's own local launcher.
2. ``OMPI_COMM_WORLD_*``: ranks started by OpenMPI's ``mpirun``.
3. ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, only inside an ``srun`` step
   (``SLURM_STEP_ID`` set): in a batch script's own shell they describe the batch step, not a rank.
4. Nothing: a bare run, which the CLI turns into a local launch of the ranks the config asks for.
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
    source: str  # "env" | "openmpi" | "slurm"


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


def discover(env: Mapping[str, str] = os.environ) -> Optional[LaunchEnv]:
    """The launch environment of this process, or None for a bare (launcher-less) run."""
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        return LaunchEnv(rank, world, _int(env, "LOCAL_RANK", 0),
                         _int(env, "LOCAL_WORLD_SIZE", world), env.get("MASTER_ADDR", "127.0.0.1"),
                         _int(env, "MASTER_PORT", 29500), "env")
    if "OMPI_COMM_WORLD_RANK" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        return LaunchEnv(_int(env, "OMPI_COMM_WORLD_RANK"), world,
                         _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                         _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world),
                         env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 29500),
                         "openmpi")
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world = _int(env, "SLURM_NTASKS")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        port = 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000
        per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", ""))
        return LaunchEnv(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0),
                         int(per_node.group()) if per_node else world,
                         env.get("MASTER_ADDR") or first_slurm_host(nodelist),
                         _int(env, "MASTER_PORT", port), "slurm")
    return None
