"""Load a trainer checkpoint for generation and evaluation in one process."""
from __future__ import annotations

import os
from typing import Tuple

import torch

from megalite.models import CausalLM, ModelArgs, build_model
from megalite.trainer import checkpoint


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, a checkpoints directory (its latest) or a run directory."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(candidate, "meta.json")):
            return candidate
        found = checkpoint.latest(candidate) if os.path.isdir(candidate) else None
        if found:
            return found
    raise FileNotFoundError(f"no checkpoint at {path!r} (looked for meta.json or a 'latest' "
                            f"pointer there and in {path}/checkpoints)")


def load_for_inference(path: str, device: str = "cpu") -> Tuple[CausalLM, object]:
    from megalite.data import load_tokenizer

    path = resolve_checkpoint(path)
    meta = checkpoint.read_meta(path)
    if meta["layout"]["tp"] != 1 or meta["layout"]["pp"] != 1:
        raise FileNotFoundError(f"{path} is sharded (tp/pp > 1): merging shards is not supported "
                                f"yet")
    args = ModelArgs(**meta["model_args"])
    model = build_model(args, seed=0, device=device)
    shard = torch.load(os.path.join(path, "model_tp00_pp00.pt"), map_location=device,
                       weights_only=False)
    load_params(model, shard["model"])
    return model.eval(), load_tokenizer(os.path.join(path, "tokenizer.json"))


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
