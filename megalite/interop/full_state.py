"""The whole model of a megalite checkpoint, whatever layout wrote it: the one seam between
checkpoint formats and the tools that need full tensors (HF export, ``checkpoint.init_from``).

``load_full_model_state(ckpt_dir) -> (model_args, state, tokenizer_file)``: ``state`` maps every
parameter name of the single-process model (``CausalLM.named_parameters()``: a tied head is not
listed) to its full fp32 tensor, merged from the tp x pp shard files (TP slices concatenated
along their split dim, vocabulary padding cut off, pipeline stages' disjoint names united).
Tensors are merged on access from memory-mapped files, so a caller that handles one tensor at a
time holds about one tensor. Files are read with ``torch.load(weights_only=True)``: loading never
runs code. A checkpoint format that replaces today's reimplements this function.

``save_full_model_state`` writes a weights-only checkpoint (one shard, tp = pp = dp = 1) that
``megalite eval``/``generate`` and ``init_from`` read (``convert --from hf``).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from megalite.checkpoint.files import fsync_file, place_checkpoint
from megalite.models import CausalLM, ModelArgs
from megalite.trainer import checkpoint

SHARD = "model_tp{t:02d}_pp{p:02d}.pt"


class CheckpointReadError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what to do."""


class FullState(Mapping[str, torch.Tensor]):
    """Read-only name -> full tensor, merged from the shards on each access (not cached)."""

    def __init__(self, shapes: Dict[str, Tuple[int, ...]],
                 merge: Callable[..., torch.Tensor]):
        self._shapes, self._merge = shapes, merge

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        return self._merge(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[name]

    def check(self) -> None:
        """Raise ``CheckpointReadError`` now for what a later access would fail on (a missing
        tensor, a wrong shape), reading shapes only: merging on meta tensors."""
        for name in self._shapes:
            self._merge(name, meta=True)


def model_args_from(meta: dict, where: str) -> ModelArgs:
    """``ModelArgs`` from a meta.json's ``model_args``; unknown or missing fields are named."""
    raw = meta.get("model_args")
    known = {f.name for f in fields(ModelArgs)}
    if not isinstance(raw, dict) or set(raw) - known:
        extra = sorted(set(raw) - known) if isinstance(raw, dict) else "missing"
        raise CheckpointReadError(f"{where}: model_args ({extra}) are not this megalite's; "
                                  "convert it with the megalite version that wrote it")
    try:
        return ModelArgs(**raw)
    except TypeError as e:
        raise CheckpointReadError(f"{where}: model_args are incomplete ({e})") from None


def full_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Parameter name -> shape of the single-process model (built on meta: no memory)."""
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in CausalLM(args).named_parameters()}


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointReadError(f"{path}: missing; the checkpoint is incomplete (use another "
                                  "step or train again)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickled code, ...: one line
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointReadError(f"{path}: not a readable weights file ({why[:200]}); the "
                                  "checkpoint is damaged: use another step") from None


def load_full_model_state(ckpt_dir: str) -> Tuple[ModelArgs, FullState, Optional[str]]:
    """(model args, full tensors by name, the tokenizer file or None) of the checkpoint at
    ``ckpt_dir`` (a checkpoint, a checkpoints directory or a run directory: its latest)."""
    from megalite.trainer.inference import resolve_checkpoint

    try:
        path = resolve_checkpoint(ckpt_dir)
    except FileNotFoundError as e:
        raise CheckpointReadError(str(e)) from None
    meta_file = os.path.join(path, "meta.json")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        tp, pp = int(meta["layout"]["tp"]), int(meta["layout"]["pp"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointReadError(f"{meta_file}: unreadable ({type(e).__name__}: {e}); the "
                                  "checkpoint is damaged: use another step") from None
    args = model_args_from(meta, meta_file)
    shapes = full_shapes(args)
    tokenizer = os.path.join(path, "tokenizer.json")
    tokenizer_file = tokenizer if os.path.isfile(tokenizer) else None
    if checkpoint.is_sharded(meta):  # format 2 (DCP): the fp32 masters, one tensor at a time
        state = FullState(shapes, _dcp_masters(path, meta, shapes))
        state.check()
        return args, state, tokenizer_file
    split_dim: Dict[str, int] = meta.get("tp_shard_dims", {})
    pieces: Dict[str, List[torch.Tensor]] = {}
    for p in range(pp):
        for t in range(tp):
            file = os.path.join(path, SHARD.format(t=t, p=p))
            model = _load(file).get("model")
            if not isinstance(model, dict):
                raise CheckpointReadError(f"{file}: holds no model weights; use another step")
            for name, value in model.items():
                parts = pieces.setdefault(name, [])
                if len(parts) < tp:  # a last stage's tied copy repeats the embedding
                    parts.append(value)
    missing = sorted(set(shapes) - set(pieces))
    if missing:
        raise CheckpointReadError(f"{path}: no weights for {', '.join(missing[:3])}"
                                  f"{' ...' if len(missing) > 3 else ''}; the checkpoint does "
                                  "not match its meta.json model_args")

    def merge(name: str, meta: bool = False) -> torch.Tensor:
        parts, dim = pieces[name], split_dim.get(name)
        if meta:
            parts = [torch.empty(x.shape, device="meta") for x in parts]
        value = parts[0] if dim is None else torch.cat(parts, dim)
        if dim is not None:  # vocabulary padding of the TP layout
            value = value.narrow(dim, 0, shapes[name][dim])
        if tuple(value.shape) != shapes[name]:
            raise CheckpointReadError(f"{path}: {name} has shape {tuple(value.shape)}, its "
                                      f"model_args say {shapes[name]}; the checkpoint is damaged")
        return value.float()

    state = FullState(shapes, merge)
    state.check()
    return args, state, tokenizer_file


def _dcp_masters(path: str, record: dict, shapes: Dict[str, Tuple[int, ...]]
                 ) -> Callable[..., torch.Tensor]:
    """name -> that parameter whole from a format-2 checkpoint's masters (only its bytes are
    read); the files are checked and ``.metadata`` unpickled once, at the first tensor."""
    from megalite.zero.state import ShardEntry

    metadata = None  # the DCP Metadata, once the first tensor is read

    def master(name: str, meta: bool = False) -> torch.Tensor:
        nonlocal metadata
        shape = shapes[name]
        if meta:
            return torch.empty(shape, device="meta")
        full = torch.empty(shape, dtype=torch.float32)
        entry = ShardEntry(tuple(shape), [((0,) * len(shape), tuple(shape))], [full])
        try:
            if metadata is None:
                metadata = checkpoint.read_sharded_metadata(path, record)
            checkpoint.load_sharded(path, record, {f"master/{name}": entry}, metadata=metadata)
        except checkpoint.CheckpointError as e:
            raise CheckpointReadError(str(e)) from None
        return full

    return master


def save_full_model_state(ckpt_dir: str, args: ModelArgs, state: Mapping[str, torch.Tensor],
                          tokenizer_file: Optional[str] = None,
                          extra_files: Optional[Dict[str, str]] = None) -> str:
    """Write a weights-only checkpoint ``ckpt_dir/step_00000000`` (+ ``latest``) of the full
    model: one shard (tp = pp = dp = 1), no optimizer state. ``extra_files`` (name -> source
    path) are copied beside it (an imported tokenizer's config: chat template, special
    tokens). Atomic: written into a temporary directory, fsynced, renamed into place, then
    ``latest`` replaced (``checkpoint.files.place_checkpoint``): a failure leaves neither a half
    checkpoint nor a changed ``latest``."""
    final = os.path.join(ckpt_dir, "step_00000000")
    if os.path.exists(final):
        raise CheckpointReadError(f"{final} exists; convert into a new directory")
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = os.path.join(ckpt_dir, ".tmp_step_00000000")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        torch.save({"model": {k: state[k].contiguous() for k in full_shapes(args)}, "step": 0},
                   os.path.join(tmp, SHARD.format(t=0, p=0)))
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, name))
        for name in os.listdir(tmp):
            fsync_file(os.path.join(tmp, name))
        meta = {"step": 0, "model_args": asdict(args), "tp_shard_dims": {},
                "layout": {"dp": 1, "tp": 1, "pp": 1}, "weights_only": True}
        place_checkpoint(ckpt_dir, tmp, final, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half checkpoint; ``latest`` untouched
        raise
    return final
