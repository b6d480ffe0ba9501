"""Activation memory per transformer layer: measured, and re-derived from the blocks.

**Measured** (``SavedActivationCounter``): during one micro-batch's forward, every tensor autograd
saves for the backward passes through a ``saved_tensors_hooks`` pack hook; the counter keeps the
unique storages among them, excluding parameters and the forward's inputs (storage alive before
the forward), and charges each to the layer unit running when it was first saved. A storage saved
by several ops (the norm output read by q, k and v) counts once; a layer's input counts in the
layer that saves it (the previous layer made it). Under ``full`` recomputation autograd saves only
the checkpoint's inputs; ``selective`` drops core attention's saved tensors.

**Re-derived** (``layer_activation_terms``): the paper's terms (Korthikanti et al. 2022, §4) for
megalite's blocks, the run's element size ``e`` and tensor parallelism ``t``, s = sequence, b =
micro-batch, h = hidden, a = heads, f = FFN width, kv = key/value width. Each term is a storage
the layer keeps; with sequence parallelism the norm and dropout terms are sequence chunks (÷t),
but megalite keeps the gathered input of a column-parallel region (not re-gathered in backward),
so those stay whole. Dropout masks are 1 byte per element (only with dropout > 0). Core-attention
s² terms exist only where the attention path stores probabilities (SDPA's math path: CPU with
dropout or a mask, and the fused masked softmax; not flash/efficient kernels). Small per-row
statistics (norm mean/rstd, log-sum-exp) are left out: the stated constant per family covers them.
The issue-16 planner reads the same function; tests/test_recompute.py holds it to the counter.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


class SavedActivationCounter:
    """Context manager: unique saved storages of one forward, in bytes per layer unit.

    ``units``: (label, module) pairs; the label of the unit whose forward is running is the one
    charged. ``exclude``: tensors whose storage existed before the forward (inputs)."""

    def __init__(self, units: Sequence[Tuple[str, nn.Module]], params: Iterable[torch.Tensor],
                 exclude: Iterable[torch.Tensor] = ()):
        self.units = list(units)
        self.skip = {_key(t) for t in params} | {_key(t) for t in exclude}
        self.bytes: Dict[str, int] = {label: 0 for label, _ in self.units}
        self._seen: set = set()
        self._current: Optional[str] = None
        self._handles: List = []
        self._hooks = None

    def exclude(self, *tensors: torch.Tensor) -> None:
        self.skip.update(_key(t) for t in tensors if t is not None)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        if self._current is not None and key not in self.skip and key not in self._seen:
            self._seen.add(key)
            self.bytes[self._current] += t.untyped_storage().nbytes()
        return t

    def _enter_unit(self, label: str, unit: nn.Module) -> None:
        # parameters as they are now: ZeRO-3 gathered them in its own (earlier) pre-hook
        self.skip.update(_key(p) for p in unit.parameters())
        self._current = label

    def __enter__(self) -> "SavedActivationCounter":
        self._current = None
        for label, unit in self.units:
            self._handles.append(unit.register_forward_pre_hook(
                lambda m, a, label=label: self._enter_unit(label, m)))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._current = None


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def units_of(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(label, unit) of a ``CausalLM`` or ``PipelineStage``: embed, layers.i, head."""
    out = [("embed", model.embed)] if getattr(model, "embed", None) is not None else []
    layers = model.layers
    items = layers.items() if isinstance(layers, nn.ModuleDict) else enumerate(layers)
    out += [(f"layers.{i}", block) for i, block in items]
    if getattr(model, "head", None) is not None:
        out.append(("head", model.head))
    return out


def attention_path(args, cpu: bool, kernels_run: bool) -> Dict[str, object]:
    """``layer_activation_terms``' keywords for the path the model's attention takes
    (``Attention.core``): the fused masked softmax (packed documents, bert's padding mask,
    where the kernels run) keeps its probabilities, and so does CPU SDPA's math path, which
    dropout selects (in fp32); CPU dropout keeps a mask of the dropped tensor's dtype, CUDA's
    one byte. ``kernels_run``: ``model.kernels=fused`` runs the compiled kernels there."""
    fused = args.kernels == "fused" and kernels_run
    fused_softmax = fused and (args.reset_attention_mask or args.is_encoder)
    math = cpu and args.dropout > 0 and not fused_softmax
    return {"attention_stores_probs": fused_softmax or math,
            "dropout_mask_bytes": None if cpu else 1,
            "attention_dtype_bytes": 4 if math else None, "fused_norms": fused}


def layer_activation_terms(args, micro_batch: int, seq_len: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none",
                           dtype_bytes: int = 2, attention_stores_probs: Optional[bool] = None,
                           dropout_mask_bytes: Optional[int] = 1,
                           attention_dtype_bytes: Optional[int] = None,
                           fused_norms: bool = True) -> Dict[str, int]:
    """Bytes one transformer layer keeps from its forward to its backward, as named terms
    (``args``: ``ModelArgs``; norms as megalite's fused kernels save them; bert's post-norm
    blocks keep the same bytes under ``POST_NORM_NAMES``).

    ``attention_stores_probs`` None: stored when dropout > 0 (CPU's SDPA then takes its math
    path); pass True for the fused masked softmax (packed documents) and False for flash or
    memory-efficient kernels. ``dropout_mask_bytes``: 1 where dropout keeps a byte mask (CUDA's
    fused dropout); None where it keeps a mask of the dropped tensor's dtype (PyTorch's CPU
    dropout). ``attention_dtype_bytes``: element size of what a probability-storing core
    attention keeps (None: ``dtype_bytes``; CPU's SDPA math path computes 16-bit inputs in fp32:
    4). ``fused_norms`` False: LLaMA's RMSNorm as PyTorch ops (``kernels=torch``, or CUDA before
    the GPU check enables the kernels), which keep an fp32 copy of the input and the normalised
    tensor in the dtype instead of the input (GPT's LayerNorm keeps the same either way)."""
    s, b, h, e, t = seq_len, micro_batch, args.hidden_size, dtype_bytes, tp
    d, f = args.head_dim, args.ffn_hidden_size
    sb, sbh = s * b, s * b * h
    chunk = t if sequence_parallel else 1  # norm / residual-dropout tensors: sequence chunks
    drop = args.dropout > 0
    mask = e if dropout_mask_bytes is None else dropout_mask_bytes
    ea = attention_dtype_bytes or e  # core attention's saved tensors (math path)
    attn_mask = ea if dropout_mask_bytes is None else dropout_mask_bytes
    probs = drop if attention_stores_probs is None else attention_stores_probs
    if recompute == "full":
        return {"block input (checkpoint)": e * sbh // chunk}
    hl, al = h // t, args.num_heads // t
    kvl = args.num_kv_heads * d // t if args.num_kv_heads % t == 0 else d  # replicated: 1 head
    torch_rms = args.is_llama and not fused_norms
    norm_input = {"input fp32 copy": 4 * sbh // chunk, "normalised (dtype)": e * sbh // chunk} \
        if torch_rms else {"input": e * sbh // chunk}
    terms: Dict[str, int] = {f"attn_norm {k}": v for k, v in norm_input.items()}
    terms["norm statistics (2 norms x " + ("rstd" if torch_rms else "mean, rstd") + "; fp32)"] = \
        (8 if torch_rms else 16) * sb // chunk
    terms["attn_norm output (q,k,v input)"] = e * sbh
    if args.is_llama:
        terms["RoPE cos, sin"] = 2 * e * s * d
    if recompute == "selective":
        terms["core attention inputs q, k, v (checkpoint)"] = e * sb * (hl + 2 * kvl)
        terms["o_proj input"] = e * sb * hl
    else:
        kv_used = hl if args.num_kv_heads != args.num_heads else kvl  # GQA: k, v expanded
        if probs:
            terms["q, k (QKᵀ inputs)"] = ea * sb * (hl + kv_used)
            terms["v (·V input)"] = ea * sb * kv_used
            terms["softmax output"] = ea * al * s * s * b
            if drop:
                terms["attention dropout mask"] = attn_mask * al * s * s * b
                terms["dropped probabilities (·V input)"] = ea * al * s * s * b
            terms["o_proj input"] = e * sb * hl
        else:  # flash: q, k, v, log-sum-exp, and the output, which o_proj reads as is
            terms["q, k, v (flash inputs)"] = e * sb * (hl + 2 * kv_used)
            terms["log-sum-exp (fp32)"] = 4 * al * sb
            terms["attention output = o_proj input"] = e * sb * hl
    if drop:
        terms["attention residual dropout mask"] = mask * sbh // chunk
    terms.update({f"mlp_norm {k}": v for k, v in norm_input.items()})
    terms["mlp_norm output (mlp input)"] = e * sbh
    fl = f // t
    if args.is_llama:
        terms["gate, up outputs (SiLU, product inputs)"] = 2 * e * sb * fl
        terms["silu(gate) (product input)"] = e * sb * fl
        terms["down_proj input"] = e * sb * fl
    else:
        terms["fc_in output (GELU input)"] = e * sb * fl
        terms["GELU output (fc_out input)"] = e * sb * fl
    if drop:
        terms["mlp residual dropout mask"] = mask * sbh // chunk
    if args.is_encoder:  # post-norm (bert): the same storages, kept by other ops
        terms = {POST_NORM_NAMES.get(k, k): v for k, v in terms.items()}
    return terms


# bert's post-norm block norm(x + attn(x)), norm(x + mlp(x)): q, k, v read the block input, each
# norm keeps its residual sum, the MLP reads attn_norm's output; mlp_norm's output is the next
# unit's input (kept there, as a pre-norm block's output is)
POST_NORM_NAMES = {
    "attn_norm input": "attn_norm input (x + attention output)",
    "attn_norm output (q,k,v input)": "block input (q,k,v input)",
    "mlp_norm input": "mlp_norm input (x + MLP output)",
    "mlp_norm output (mlp input)": "attn_norm output (mlp input)",
}


def layer_activation_bytes(*args, **kwargs) -> int:
    """Sum of ``layer_activation_terms``."""
    return sum(layer_activation_terms(*args, **kwargs).values())
