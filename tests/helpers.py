"""Shared test helpers: configs built from configs/tiny.yaml plus overrides, and running the
trainer in this process (the single-process reference) or in a spawned rank."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from megalite.config import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(run_dir: str, cache: str, *overrides: str):
    argv = ["--config", os.path.join(REPO, "configs", "tiny.yaml"), f"--run.dir={run_dir}",
            f"--data.cache_dir={cache}", "--run.tensorboard=false", "--run.sample_tokens=0",
            "--parallel.backend=gloo", *overrides]  # CPU even where a GPU is (auto: nccl)
    cfg, _ = parse_args(argv)
    return cfg


def train(cfg, distributed: bool):
    """Run the trainer; ``distributed`` ranks read RANK/WORLD_SIZE from the environment."""
    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.env import discover
    from megalite.trainer.loop import Trainer

    if distributed:
        dims = ParallelDims.initialize(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp,
                                       discover(), "gloo", timeout_s=60)
    else:
        dims = ParallelDims.single()
    trainer = Trainer(cfg, dims)
    return trainer, trainer.fit()


def max_abs_diff(a: List[float], b: List[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


def snapshot(root: str) -> Dict[str, Tuple[bytes, int]]:
    """Every file under ``root``: its bytes and modification time (did anything write there?)."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
    return out
