"""Hugging Face model directories without ``from_pretrained``/``save_pretrained``: megalite
checkpoint -> HF directory (``export_hf``) and HF directory -> full megalite tensors
(``read_hf_dir``), one tensor at a time.

Export streams: the shard plan is made from shapes alone (the converters run on meta tensors),
then each ``model-0000k-of-0000n.safetensors`` is filled from tensors merged on demand and written
before the next is started, so peak memory is about one shard. Import reads safetensors only
(``.bin`` files are pickles, which can run code) and ``config.json`` as JSON through the
transformers config class (remote code is never trusted).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

from megalite.interop.full_state import (CheckpointReadError, FullState, full_shapes,
                                         load_full_model_state)
from megalite.interop.hf import (_transformers, args_from_hf_config, hf_config_from_args,
                                 hf_sources, megalite_sources, rope_fields)
from megalite.interop.hf_tokenizer import kept_hf_files, write_hf_tokenizer
from megalite.models import DTYPES as _ALL_DTYPES
from megalite.models import ModelArgs

DTYPES = {k: _ALL_DTYPES[k] for k in ("fp32", "bf16")}  # what ``convert --dtype`` offers
INDEX = "model.safetensors.index.json"


def shard_plan(args: ModelArgs, shapes: Dict[str, Tuple[int, ...]], itemsize: int,
               max_shard_bytes: int) -> List[List[Tuple[str, int]]]:
    """HF tensor names grouped into shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own), in the converter's order, with each tensor's byte size."""
    meta = lambda name: torch.empty(shapes[name], device="meta")  # noqa: E731
    shards: List[List[Tuple[str, int]]] = [[]]
    used = 0
    for name, fn in hf_sources(args, with_tied_head=False).items():
        size = fn(meta).numel() * itemsize
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, size))
        used += size
    return shards


def hf_config_dict(args: ModelArgs, dtype: str, eod_id: Optional[int]) -> Dict[str, Any]:
    """config.json: the transformers config plus, for LLaMA, RoPE keys for 4.x and 5.x."""
    config = hf_config_from_args(args).to_dict()
    if args.is_llama:
        config.update(rope_fields(args))
    name = "float32" if dtype == "fp32" else "bfloat16"
    config.update(dtype=name, torch_dtype=name, bos_token_id=eod_id, eos_token_id=eod_id)
    return config


def export_hf(ckpt: str, out: str, dtype: str = "fp32", max_shard_mb: float = 2000.0) -> str:
    """Write the checkpoint at ``ckpt`` (any tp x pp layout) as an HF model directory ``out``:
    config.json, generation_config.json, model-0000k-of-0000n.safetensors + index, tokenizer.
    Written into ``out.tmp`` and renamed, so ``out`` is complete or absent."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype}: expected one of {', '.join(DTYPES)}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"{out} exists and is not empty: pass a new output directory")
    args, state, tokenizer_file = load_full_model_state(ckpt)
    torch_dtype = DTYPES[dtype]
    plan = shard_plan(args, {n: state.shape(n) for n in state},
                      torch.empty((), dtype=torch_dtype).element_size(),
                      int(max_shard_mb * 2**20))
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_hf_dir(tmp, args, state, tokenizer_file, dtype, plan)
    except BaseException:  # a full disk, an interrupt: no half-written directory stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
    return out


def _write_hf_dir(tmp: str, args: ModelArgs, state: FullState, tokenizer_file: Optional[str],
                  dtype: str, plan: List[List[Tuple[str, int]]]) -> None:
    from safetensors.torch import save_file

    kept_dir = os.path.dirname(tokenizer_file) if tokenizer_file else None
    eod = write_hf_tokenizer(tokenizer_file, tmp, args.max_seq_len, kept_dir)
    sources = hf_sources(args, with_tied_head=False)
    weight_map: Dict[str, str] = {}
    for k, shard in enumerate(plan, 1):
        file = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: sources[name](state.__getitem__).to(DTYPES[dtype]).contiguous()
                   for name, _ in shard}
        try:
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
        except Exception as e:  # noqa: BLE001 - safetensors' error for a full disk is its own
            raise OSError(f"{os.path.join(tmp, file)}: cannot write ({e})") from None
        del tensors  # the next shard starts from nothing
        weight_map.update({name: file for name, _ in shard})
    total = sum(size for shard in plan for _, size in shard)
    _write_json(os.path.join(tmp, INDEX), {"metadata": {"total_size": total},
                                           "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), hf_config_dict(args, dtype, eod))
    generation = {"bos_token_id": eod, "eos_token_id": eod}
    kept = os.path.join(kept_dir, "generation_config.json") if kept_dir else None
    if kept and os.path.isfile(kept):
        with open(kept) as f:
            generation = dict(json.load(f), **{k: v for k, v in generation.items()
                                               if v is not None})
    _write_json(os.path.join(tmp, "generation_config.json"), generation)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def read_hf_dir(hf_dir: str) -> Tuple[ModelArgs, FullState, Dict[str, str]]:
    """(model args, full megalite tensors by name read lazily from the safetensors, the HF
    tokenizer files present: name -> path) of an HF model directory."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointReadError(f"{hf_dir}: no config.json; expected a Hugging Face model "
                                  "directory (config.json + *.safetensors)")
    try:
        config = _transformers().AutoConfig.from_pretrained(hf_dir, local_files_only=True,
                                                            trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointReadError(f"{hf_dir}/config.json: {str(e).splitlines()[0]}") from None
    args = args_from_hf_config(config)
    get, get_meta = _safetensors_reader(hf_dir)
    sources = megalite_sources(args)
    shapes = full_shapes(args)

    def merge(name: str, meta: bool = False) -> torch.Tensor:
        value = sources[name](get_meta if meta else get).float()
        if tuple(value.shape) != shapes[name]:
            raise CheckpointReadError(f"{hf_dir}: {name} built from the safetensors has shape "
                                      f"{tuple(value.shape)}; config.json implies "
                                      f"{shapes[name]}")
        return value

    state = FullState(shapes, merge)
    state.check()
    return args, state, kept_hf_files(hf_dir)


def _safetensors_reader(hf_dir: str):
    """(name -> tensor, name -> a meta tensor of its shape) from model.safetensors or the
    files an index names, opened lazily; the second reads headers only."""
    from safetensors import safe_open

    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        weight_map = None
    else:
        found = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth"))]
        raise CheckpointReadError(
            f"{hf_dir}: no model.safetensors or {INDEX}"
            + (f" ({found[0]} is a pickle, which megalite never loads: it can run code; "
               "re-save it with save_pretrained(safe_serialization=True))" if found else ""))
    handles: Dict[str, Any] = {}

    def read(name: str, shape_only: bool) -> torch.Tensor:
        file = "model.safetensors" if weight_map is None else weight_map.get(name)
        if file is None:
            raise CheckpointReadError(f"{index}: no tensor {name}")
        try:
            if file not in handles:
                handles[file] = safe_open(os.path.join(hf_dir, file), framework="pt")
            if shape_only:
                return torch.empty(handles[file].get_slice(name).get_shape(), device="meta")
            return handles[file].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors' own error types
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointReadError(f"{hf_dir}/{file}: cannot read {name} ({why})") from None

    return (lambda name: read(name, False)), (lambda name: read(name, True))
