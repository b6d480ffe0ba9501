"""Which backend and which GPU a rank uses, decided before any process group starts.

Backend (``parallel.backend``):
* ``gloo``: CPU, whatever the node has.
* ``nccl``: needs CUDA; without it the job stops with one line (never a silent CPU run).
* ``auto``: nccl when CUDA is available, else gloo, except that a job SLURM allocated GPUs to
  (``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``, ``SLURM_GPUS_ON_NODE``) stops with one line on a node
  where CUDA is unavailable: a broken driver must not turn a GPU job into a CPU one.

GPU of a rank (``visible`` = ``torch.cuda.device_count()``, which honours
``CUDA_VISIBLE_DEVICES``; ``local`` = ranks on this node):
1. ``visible >= local``: ``cuda:LOCAL_RANK``, one GPU per local rank (torchrun, megalite launch,
   mpirun, srun without per-task binding).
2. ``visible < local`` under srun, when SLURM says the step holds at least ``local`` GPUs on this
   node: SLURM bound GPUs per task (``--gpus-per-task``, ``--gpu-bind``) and each task sees only
   its own, so the rank takes ``cuda:0``, the first GPU it sees (LOCAL_RANK=3, one GPU -> cuda:0).
3. Otherwise more ranks than GPUs would share one (NCCL: "duplicate GPU") or ask for an ordinal
   that does not exist: the job stops with one line.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import torch

SLURM_GPU_VARS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE")
_NONE = ("", "(null)", "N/A", "none")  # SLURM's ways of saying "no GPUs" (ids: "0" is a GPU)


class DeviceError(ValueError):
    """The backend or GPUs asked for do not fit this node (a user's or cluster's mistake)."""


def slurm_gpus(environ: Mapping[str, str]) -> Optional[str]:
    """``NAME=value`` of the first SLURM variable saying this node's step holds GPUs, or None."""
    for key in SLURM_GPU_VARS:
        value = environ.get(key, "").strip()
        if value not in _NONE and not (key == "SLURM_GPUS_ON_NODE" and value == "0"):
            return f"{key}={value}"
    return None


def slurm_node_gpu_count(environ: Mapping[str, str]) -> Optional[int]:
    """How many GPUs SLURM gave this step on this node (None: SLURM does not say)."""
    for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = environ.get(key, "").strip()
        if value not in _NONE:
            return len([g for g in value.split(",") if g.strip()])
    try:
        return int(environ.get("SLURM_GPUS_ON_NODE", "")) or None
    except ValueError:
        return None


def resolve_backend(backend: str, environ: Mapping[str, str] = os.environ) -> str:
    """``gloo`` or ``nccl`` for the configured backend on this node; DeviceError when a GPU job
    finds no CUDA."""
    if torch.cuda.is_available():
        return "nccl" if backend == "auto" else backend
    if backend == "nccl":
        raise DeviceError(
            f"parallel.backend=nccl but CUDA is not available on this node (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}): run on a GPU "
            "node with a working driver, or pass --parallel.backend=gloo to train on the CPU")
    allocated = slurm_gpus(environ) if backend == "auto" else None
    if allocated:
        raise DeviceError(
            f"SLURM allocated GPUs to this job ({allocated}) but CUDA is not available on this "
            f"node (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}): "
            "check the node's driver and torch build, or pass --parallel.backend=gloo to train "
            "on the CPU")
    return "gloo"


def cuda_index(local_rank: int, local_world_size: int, under_srun: bool,
               environ: Mapping[str, str] = os.environ, why_local: str = "") -> int:
    """The CUDA device index this rank uses (rules in the module docstring); DeviceError when
    the node's visible GPUs cannot give every local rank its own. ``why_local`` says where the
    local rank count came from, in that error."""
    visible = torch.cuda.device_count()
    if local_world_size <= visible and 0 <= local_rank < visible:
        return local_rank
    node_gpus = slurm_node_gpu_count(environ) if under_srun else None
    if visible >= 1 and node_gpus is not None and node_gpus >= local_world_size:
        return 0  # srun bound this task to its own GPU(s): the first one it sees
    shown = environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
    raise DeviceError(
        f"{local_world_size} ranks on this node{why_local} but {visible} visible GPU(s){where}: "
        f"start at most {visible} rank(s) per node (--num_gpus / --nproc_per_node, or srun "
        "--gpus-per-task=1), or pass --parallel.backend=gloo to train on the CPU")
