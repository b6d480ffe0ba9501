"""Shared by the launcher's process tests: the tiny dp=2 x tp=2 job, its losses, and finding or
waiting for the processes of one job (tagged with MEGALITE_TEST_TAG) through /proc."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

from helpers import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")


def train_args(run_dir: str, cache: str, steps: int = 6, *extra: str) -> List[str]:
    return ["--config", TINY, "--parallel.dp=2", "--parallel.tp=2", "--data.source=synthetic",
            f"--train.steps={steps}", "--train.micro_batch_size=2", "--train.eval_iters=1",
            "--run.tensorboard=false", "--run.sample_tokens=0", "--parallel.timeout_s=60",
            "--parallel.backend=gloo",  # CPU even where a GPU is (auto would pick nccl)
            f"--run.dir={run_dir}", f"--data.cache_dir={cache}", *extra]


def losses(run_dir: str) -> Dict[int, float]:
    """step -> loss from metrics.jsonl (a restarted run appends: the last line of a step wins)."""
    out: Dict[int, float] = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if "loss" in row and "step" in row:
                        out[row["step"]] = row["loss"]
    return out


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT") and not k.startswith(("OMPI_", "PMIX_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, **extra)
    return env


def _environ(pid: str) -> Dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _alive(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are reaped late here
    except OSError:
        return False


def tagged(tag: str) -> Dict[int, Dict[str, str]]:
    """Live processes whose environment carries MEGALITE_TEST_TAG=tag: pid -> environ."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        env = _environ(pid)
        if env.get("MEGALITE_TEST_TAG") == tag and _alive(pid):
            out[int(pid)] = env
    return out


def rank_pid(tag: str, rank: int) -> Optional[int]:
    """The training process of ``rank`` (the launcher's own environment has no RANK)."""
    for pid, env in tagged(tag).items():
        if env.get("RANK") == str(rank):
            return pid
    return None


def wait_for_step(run_dir: str, step: int, proc, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while max(losses(run_dir), default=0) < step:
        assert proc.poll() is None, f"the job ended (code {proc.returncode}) before step {step}"
        assert time.time() < deadline, f"no step {step} in {timeout_s} s"
        time.sleep(0.2)


def wait_gone(tag: str, timeout_s: float = 10) -> Dict[int, Dict[str, str]]:
    deadline = time.time() + timeout_s
    while tagged(tag) and time.time() < deadline:
        time.sleep(0.2)
    return tagged(tag)
