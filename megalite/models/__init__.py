"""Model construction: resolve the config, build on the meta device, draw weights from the seed."""
from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from megalite.config.schema import DataConfig, ModelConfig
from megalite.models.transformer import (TIED_WEIGHTS, CausalLM, KVCache, ModelArgs,
                                         flops_per_token, init_tensor, lm_loss, num_params,
                                         parse_rope_scaling)
from megalite.parallel.params import ParamTable

__all__ = ["CausalLM", "KVCache", "ModelArgs", "build_model", "resolve_model_args", "lm_loss",
           "num_params", "flops_per_token", "init_weights", "SAME_MODEL_FIELDS",
           "same_model_fields", "model_differences", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""A dtype by the short name train.precision and ``convert --dtype`` use (torch's own name,
as ``serve --dtype`` takes it, is ``str(dtype)[6:]``)."""

# Fields that change the weights' shapes or meaning: resume and checkpoint.init_from refuse a
# source that differs in one (GPT-2's max_seq_len too: its position table). Kernels, dropout,
# init_std and the packed-document flags are the run's own choice.
SAME_MODEL_FIELDS = ("family", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                     "ffn_hidden_size", "vocab_size", "tie_embeddings", "norm_eps", "rope_theta",
                     "rope_scaling")
_OLDER = {"num_labels": 0, "rope_scaling": None}  # what sources written before them hold


def same_model_fields(family: str, num_labels: int = 0) -> Tuple[str, ...]:
    """The fields a source must share with a model of ``family`` (``SAME_MODEL_FIELDS``; a
    learned position table's ``max_seq_len`` too, all but llama's); a classifier has no decoder
    to tie, whatever its source had."""
    names = SAME_MODEL_FIELDS + (() if family == "llama" else ("max_seq_len",))
    return tuple(n for n in names if not (num_labels and n == "tie_embeddings"))


def model_differences(source: Mapping[str, Any], here: Mapping[str, Any],
                      extra: Tuple[str, ...] = ()) -> List[Tuple[str, Any, Any]]:
    """(field, source's, ours) for each of ``same_model_fields`` (and ``extra``) that differs;
    ``source`` and ``here`` are ``asdict(ModelArgs)`` (a field missing in an older source's
    record counts as its value before the field existed)."""
    names = same_model_fields(here["family"], here.get("num_labels", 0)) + extra
    theirs = {n: source.get(n, _OLDER.get(n)) for n in names}
    return [(n, theirs[n], here.get(n)) for n in names if theirs[n] != here.get(n)]


def resolve_model_args(cfg: ModelConfig, vocab_size: Optional[int] = None,
                       data: Optional[DataConfig] = None,
                       eod_id: Optional[int] = None) -> ModelArgs:
    """Fill the family defaults (kv heads, FFN width, tying) and the vocabulary size; with
    ``data`` and the tokenizer's ``eod_id``, the packed-document flags (``models.documents``)."""
    llama = cfg.family == "llama"
    ffn = cfg.ffn_hidden_size
    if ffn is None:
        if llama:  # LLaMA: 2/3 of 4h, rounded up to a multiple of 256
            ffn = 256 * ((int(2 * 4 * cfg.hidden_size / 3) + 255) // 256)
        else:
            ffn = 4 * cfg.hidden_size
    vocab = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
    if vocab is None:
        raise ValueError("model.vocab_size is unknown: set it or give data with a tokenizer")
    flags = {k: bool(data and getattr(data, k))
             for k in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss")}
    return ModelArgs(
        family=cfg.family, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads or cfg.num_heads,
        ffn_hidden_size=ffn, vocab_size=vocab, max_seq_len=cfg.max_seq_len, norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, dropout=cfg.dropout,
        # a classifier has no decoder to tie
        tie_embeddings=False if cfg.num_labels else
        (not llama) if cfg.tie_embeddings is None else cfg.tie_embeddings,
        init_std=cfg.init_std, kernels=cfg.kernels,
        eod_id=eod_id if any(flags.values()) else None,  # only the document flags read it
        **flags,
        rope_scaling=parse_rope_scaling(cfg.rope_scaling) if llama else None,
        num_labels=cfg.num_labels)


@torch.no_grad()
def init_weights(model: CausalLM, seed: int) -> None:
    """Give every parameter of an unsharded model its seeded initial value (``init_tensor``)."""
    for name, p in model.named_parameters():
        p.copy_(init_tensor(name, p.shape, model.args, seed))


ValueFn = Callable[[str, torch.Size], torch.Tensor]
Plan = Callable[[CausalLM], Tuple[nn.Module, ParamTable]]
Materialize = Callable[[nn.Module, ValueFn], None]


def build_model(args: ModelArgs, seed: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, plan: Optional[Plan] = None,
                values: Optional[ValueFn] = None,
                materialize: Optional[Materialize] = None) -> nn.Module:
    """Build on the meta device (no memory), let ``plan`` swap in parallel modules and cut this
    rank's pipeline stage, allocate on ``device`` and fill every parameter with this rank's slice
    of its full value — so a rank never holds more than its own part.

    ``values(name, full_shape)`` gives a parameter's full single-process value (default: the
    seeded initialisation), so a sharded model holds exactly the slices of the unsharded one.
    """
    with torch.device("meta"):
        model = CausalLM(args)
        full_shapes = {n: p.shape for n, p in model.named_parameters()}
        model, layout = plan(model) if plan is not None else (model, ParamTable())
    values = values or (lambda name, shape: init_tensor(name, shape, args, seed))
    for name, _ in model.named_parameters():
        if name not in full_shapes:  # a last pipeline stage's copy of the tied embedding
            layout.tied_copy.add(name)
        layout.global_shape[name] = tuple(full_shapes[_full_name(name, full_shapes)])

    def fill(name: str, local_shape: torch.Size) -> torch.Tensor:
        full = _full_name(name, full_shapes)  # the tied copy starts as the embedding
        return layout.local(name, values(full, full_shapes[full]), local_shape)

    if materialize is not None:
        materialize(model, fill)
    else:
        model.to_empty(device=device)
        embed, head = getattr(model, "embed", None), getattr(model, "head", None)
        if args.tie_embeddings and embed is not None and head is not None:
            head.output.weight = embed.tok.weight  # to_empty re-creates parameters: re-tie
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(fill(name, p.shape))
        model = model.to(dtype)
    model.shard_layout = layout  # the per-parameter record (ParamTable) everyone reads
    return model


def _full_name(name: str, full_shapes) -> str:
    return name if name in full_shapes else TIED_WEIGHTS[0]
