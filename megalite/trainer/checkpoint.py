"""Atomic checkpoints: written into a temporary directory, renamed into place, then the
``latest`` pointer is replaced — a crash at any moment leaves the previous checkpoint intact.

Layout of ``CKPT_DIR/step_00000100/``:
- ``model_tp{t}_pp{p}.pt``: per model-parallel rank (written by data-parallel rank 0): the fp32
  master weights (as a model state dict, gathered over dp when ZeRO shards them), the step, and
  without dp sharding the optimizer state.
- ``optim_tp{t}_pp{p}_dp{d}.pt``: with ZeRO stage >= 1, every rank's own optimizer shard (AdamW
  moments of its segments, loss scaler).
- ``meta.json``: step, resolved config, parallel layout.
- ``tokenizer.json``: the tokenizer, so generate/eval need nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional

import torch

from megalite.parallel import comm
from megalite.parallel.dims import ParallelDims


def step_dir(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"step_{step:08d}")


def shard_name(dims: ParallelDims) -> str:
    return f"model_tp{dims.tp_rank:02d}_pp{dims.pp_rank:02d}.pt"


def dp_shard_name(dims: ParallelDims) -> str:
    return f"optim_tp{dims.tp_rank:02d}_pp{dims.pp_rank:02d}_dp{dims.dp_rank:02d}.pt"


def latest(ckpt_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint, or None."""
    pointer = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(ckpt_dir, f.read().strip())
    return path if os.path.isdir(path) else None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(ckpt_dir: str, step: int, dims: ParallelDims, shard: Dict[str, Any],
         meta: Dict[str, Any], tokenizer_file: Optional[str] = None, keep: int = 0,
         dp_shard: Optional[Dict[str, Any]] = None) -> str:
    """Collective: every rank calls it; dp-rank-0 ranks write their model-parallel shard, and
    every rank its ``dp_shard`` when given (ZeRO's sharded optimizer state)."""
    final = step_dir(ckpt_dir, step)
    tmp = os.path.join(ckpt_dir, f".tmp_step_{step:08d}")
    if dims.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    comm.barrier()
    if dims.dp_rank == 0:
        torch.save(shard, os.path.join(tmp, shard_name(dims)))
    if dp_shard is not None:
        torch.save(dp_shard, os.path.join(tmp, dp_shard_name(dims)))
    comm.barrier()
    if dims.rank == 0:
        meta = dict(meta, step=step, layout={"dp": dims.dp, "tp": dims.tp, "pp": dims.pp})
        _write_atomic(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(os.path.join(ckpt_dir, "latest"), os.path.basename(final))
        _prune(ckpt_dir, keep)
    comm.barrier()
    return final


def _prune(ckpt_dir: str, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_"))
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def read_meta(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def load_shard(path: str, dims: ParallelDims) -> Dict[str, Any]:
    """This rank's shard of a checkpoint saved with the same layout."""
    meta = read_meta(path)
    layout = meta["layout"]
    if (layout["tp"], layout["pp"]) != (dims.tp, dims.pp):
        raise ValueError(f"checkpoint {path} was saved with tp={layout['tp']}, pp={layout['pp']}; "
                         f"this run has tp={dims.tp}, pp={dims.pp}: resharding is not supported "
                         f"yet, resume with the same tp and pp")
    return torch.load(os.path.join(path, shard_name(dims)), map_location="cpu", weights_only=False)


def load_dp_shard(path: str, dims: ParallelDims) -> Dict[str, Any]:
    """This rank's own optimizer shard (ZeRO stage >= 1) of a checkpoint."""
    return torch.load(os.path.join(path, dp_shard_name(dims)), map_location="cpu",
                      weights_only=False)
