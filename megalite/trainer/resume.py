"""Checkpoints of a Trainer: resume (any layout for the sharded format, its own layout for the
per-layout one), weights for eval, save. Functions of the trainer ``t`` whose state they read
and set; Trainer.maybe_resume / load_weights / save_checkpoint call them."""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Optional

import torch

from megalite.checkpoint.async_save import staged
from megalite.models import model_differences
from megalite.trainer import checkpoint, objective
from megalite.zero import state as shard_state
from megalite.zero.optimizer import publish_masters


class ResumeError(ValueError):
    """The checkpoint found in the run cannot continue this config (a user's mistake: the CLI
    prints it as one ``error:`` line)."""


def resume_off_problem(ckpt_dir: str) -> Optional[str]:
    """Why a run with checkpoint.resume=false cannot use ``ckpt_dir``, or None."""
    found = checkpoint.step_dirs(ckpt_dir)
    if found or os.path.exists(os.path.join(ckpt_dir, "latest")):
        held = f"checkpoints up to {found[-1]}" if found else "a 'latest' pointer"
        return (f"checkpoint.resume=false: {ckpt_dir} already holds {held} of another run; "
                "this run will not write beside them (its 'latest' would hide them and "
                "checkpoint.keep could remove them): give it its own --run.dir (or "
                "--checkpoint.dir), or resume")
    return None


def maybe_resume(t) -> None:
    """Continue from the run's latest checkpoint (checkpoint.resume), checked before any
    shard is read: step, model shape, layout. With resume off, a checkpoints directory that
    already holds checkpoints is refused: this run's would sit beside them, its ``latest``
    hide them and its pruning could remove them."""
    if not t.cfg.checkpoint.resume:
        problem = resume_off_problem(t.ckpt_dir)
        if problem:  # refused before touching the directory (another run's may be in it)
            raise ResumeError(problem)
    if t.dims.rank == 0:
        for path in checkpoint.remove_stale_tmp(t.ckpt_dir):
            t.log.print(f"removed {path}: a save that did not finish (the process was killed)")
    if not t.cfg.checkpoint.resume:
        return
    path = checkpoint.latest(t.ckpt_dir, warn=t._warn)
    if path is None:
        return
    meta = checkpoint.read_meta(path)
    if meta.get("step", 0) > t.cfg.train.steps:
        raise ResumeError(
            f"checkpoint.resume: {path} is at step {meta['step']}, past train.steps="
            f"{t.cfg.train.steps}: this run directory holds another run; give this one "
            f"its own --run.dir, raise train.steps, or pass --checkpoint.resume=false")
    differ = checkpoint.tokenizer_differences(meta.get("tokenizer"), fingerprint(t))
    if differ:
        raise ResumeError(
            f"checkpoint.resume: {path} was trained with another tokenizer: {differ}; resume "
            f"with its tokenizer (--data.tokenizer={path}/tokenizer.json, the data prepared "
            "with it), or give this run its own --run.dir (checkpoint.init_from needs the "
            "same tokenizer too)")
    differ = model_differences(meta.get("model_args", {}), asdict(t.args), ("num_labels",))
    if differ:
        raise ResumeError(
            f"checkpoint.resume: {path} holds another model: "
            + ", ".join(f"{k}={saved} there, {mine} here" for k, saved, mine in differ)
            + "; resume with the checkpoint's model settings, or give this run its own "
            "--run.dir")
    if not checkpoint.is_sharded(meta):
        _resume_format1(t, path, meta)
    else:
        _check_batch(t, path, meta)
        state = t.opt.state_dict()
        read = checkpoint.load_sharded(path, meta, checkpoint.state_entries(
            t.engine.table, state), t.dims.world_group)
        t.opt.load_state_dict(dict(state, step=meta["optimizer_step"]))
        if t.scaler is not None and meta.get("scaler"):
            t.scaler.load_state_dict(meta["scaler"])
        t.step = meta["step"]
        t.bytes_read = read
    t.run_id = meta.get("run_id", t.run_id)  # the resumed run goes on
    t.log.print(f"resumed from {path} at step {t.step}")


def fingerprint(t) -> dict:
    """The run's tokenizer fingerprint, hashed once (the tokenizer does not change in a run;
    every save and the start-up checks read it)."""
    if "_tokenizer_fingerprint" not in vars(t):
        t._tokenizer_fingerprint = checkpoint.tokenizer_fingerprint(t.tokenizer_file,
                                                                     t.tokenizer)
    return t._tokenizer_fingerprint


def _check_batch(t, path: str, meta: dict) -> None:
    """A batch is indexed by step, so the same global batch continues the data exactly;
    another continues by consumed samples (the next sample after the checkpoint's last),
    with a warning. (Dropout is seeded by step and rank — step_seed — so no per-rank RNG
    state is saved.)"""
    saved = meta.get("global_batch_size", t.gbs)
    if saved == t.gbs:
        return
    step = int(meta["step"])
    consumed = int(meta.get("consumed_samples", step * saved))
    t.sample_shift = consumed - step * t.gbs
    t._warn(f"warning: {path} was trained with a global batch of {saved} samples, this "
               f"run's is {t.gbs}: the data continues by consumed samples (from sample "
               f"{consumed}), not as the original run would have; the learning-rate "
               "schedule still follows the step")
    needed = t.cfg.train.steps * t.gbs + t.sample_shift
    if needed > len(t.train_ds):  # a smaller global batch reaches further samples
        t.train_ds, _, _ = objective.datasets(t.cfg, needed, t.cfg.train.eval_iters * t.gbs)


def _resume_format1(t, path: str, meta: dict) -> None:
    """A checkpoint of the per-layout format: only at its own tp, pp and ZeRO sharding (its
    optimizer shards are that layout's flat buckets)."""
    problem = checkpoint.format1_problem(path, meta, t.dims.tp, t.dims.pp, t.engine.layout())
    if problem:
        raise ResumeError(problem)
    shard = checkpoint.load_shard(path, t.dims, meta)
    sharded = t.engine.shards_over_dp
    state = checkpoint.load_dp_shard(path, t.dims, meta) if sharded else shard
    t.opt.load(shard["model"], state["optimizer"])
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    t.step = shard["step"]


@torch.no_grad()
def load_weights(t, path: str) -> None:
    """Model weights only (eval), from a checkpoint of any layout: the fp32 masters, read into
    this rank's owned parameter shards (through an fp32 buffer when the parameters are 16-bit)
    and published as the optimizer publishes its own (``publish_masters``). No optimizer state
    is read or allocated: a read-only Trainer has no optimizer."""
    engine = t.engine
    owned = [g.owned() for g in engine.groups]
    masters = [o if o.dtype == torch.float32 else torch.empty(o.shape, device=o.device)
               for o in owned]
    meta = checkpoint.read_meta(path)
    values = None
    if not checkpoint.is_sharded(meta):
        values = checkpoint.load_shard(path, t.dims, meta)["model"]
    else:
        checkpoint.load_sharded(path, meta, checkpoint.state_entries(
            engine.table, {"master": shard_state.entries(engine, masters)}, kinds=("master",)),
            t.dims.world_group)
    publish_masters(engine, masters, [m is o for m, o in zip(masters, owned)], values)


def save_checkpoint(t) -> str:
    """Every rank writes the boxes it owns (checkpoint.save); the non-tensor state goes
    into meta.json."""
    state = t.opt.state_dict()
    p = t.cfg.parallel
    meta = {"config": asdict(t.cfg), "model_args": asdict(t.args),
            "run_id": t.run_id, "optimizer_step": state["step"],
            "consumed_samples": t.step * t.gbs + t.sample_shift,
            "global_batch_size": t.gbs, "tokenizer": fingerprint(t),
            "scaler": t.scaler.state_dict() if t.scaler is not None else None,
            "layout": {"zero_stage": p.zero_stage, "offload": p.offload_optimizer,
                       "chunks": len(t.model.chunks)}}
    entries = checkpoint.state_entries(t.engine.table, state)
    args = (t.ckpt_dir, t.step, t.dims)
    if t.saver is None:
        return checkpoint.save(*args, entries, meta, t.tokenizer_file,
                               t.cfg.checkpoint.keep)
    t.saver.wait()  # the previous save's host copy is released before this one is made
    t.saver.submit(checkpoint.save, *args, staged(entries), meta, t.tokenizer_file,
                      t.cfg.checkpoint.keep, group=t.saver.group)
    return checkpoint.step_dir(t.ckpt_dir, t.step)
