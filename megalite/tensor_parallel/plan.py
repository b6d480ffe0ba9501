"""``parallelize``: turn a plain GPT-2 / LLaMA ``CausalLM`` (on the meta device) into this rank's
tensor-parallel shard by module replacement (Megatron-LM, Shoeybi et al. 2019), optionally with
sequence parallelism (Korthikanti et al. 2022).

Per block the plan is the same for both families:

    attn_norm ─▶ [enter] ─▶ q,k,v_proj: column ─▶ attention on local heads ─▶ o_proj: row ─▶ [exit]
    mlp_norm  ─▶ [enter] ─▶ fc_in | gate,up: column ─▶ act ─▶ fc_out | down: row ─▶ [exit]

[enter] is ONE collective per region, applied to the norm's output by a forward hook, so q/k/v
(or gate/up) share it: ``copy_to_tp`` (f: identity forward, all-reduce backward) or, with
sequence parallelism, ``gather_seq`` (all-gather forward, reduce-scatter backward). [exit] is
the row-parallel layer's reduction: all-reduce, or reduce-scatter along the sequence with SP.
So a layer does two all-reduces forward and two backward (without SP), or the same volume as
all-gathers + reduce-scatters (with SP). The embedding is vocab-parallel; the head is a
column-parallel projection over the padded vocabulary whose logits stay sharded for the
vocab-parallel cross-entropy.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.models.transformer import Attention, CausalLM, ModelArgs, lm_loss
from megalite.parallel.comm import CommMeter
from megalite.parallel.dims import ParallelDims
from megalite.tensor_parallel.collectives import (copy_to_tp, gather_from_tp, gather_seq,
                                                  reduce_from_tp, reduce_scatter_seq)
from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                             VocabParallelEmbedding, pad_vocab)
from megalite.tensor_parallel.layout import ShardLayout


class ColumnInRegion(ColumnParallelLinear):
    """A column-parallel linear whose input already went through the region's entry collective
    (shared by q/k/v or gate/up), so it adds none of its own: Y_i = X A_i + b_i."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ParallelEmbedding(nn.Module):
    """The embedding unit under TP (same child names as ``models.transformer.Embedding``):
    vocab-parallel token rows give a partial sum, learned positions are added on TP rank 0
    only, then the partial sums are reduced — all-reduce, or reduce-scatter along the sequence
    with SP (the output is then this rank's sequence chunk)."""

    def __init__(self, tok: VocabParallelEmbedding, pos: Optional[nn.Embedding], drop: nn.Module,
                 group, meter: Optional[CommMeter], tp_rank: int, sequence_parallel: bool):
        super().__init__()
        self.tok, self.pos, self.drop = tok, pos, drop
        self.group, self.meter, self.tp_rank = group, meter, tp_rank
        self.sequence_parallel = sequence_parallel

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.tok(tokens)  # [b, s, h], partial over TP ranks
        if self.pos is not None:
            p = self.pos(torch.arange(start, start + tokens.shape[1], device=tokens.device))
            x = x + (p if self.tp_rank == 0 else p * 0.0)  # counted once; graph on every rank
        if self.sequence_parallel:
            x = reduce_scatter_seq(x, self.group, self.meter)  # [b, s/tp, h]
        else:
            x = reduce_from_tp(x, self.group, self.meter)
        return self.drop(x)


def _enter_region(norm: nn.Module, group, meter) -> None:
    """The TP region's entry collective, on the norm's output (see the module docstring)."""

    def hook(module, inputs, output):
        if getattr(module, "sequence_parallel", False):
            return gather_seq(output, group, meter)
        return copy_to_tp(output, group, meter)

    norm.sequence_parallel = False
    norm.register_forward_hook(hook)


def check_divisible(args: ModelArgs, tp: int) -> None:
    """The shapes tensor parallelism splits must divide (the config validator says the same
    earlier; this guards direct API use)."""
    problems = []
    if args.num_heads % tp:
        problems.append(f"num_heads={args.num_heads} is not divisible by tp={tp}")
    if args.num_kv_heads % tp and tp % args.num_kv_heads:
        problems.append(f"num_kv_heads={args.num_kv_heads} neither divides nor is divisible by "
                        f"tp={tp}")
    if args.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size={args.ffn_hidden_size} is not divisible by tp={tp}")
    if problems:
        raise ValueError("tensor parallelism: " + "; ".join(problems))


def parallelize(model: CausalLM, dims: ParallelDims, sequence_parallel: bool = False,
                vocab_multiple: int = 64) -> ShardLayout:
    """Replace ``model``'s modules with this TP rank's parallel twins (in place, on whatever
    device the model is — normally meta) and return which parameters are split or partial."""
    args, tp = model.args, dims.tp
    layout = ShardLayout(tp_rank=dims.tp_rank, tp_size=tp)
    if tp == 1:
        return layout
    check_divisible(args, tp)
    group, meter, sp = dims.tp_group, dims.meter, sequence_parallel
    h, vocab = args.hidden_size, pad_vocab(args.vocab_size, tp, vocab_multiple)

    def column(linear: nn.Linear, name: str) -> ColumnInRegion:
        layout.shard_dim[f"{name}.weight"] = 0
        if linear.bias is not None:
            layout.shard_dim[f"{name}.bias"] = 0
        return ColumnInRegion(linear.in_features, linear.out_features, linear.bias is not None,
                              group, meter)

    def row(linear: nn.Linear, name: str) -> RowParallelLinear:
        layout.shard_dim[f"{name}.weight"] = 1
        if linear.bias is not None and sp:
            layout.partial_grad.add(f"{name}.bias")  # added to this rank's sequence chunk only
        return RowParallelLinear(linear.in_features, linear.out_features,
                                 linear.bias is not None, group, meter, sequence_parallel=sp)

    def split_norm(norm: nn.Module, name: str) -> None:
        _enter_region(norm, group, meter)
        norm.sequence_parallel = sp
        if sp:  # the norm sees this rank's sequence chunk: its weight gradient is partial
            layout.partial_grad.update(f"{name}.{n}" for n, _ in norm.named_parameters())

    # embedding: vocab-parallel rows
    layout.shard_dim["embed.tok.weight"] = 0
    tok = VocabParallelEmbedding(vocab, h, group, meter, reduce="none")
    if model.embed.pos is not None:
        layout.partial_grad.add("embed.pos.weight")
    model.embed = ParallelEmbedding(tok, model.embed.pos, model.embed.drop, group, meter,
                                    dims.tp_rank, sp)
    for i, block in enumerate(model.layers):
        pre = f"layers.{i}"
        split_norm(block.attn_norm, f"{pre}.attn_norm")
        _parallelize_attention(block.attn, f"{pre}.attn", args, dims, layout, column, row)
        split_norm(block.mlp_norm, f"{pre}.mlp_norm")
        mlp = block.mlp
        for name in ("gate_proj", "up_proj", "fc_in"):
            if hasattr(mlp, name):
                setattr(mlp, name, column(getattr(mlp, name), f"{pre}.mlp.{name}"))
        for name in ("down_proj", "fc_out"):
            if hasattr(mlp, name):
                setattr(mlp, name, row(getattr(mlp, name), f"{pre}.mlp.{name}"))
    split_norm(model.head.norm, "head.norm")
    model.head.output = column(nn.Linear(h, vocab, bias=False, device="meta"), "head.output")
    if args.tie_embeddings:
        model.head.output.weight = model.embed.tok.weight
    return layout


def _parallelize_attention(attn: Attention, name: str, args: ModelArgs, dims: ParallelDims,
                           layout: ShardLayout, column, row) -> None:
    """Query heads split over TP; kv heads split too when tp divides them, otherwise k/v_proj
    are replicated and each rank keeps the one kv head its query heads share."""
    tp = dims.tp
    attn.q_proj = column(attn.q_proj, f"{name}.q_proj")
    attn.num_heads = args.num_heads // tp
    if args.num_kv_heads % tp == 0:
        attn.k_proj = column(attn.k_proj, f"{name}.k_proj")
        attn.v_proj = column(attn.v_proj, f"{name}.v_proj")
        attn.num_kv_heads = args.num_kv_heads // tp
    else:  # kv_heads < tp: replicated projections, gradients partial (only local q heads)
        for proj in ("k_proj", "v_proj"):
            layout.partial_grad.update(f"{name}.{proj}.{n}" for n, _ in
                                       getattr(attn, proj).named_parameters())
        kv = dims.tp_rank * args.num_kv_heads // tp
        attn.kv_heads_slice = slice(kv, kv + 1)
        attn.num_kv_heads = 1
    attn.o_proj = row(attn.o_proj, f"{name}.o_proj")


@contextlib.contextmanager
def sequence_parallel_off(model: nn.Module) -> Iterator[None]:
    """Run without sequence parallelism for a while (generation feeds sequences of any length,
    which SP cannot split); the plan's sequence-parallel-aware modules are restored after."""
    aware = [m for m in model.modules() if hasattr(m, "sequence_parallel")]
    before = [m.sequence_parallel for m in aware]
    for m in aware:
        m.sequence_parallel = False
    try:
        yield
    finally:
        for m, value in zip(aware, before):
            m.sequence_parallel = value


def loss_fn(args: ModelArgs, dims: ParallelDims, vocab_multiple: int = 64) -> Callable:
    """The training loss for this layout: plain cross-entropy, or with TP the vocab-parallel one
    on this rank's slice of the (padded) vocabulary — full-vocabulary logits never exist."""
    if dims.tp == 1:
        return lm_loss
    local = pad_vocab(args.vocab_size, dims.tp, vocab_multiple) // dims.tp

    def tp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, dims.tp_group, dims.tp_rank * local,
                                            args.vocab_size, dims.meter)

    return tp_loss


class FullLogits(nn.Module):
    """A TP model seen as a plain one for generation: logits gathered over the vocabulary
    shards (padding cut off), sequence parallelism off so any prompt length works. Every rank
    of the TP group must call it together."""

    def __init__(self, model: CausalLM, dims: ParallelDims):
        super().__init__()
        self.model, self.args, self.dims = model, model.args, dims

    def forward(self, tokens: torch.Tensor, caches=None) -> torch.Tensor:
        with sequence_parallel_off(self.model):
            logits = self.model(tokens, caches)
        logits = gather_from_tp(logits, self.dims.tp_group, dim=-1, meter=self.dims.meter)
        return logits[..., :self.args.vocab_size]
