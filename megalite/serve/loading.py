"""One decoder model, its tokenizer and chat template, from a megalite checkpoint of any layout
(a checkpoint, checkpoints or run directory) or a Hugging Face directory (``hf:DIR``). Reads
only: nothing is written into a run directory. Weights are read with ``weights_only`` torch
loads or safetensors, templates are rendered in Jinja's sandbox: loading never runs code."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from megalite import models
from megalite.models import CausalLM

DTYPES = {str(d).split(".")[-1]: d for d in models.DTYPES.values()}  # torch's names: float32


class LoadError(ValueError):
    """The checkpoint cannot be served (one line: what, where, the fix)."""


@dataclass
class Loaded:
    model: CausalLM
    tokenizer: Any  # megalite.data.Tokenizer
    name: str  # the model id clients send
    chat_template: Optional[str]
    special_tokens: Dict[str, str]  # bos_token / eos_token for the chat template


def load_decoder(spec: str, device: str = "cpu", dtype: str = "float32") -> Loaded:
    """The model named by ``spec`` in eval mode on ``device`` in ``dtype``; ``LoadError`` for a
    missing or damaged checkpoint, an encoder, or a tokenizer that cannot be read."""
    from megalite.data import DataError
    from megalite.interop.full_state import CheckpointReadError
    from megalite.trainer.checkpoint import CheckpointError

    if dtype not in DTYPES:
        raise LoadError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    try:
        if spec.startswith("hf:"):
            return _load_hf(spec, device, DTYPES[dtype])
        return _load_megalite(spec, device, DTYPES[dtype])
    except (FileNotFoundError, CheckpointError, CheckpointReadError, DataError) as e:
        raise LoadError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def _load_megalite(spec: str, device: str, dtype: torch.dtype) -> Loaded:
    from megalite.generate import decoder_problem
    from megalite.interop.full_state import model_args_from
    from megalite.trainer import checkpoint
    from megalite.trainer.inference import load_for_inference, resolve_checkpoint

    path = resolve_checkpoint(spec)
    meta = checkpoint.read_meta(path)
    args = model_args_from(meta, os.path.join(path, "meta.json"))
    problem = decoder_problem(args, spec)
    if problem:
        raise LoadError(problem)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise LoadError(f"{path}: no tokenizer.json; this checkpoint cannot turn text into ids")
    model, tokenizer = load_for_inference(path, device, meta)
    template, special = _tokenizer_config(os.path.join(path, "tokenizer_config.json"))
    return Loaded(model.to(dtype).eval(), tokenizer, _name(spec), template, special)


def _load_hf(spec: str, device: str, dtype: torch.dtype) -> Loaded:
    from megalite.data import load_tokenizer
    from megalite.generate import decoder_problem
    from megalite.interop.hf_files import read_hf_dir
    from megalite.models import build_model

    hf_dir = spec[3:]
    try:
        args, state, files = read_hf_dir(hf_dir)
    except ValueError as e:  # an unsupported model_type (an encoder) among them
        raise LoadError(f"{spec}: {str(e).splitlines()[0]}") from None
    problem = decoder_problem(args, spec)
    if problem:
        raise LoadError(problem)
    if "tokenizer.json" not in files:
        raise LoadError(f"{hf_dir}: no tokenizer.json; serving needs the fast tokenizer file")
    model = build_model(args, seed=0, device=device, dtype=dtype,
                        values=lambda name, shape: state[name])
    template, special = _tokenizer_config(files.get("tokenizer_config.json"))
    return Loaded(model.eval(), load_tokenizer(files["tokenizer.json"]), _name(hf_dir), template,
                  special)


def _name(path: str) -> str:
    """The model id: the directory's name (``runs/demo`` -> ``demo``)."""
    return os.path.basename(os.path.normpath(path)) or "megalite"


def _tokenizer_config(path: Optional[str]):
    """(chat template or None, {bos_token, eos_token}) from an HF tokenizer_config.json."""
    if not path or not os.path.isfile(path):
        return None, {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: not readable JSON ({e}); fix or remove the file") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    special = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if isinstance(value, dict):  # an AddedToken record
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    return (template if isinstance(template, str) else None), special
