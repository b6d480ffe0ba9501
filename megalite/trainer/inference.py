"""Load a trainer checkpoint for generation and evaluation in one process."""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

from megalite.models import CausalLM, ModelArgs, build_model
from megalite.trainer import checkpoint


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def resolve_checkpoint(path: str, warn=_stderr) -> str:
    """A checkpoint directory, a checkpoints directory (its latest) or a run directory."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(candidate, "meta.json")):
            return candidate
        found = checkpoint.latest(candidate, warn) if os.path.isdir(candidate) else None
        if found:
            return found
    raise FileNotFoundError(f"no checkpoint at {path!r} (looked for meta.json or a 'latest' "
                            f"pointer there and in {path}/checkpoints)")


def load_for_inference(path: str, device: str = "cpu", meta: Optional[dict] = None
                       ) -> Tuple[CausalLM, object]:
    """The whole model in one process, whatever layout trained it (shards are merged);
    ``meta``: the checkpoint's meta.json when the caller has read it already."""
    from megalite.data import load_tokenizer

    path = resolve_checkpoint(path)
    meta = checkpoint.read_meta(path) if meta is None else meta
    args = ModelArgs(**meta["model_args"])
    model = build_model(args, seed=0, device=device)
    if checkpoint.is_sharded(meta):
        load_whole(path, meta, model)
    else:
        load_params(model, merge_shards(path, meta, dict(model.named_parameters())))
    return model.eval(), load_tokenizer(os.path.join(path, "tokenizer.json"))


@torch.no_grad()
def load_whole(path: str, meta: dict, model: CausalLM) -> None:
    """Every parameter whole, from the fp32 masters of a checkpoint of any layout."""
    from megalite.zero.state import ShardEntry

    entries = {}
    for name, p in model.named_parameters():
        full = p.data if p.dtype == torch.float32 else torch.empty(p.shape)
        entries[f"master/{name}"] = ShardEntry(tuple(p.shape), [((0,) * p.dim(), tuple(p.shape))],
                                               [full])
    checkpoint.load_sharded(path, meta, entries)
    for name, p in model.named_parameters():
        p.copy_(entries[f"master/{name}"].tensors[0])


def merge_shards(path: str, meta: dict, params: dict) -> Dict[str, torch.Tensor]:
    """Full tensors from the tp x pp shard files: TP slices concatenated along their split dim
    (vocabulary padding cut off), pipeline stages' disjoint names united."""
    tp, pp = meta["layout"]["tp"], meta["layout"]["pp"]
    shard_dims = meta.get("tp_shard_dims", {})
    pieces: Dict[str, List[torch.Tensor]] = {}
    for p in range(pp):
        for t in range(tp):
            shard = checkpoint.load_file(path, f"model_tp{t:02d}_pp{p:02d}.pt", meta)["model"]
            for name, value in shard.items():
                if len(pieces.setdefault(name, [])) < tp:  # a tied copy repeats the embedding
                    pieces[name].append(value)
    full = {}
    for name, parts in pieces.items():
        dim = shard_dims.get(name)
        value = parts[0] if dim is None else torch.cat(parts, dim)
        if name in params and dim is not None:
            value = value.narrow(dim, 0, params[name].shape[dim])
        full[name] = value
    return full


@torch.no_grad()
def load_params(model: CausalLM, values: dict) -> None:
    for name, p in model.named_parameters():
        p.copy_(values[name])


def sample_text(model: CausalLM, tokenizer, prompt: str, max_new_tokens: int,
                temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                seed: int = 0) -> str:
    from megalite.generate import generate

    ids = tokenizer.encode(prompt)
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, eod_id=tokenizer.eod_id)
    return tokenizer.decode(out[0].tolist())
