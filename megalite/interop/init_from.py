"""``checkpoint.init_from``: a new run's initial weights from an HF directory (``hf:DIR``) or a
megalite checkpoint, in any layout. ``build_model`` asks for each parameter's full value and
keeps this rank's slice, so a rank holds one full tensor at a time beyond its own part; the
optimizer starts fresh."""
from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from megalite import models
from megalite.interop.full_state import FullState, load_full_model_state
from megalite.models import ModelArgs
from megalite.models.transformer import init_tensor



class InitFromError(ValueError):
    """The init_from source cannot start this run (one line, naming fields and the fix)."""


def read_source(spec: str) -> Tuple[ModelArgs, FullState, Optional[str]]:
    """(model args, full tensors read lazily, tokenizer.json path or None) of the source named
    by ``checkpoint.init_from`` (or ``megalite finetune --init_from``): ``hf:DIR`` or a megalite
    checkpoint."""
    if spec.startswith("hf:"):
        from megalite.interop.hf_files import read_hf_dir

        args, state, files = read_hf_dir(spec[3:])
        return args, state, files.get("tokenizer.json")
    return load_full_model_state(spec)


def model_differences(source: ModelArgs, here: ModelArgs) -> str:
    """``model.f=ours (source: theirs)`` for every differing field, '' when the same model."""
    return ", ".join(f"model.{n}={ours} (source: {theirs})"
                     for n, theirs, ours in models.model_differences(asdict(source), asdict(here)))


def source_tokenizer(spec: str) -> Optional[Dict[str, Any]]:
    """The tokenizer fingerprint a megalite checkpoint's meta.json records (None for an HF
    directory — its vocabulary size is compared as a model field — or an older checkpoint)."""
    if spec.startswith("hf:"):
        return None
    from megalite.checkpoint.files import read_meta
    from megalite.trainer.inference import resolve_checkpoint

    return read_meta(resolve_checkpoint(spec)).get("tokenizer")


def initial_values(spec: str, args: ModelArgs, tokenizer: Optional[Dict[str, Any]] = None,
                   seed: int = 0, verbose: bool = True
                   ) -> Callable[[str, torch.Size], torch.Tensor]:
    """``build_model``'s ``values``: parameter name -> its full fp32 value from ``spec``.
    ``tokenizer``: this run's fingerprint (``checkpoint.files.tokenizer_fingerprint``), refused
    when a megalite checkpoint source was trained with another. A classifier's pooler and
    classifier missing there are drawn from ``seed`` (and said so on stderr when ``verbose``:
    the caller's rank 0)."""
    from megalite.checkpoint.files import tokenizer_differences

    try:
        source, state, _ = read_source(spec)
        saved = source_tokenizer(spec) if tokenizer is not None else None
    except ValueError as e:
        raise InitFromError(f"checkpoint.init_from={spec}: {e}") from None
    differ = tokenizer_differences(saved, tokenizer or {})
    if differ:
        raise InitFromError(f"checkpoint.init_from={spec}: trained with another tokenizer: "
                            f"{differ}; set data.tokenizer to the source's tokenizer.json (the "
                            "data prepared with it), or drop checkpoint.init_from")
    differ = model_differences(source, args)
    if differ:
        fix = ("; set the model section to the source's values"
               + (" and data.tokenizer to the source's tokenizer.json" if "vocab_size" in differ
                  else "") + ", or drop checkpoint.init_from")
        raise InitFromError(f"checkpoint.init_from={spec}: another model: {differ}{fix}")

    have = set(state)
    fresh = sorted(n for n in _head_names(args) if n not in have)
    if fresh and verbose:  # an MLM source has no classifier
        print(f"checkpoint.init_from={spec}: {', '.join(fresh)} not in the source: "
              "seed-initialised", file=sys.stderr, flush=True)

    def value(name: str, shape: torch.Size) -> torch.Tensor:
        if name in fresh:
            return init_tensor(name, shape, args, seed)
        return state[name]

    return value


def _head_names(args: ModelArgs) -> Tuple[str, ...]:
    """A classifier's own parameters (the only ones a source may lack)."""
    if not args.num_labels:
        return ()
    return tuple(f"head.{m}.{p}" for m in ("pooler", "classifier") for p in ("weight", "bias"))
