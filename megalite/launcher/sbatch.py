"""The sbatch script ``megalite launch --launcher slurm --sbatch`` writes and submits: one SLURM
task per rank, ``srun`` starts them, each finds its rank from ``SLURM_PROCID``.

What the script requests, decided here before anything is submitted:

- GPUs (``--gpus-per-node``) only for a GPU job: ``--gpus_per_node N``, or backend ``nccl``, or
  backend ``auto`` with ``--num_gpus`` (the backend is read from the ``megalite.train``
  arguments: ``--parallel.backend``, else ``--config``'s ``parallel.backend``). A CPU job
  (backend ``gloo``, or no ``--num_gpus``) requests none, as before.
- ``--cpus-per-task``: the node's CPUs divided by the tasks per node (from ``sinfo``; for a GPU
  job among the nodes that have enough GPUs), ``--cpus_per_task`` to choose.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from string import Template
from typing import List, Optional, Sequence, Tuple

from megalite.launcher.runners import Job

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

TEMPLATE = Template("""\
#!/bin/bash
# Written by `megalite launch --launcher slurm --sbatch`; submit again with `sbatch $$0`.
#SBATCH --job-name=megalite
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks_per_node
#SBATCH --cpus-per-task=$cpus_per_task
${gpu_request}#SBATCH --output=$output
set -euo pipefail
cd $cwd
$exports
# Rank 0 runs on the first node. The others reach it at the address SLURM itself reaches that
# node at (its NodeAddr), as IPv4 when that is a name; not `hostname -i` on the node, which on
# many distributions maps the host's own name to 127.0.1.1. (sed/awk read to the end: `head`
# would end the pipe early and, under pipefail, the script with SIGPIPE.)
head_node=$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | sed -n 1p)
head_addr=$$(scontrol show node "$$head_node" 2>/dev/null | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p' || true)
head_addr=$${head_addr:-$$head_node}
MASTER_ADDR=$$(getent ahostsv4 "$$head_addr" 2>/dev/null | awk '$$1 !~ /^127\\./ && !a {a = $$1} END {print a}' || true)
export MASTER_ADDR=$${MASTER_ADDR:-$$head_addr}
export MASTER_PORT=$master_port
export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
${gpu_env}echo "megalite: job $$SLURM_JOB_ID on $$SLURM_JOB_NODELIST, rank 0 at $$MASTER_ADDR:$$MASTER_PORT, $${SLURM_CPUS_ON_NODE:-?} CPUs and $${SLURM_GPUS_ON_NODE:-0} GPUs per node"
# --cpus-per-task again for the step: from SLURM 22.05 on, srun no longer inherits the job's
srun --kill-on-bad-exit=1 --cpus-per-task=$cpus_per_task $command
""")

GPU_ENV = """\
# A collective that fails or times out tears down its NCCL communicators and ends the process,
# so --kill-on-bad-exit stops the job instead of it hanging until its time limit (torch's
# default has changed between releases; 0 would ignore the error).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
"""

TP_ENV = """\
# Tensor parallelism starts dX's all-reduce, then runs the dW matmuls while it is in flight
# (tensor_parallel/layers.py): with one hardware queue per GPU the kernels start in that order,
# so the all-reduce overlaps the matmuls instead of queueing behind them (Megatron-LM's setting).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
"""

FABRIC_EXAMPLES = """\
# Network-fabric settings belong to your cluster, not to this script; for example:
#   export NCCL_SOCKET_IFNAME=eth0      # the interface NCCL's bootstrap and sockets use
#   export NCCL_IB_HCA=mlx5_0,mlx5_1    # which InfiniBand adapters NCCL uses
#   export FI_PROVIDER=efa              # libfabric provider (AWS EFA with the aws-ofi-nccl plugin)
"""


@dataclass
class Resources:
    """What one node of the job requests."""
    cpus_per_task: int = 1
    gpus_per_node: int = 0  # 0: a CPU job, no GPU request
    tp: int = 1  # tensor-parallel degree (CUDA_DEVICE_MAX_CONNECTIONS with GPUs and tp > 1)


def render(job: Job, nodes: int, tasks_per_node: int,
           res: Optional[Resources] = None) -> str:
    res = res or Resources()
    for key in job.exports:
        if not ENV_NAME.fullmatch(key):
            raise ValueError(f"environment variable {key!r} would be forwarded to the job but "
                             "is not a valid name ([A-Za-z_][A-Za-z0-9_]*): unset it or rename "
                             "it before --sbatch")
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(job.exports.items()))
    output = f"{job.log_dir}/slurm-%j.out" if job.log_dir else "megalite-%j.out"
    if any(c.isspace() for c in output):  # #SBATCH lines are not parsed by a shell
        raise ValueError(f"--log_dir {job.log_dir!r}: no spaces allowed with --sbatch")
    gpu = res.gpus_per_node > 0
    gpu_env = (GPU_ENV + (TP_ENV if res.tp > 1 else "") + FABRIC_EXAMPLES) if gpu else ""
    return TEMPLATE.substitute(
        nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=res.cpus_per_task,
        gpu_request=f"#SBATCH --gpus-per-node={res.gpus_per_node}\n" if gpu else "",
        output=output, cwd=shlex.quote(job.cwd), exports=exports, master_port=job.master_port,
        gpu_env=gpu_env, command=shlex.join(job.user_cmd))


def train_settings(user_cmd: Sequence[str], world_size: int) -> Tuple[str, int]:
    """(backend, tp) of a ``-m megalite.train`` (or ``--no_python megalite train``) command, from
    its arguments and ``--config``; ("auto", 1) for any other target or a config that does not
    load (it fails on the nodes with its own message)."""
    cmd = list(user_cmd)
    if "-m" in cmd and cmd[cmd.index("-m") + 1:cmd.index("-m") + 2] == ["megalite.train"]:
        argv = cmd[cmd.index("-m") + 2:]
    elif cmd[:1] and os.path.basename(cmd[0]) == "megalite" and cmd[1:2] == ["train"]:
        argv = cmd[2:]
    else:
        return "auto", 1
    from megalite.config.load import ConfigError, parse_args

    try:
        cfg, _ = parse_args(argv, verbose=False, world_size=world_size)
    except (ConfigError, ValueError, OSError):
        return "auto", 1
    return cfg.parallel.backend, cfg.parallel.tp


def gpus_per_node(requested: Optional[int], num_gpus_given: bool, tasks_per_node: int,
                  backend: str) -> int:
    """GPUs to request per node: ``--gpus_per_node`` when given; else one per rank for backend
    nccl, or for backend auto with ``--num_gpus``; else 0."""
    if requested is not None:
        gpus = requested
    elif backend == "nccl" or (backend == "auto" and num_gpus_given):
        gpus = tasks_per_node
    else:
        gpus = 0
    if backend == "nccl" and gpus < tasks_per_node:
        raise ValueError(f"--gpus_per_node {gpus} with {tasks_per_node} ranks per node and "
                         "backend nccl: NCCL needs one GPU per rank; pass --gpus_per_node "
                         f"{tasks_per_node}, or --parallel.backend=gloo for a CPU job")
    return gpus


def partition(launcher_args: Sequence[str]) -> Optional[str]:
    """The partition among the extra sbatch arguments (-p P, -pP, --partition[=]P)."""
    args = list(launcher_args)
    for i, a in enumerate(args):
        if a in ("-p", "--partition") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--partition="):
            return a.split("=", 1)[1]
        if a.startswith("-p") and not a.startswith("--") and len(a) > 2:
            return a[2:]
    return None


def _gpu_count(gres: str) -> int:
    """GPUs in an sinfo %G field such as ``gpu:8``, ``gpu:h100:8(S:0-1)`` or ``(null)``."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def node_cpus(part: Optional[str], min_gpus: int) -> Optional[int]:
    """The fewest CPUs of a node that could run the job (for a GPU job: one with at least
    ``min_gpus`` GPUs), from ``sinfo``; None when sinfo is missing or says nothing usable."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "--noheader", "--Node", "--format=%c %G"]
    if part:
        cmd.append(f"--partition={part}")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    nodes: List[Tuple[int, int]] = []
    for line in r.stdout.splitlines() if r.returncode == 0 else []:
        cpus, _, gres = line.strip().partition(" ")
        if cpus.rstrip("+").isdigit():
            nodes.append((int(cpus.rstrip("+")), _gpu_count(gres)))
    fit = [c for c, g in nodes if g >= min_gpus] or [c for c, _ in nodes]
    return min(fit) if fit else None


def cpus_per_task(requested: Optional[int], part: Optional[str], gpus: int,
                  tasks_per_node: int) -> Tuple[int, str]:
    """(CPUs per task, where that number came from) for the #SBATCH line."""
    if requested is not None:
        return requested, "--cpus_per_task"
    cpus = node_cpus(part, gpus)
    if cpus is None:
        return 1, "sinfo gave no node CPU count; pass --cpus_per_task to choose"
    return max(1, cpus // tasks_per_node), f"{cpus} CPUs per node (sinfo) / {tasks_per_node} tasks"
