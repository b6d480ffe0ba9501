"""``parallelize``: turn a plain GPT-2 / LLaMA ``CausalLM`` (on the meta device) into this rank's
tensor-parallel shard by module replacement (Megatron-LM, Shoeybi et al. 2019), optionally with
sequence parallelism (Korthikanti et al. 2022).

Per block the plan is the same for both families:

    attn_norm ─▶ q,k,v_proj: ONE column-parallel call ─▶ attention on local heads ─▶ o_proj: row
    mlp_norm  ─▶ fc_in | gate,up: ONE column-parallel call ─▶ act ─▶ fc_out | down: row

A region starts with the column-parallel call over all its input weights (``Attention.project``
/ ``MLP.project``, the models' seam): ONE entry collective, f (identity forward, all-reduce of
dX backward, overlapped with the dW matmuls) or with sequence parallelism ḡ (all-gather
forward, reduce-scatter backward). It ends with the row-parallel layer's reduction: all-reduce,
or reduce-scatter along the sequence with SP. So a layer does two all-reduces forward and two
backward (without SP), or the same bytes as all-gathers + reduce-scatters (with SP). The
embedding is vocab-parallel and reduces its own partial sums; the head is a column-parallel
projection over the padded vocabulary whose logits stay sharded for the vocab-parallel
cross-entropy. The layers are those of ``layers.py``, the ones ``bench/tp.py`` measures.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from megalite.models.bert import ClassifierHead
from megalite.models.transformer import MLP, Attention, CausalLM, ModelArgs, lm_loss
from megalite.parallel.dims import ParallelDims
from megalite.tensor_parallel.collectives import gather_from_tp
from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                             VocabParallelEmbedding, column_parallel, pad_vocab)
from megalite.tensor_parallel.layout import ShardLayout


class ParallelAttention(Attention):
    """Attention on this rank's heads: q/k/v_proj are column-parallel layers computed by ONE
    call, so they share one entry collective. Adds no state to ``Attention``."""

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return column_parallel(x, (self.q_proj, self.k_proj, self.v_proj))


class ParallelMLP(MLP):
    """The MLP on this rank's slice of the hidden width: gate/up (or fc_in) computed by ONE
    column-parallel call. Adds no state to ``MLP``."""

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return column_parallel(x, (self.gate_proj, self.up_proj) if self.swiglu else
                               (self.fc_in,))


class ParallelClassifierHead(ClassifierHead):
    """The classifier under sequence parallelism: [CLS] is the first token of TP rank 0's
    chunk, so the chunks' first tokens are gathered (backward: each rank keeps its own) and the
    replicated pooler and classifier run on the global first token."""

    def first_token(self, x: torch.Tensor) -> torch.Tensor:
        return gather_from_tp(x[:, :1], self.group, dim=1, meter=self.meter)[:, 0]


def _to_parallel(module: nn.Module, twin: type) -> None:
    """Give ``module`` its tensor-parallel class: a subclass that overrides only ``project``
    (the model's seam) and adds no state, so every attribute carries over unchanged."""
    assert type(module) is twin.__bases__[0], (type(module), twin)
    module.__class__ = twin


class ParallelEmbedding(nn.Module):
    """The embedding unit under TP (same child names as ``models.transformer.Embedding``): the
    vocab-parallel token rows reduce their partial sums themselves (all-reduce, or with SP a
    reduce-scatter that leaves this rank's sequence chunk); learned positions are added after,
    each rank those of the tokens it holds. Without SP every rank adds all positions and gets
    the whole position gradient; with SP rank r adds those of chunk r, so its position
    gradient is partial (the plan records it). BERT's segment embeddings and norm follow the
    same rule (``seg``, ``norm``; None for decoders)."""

    def __init__(self, tok: VocabParallelEmbedding, pos: Optional[nn.Embedding], drop: nn.Module,
                 tp_rank: int, seg: Optional[nn.Embedding] = None,
                 norm: Optional[nn.Module] = None):
        super().__init__()
        self.tok, self.pos, self.drop, self.tp_rank = tok, pos, drop, tp_rank
        if seg is not None:
            self.seg, self.norm = seg, norm

    def forward(self, tokens: torch.Tensor, start: int = 0,
                positions: Optional[torch.Tensor] = None,
                token_types: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``positions`` [b, s] of the whole sequence (packed documents) replace
        start..start+s-1, ``token_types`` [b, s] are an encoder's segments; with SP this rank
        adds those of its chunk."""
        x = self.tok(tokens)  # [b, s, h], or with SP this rank's chunk [b, s/tp, h]
        if self.pos is not None:
            s = x.shape[1]
            first = self.tp_rank * s if self.tok.sequence_parallel else 0
            if positions is None:
                x = x + self.pos(torch.arange(start + first, start + first + s,
                                              device=tokens.device))
            else:
                x = x + self.pos(positions[:, first:first + s])
        if hasattr(self, "seg"):  # bert: segments, then the embedding norm
            first = self.tp_rank * x.shape[1] if self.tok.sequence_parallel else 0
            types = torch.zeros_like(tokens) if token_types is None else token_types
            x = self.norm(x + self.seg(types[:, first:first + x.shape[1]]))
        return self.drop(x)


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

    def column(linear: nn.Linear, name: str, split: bool = True) -> ColumnParallelLinear:
        for n, _ in linear.named_parameters():
            if split:
                layout.shard_dim[f"{name}.{n}"] = 0
            else:  # replicated, but each rank uses only some output rows
                layout.partial_grad.add(f"{name}.{n}")
        return ColumnParallelLinear(linear.in_features, linear.out_features,
                                    linear.bias is not None, group, meter, sp, split)

    def row(linear: nn.Linear, name: str) -> RowParallelLinear:
        layout.shard_dim[f"{name}.weight"] = 1
        if linear.bias is not None and sp:
            layout.partial_grad.add(f"{name}.bias")  # added to this rank's sequence chunk only
        return RowParallelLinear(linear.in_features, linear.out_features,
                                 linear.bias is not None, group, meter, sequence_parallel=sp)

    def norm_on_chunk(norm: nn.Module, name: str) -> None:
        if sp:  # the norm sees this rank's sequence chunk: its weight gradient is partial
            layout.partial_grad.update(f"{name}.{n}" for n, _ in norm.named_parameters())

    layout.shard_dim["embed.tok.weight"] = 0
    if model.embed.pos is not None and sp:
        layout.partial_grad.add("embed.pos.weight")
    seg, norm = getattr(model.embed, "seg", None), getattr(model.embed, "norm", None)
    if seg is not None:  # bert: segments and the embedding norm see this rank's chunk
        norm_on_chunk(seg, "embed.seg")
        norm_on_chunk(norm, "embed.norm")
    model.embed = ParallelEmbedding(VocabParallelEmbedding(vocab, h, group, meter, sp),
                                    model.embed.pos, model.embed.drop, dims.tp_rank, seg, norm)
    for i, block in enumerate(model.layers):
        pre = f"layers.{i}"
        norm_on_chunk(block.attn_norm, f"{pre}.attn_norm")
        _parallelize_attention(block.attn, f"{pre}.attn", args, dims, layout, column, row)
        norm_on_chunk(block.mlp_norm, f"{pre}.mlp_norm")
        mlp = block.mlp
        for name in ("gate_proj", "up_proj", "fc_in"):
            if hasattr(mlp, name):
                setattr(mlp, name, column(getattr(mlp, name), f"{pre}.mlp.{name}"))
        for name in ("down_proj", "fc_out"):
            if hasattr(mlp, name):
                setattr(mlp, name, row(getattr(mlp, name), f"{pre}.mlp.{name}"))
        _to_parallel(mlp, ParallelMLP)
    if not hasattr(model.head, "output"):  # a classifier: replicated, on the [CLS] token
        if sp:
            model.head.group, model.head.meter = group, meter
            _to_parallel(model.head, ParallelClassifierHead)
        return layout
    norm_on_chunk(model.head.norm, "head.norm")
    if hasattr(model.head, "dense"):  # bert's MLM transform: replicated, on this rank's chunk
        norm_on_chunk(model.head.dense, "head.dense")
    bias = model.head.output.bias is not None  # bert's vocabulary bias, split with the rows
    model.head.output = column(nn.Linear(h, vocab, bias=bias, device="meta"), "head.output")
    if args.tie_embeddings:
        model.head.output.weight = model.embed.tok.weight
    return layout


def _parallelize_attention(attn: Attention, name: str, args: ModelArgs, dims: ParallelDims,
                           layout: ShardLayout, column, row) -> None:
    """Query heads split over TP; kv heads split too when tp divides them, otherwise k/v_proj
    are replicated (in the same column-parallel call) and each rank keeps the one kv head its
    query heads share."""
    tp = dims.tp
    attn.q_proj = column(attn.q_proj, f"{name}.q_proj")
    attn.num_heads = args.num_heads // tp
    kv_split = args.num_kv_heads % tp == 0
    attn.k_proj = column(attn.k_proj, f"{name}.k_proj", split=kv_split)
    attn.v_proj = column(attn.v_proj, f"{name}.v_proj", split=kv_split)
    if kv_split:
        attn.num_kv_heads = args.num_kv_heads // tp
    else:  # kv_heads < tp: gradients partial (only the local q heads use them)
        kv = dims.tp_rank * args.num_kv_heads // tp
        attn.kv_heads_slice = slice(kv, kv + 1)
        attn.num_kv_heads = 1
    attn.o_proj = row(attn.o_proj, f"{name}.o_proj")
    _to_parallel(attn, ParallelAttention)


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


def loss_fn(args: ModelArgs, dims: ParallelDims, vocab_multiple: int = 64,
            reduction: str = "mean") -> Callable:
    """The token loss for this layout, (logits, labels) -> fp32 scalar, labels -100 ignored:
    plain cross-entropy, or with TP the vocab-parallel one on this rank's slice of the (padded)
    vocabulary — full-vocabulary logits never exist. Training uses ``reduction="sum"``: the
    executor divides by the global batch's token count."""
    if dims.tp == 1 or args.num_labels:  # a classifier's logits are whole on every TP rank
        return lambda logits, labels: lm_loss(logits, labels, reduction=reduction)
    local = pad_vocab(args.vocab_size, dims.tp, vocab_multiple) // dims.tp

    def tp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, dims.tp_group, dims.tp_rank * local,
                                            args.vocab_size, dims.meter, reduction=reduction)

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
