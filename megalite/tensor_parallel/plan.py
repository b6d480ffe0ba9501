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
import fnmatch
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


# The TP plan: module name (an fnmatch pattern over ``named_modules``) -> style, applied in
# order. An entry whose module this model lacks (gate_proj in GPT-2, seg in a decoder) does
# nothing; a family adds its own entries (``plan_for``). Styles (``_STYLES``):
#   vocab_embedding  the token rows split over the (padded) vocabulary; the twin adds positions
#                    and segments for this rank's tokens (its sequence chunk under SP)
#   column / row     Megatron's column- / row-parallel linear (output / input features split)
#   column_kv        k/v_proj: split when tp divides the kv heads, else replicated (partial grads)
#   heads            attention on this rank's heads; q/k/v computed as ONE column-parallel call
#   mlp              the MLP's input projections computed as ONE column-parallel call
#   sequence         replicated, but under SP it sees only this rank's sequence chunk: partial
#                    gradients (norms, positions, segments, bert's MLM transform)
#   vocab_column     the output projection over the padded vocabulary, logits left sharded
#   classifier       a classifier on the [CLS] token: under SP the chunks' first tokens gathered
DECODER_PLAN: Tuple[Tuple[str, str], ...] = (
    ("embed", "vocab_embedding"),
    ("embed.pos", "sequence"),
    ("layers.*.attn_norm", "sequence"),
    ("layers.*.attn.q_proj", "column"),
    ("layers.*.attn.[kv]_proj", "column_kv"),
    ("layers.*.attn.o_proj", "row"),
    ("layers.*.attn", "heads"),
    ("layers.*.mlp_norm", "sequence"),
    ("layers.*.mlp.fc_in", "column"),
    ("layers.*.mlp.gate_proj", "column"),
    ("layers.*.mlp.up_proj", "column"),
    ("layers.*.mlp.fc_out", "row"),
    ("layers.*.mlp.down_proj", "row"),
    ("layers.*.mlp", "mlp"),
    ("head.norm", "sequence"),
    ("head.output", "vocab_column"),
)
# BERT: the same blocks (post-LN changes where the norms sit, not what they see: the region
# entry is the column-parallel call, whatever feeds it), plus its embedding norm and segments
# and the MLM transform; a classifier replaces the vocabulary head.
BERT_PLAN = DECODER_PLAN[:2] + (("embed.seg", "sequence"), ("embed.norm", "sequence")) + \
    DECODER_PLAN[2:-1] + (("head.dense", "sequence"),)


def plan_for(args: ModelArgs) -> Tuple[Tuple[str, str], ...]:
    if not args.is_encoder:
        return DECODER_PLAN
    return BERT_PLAN + ((("head", "classifier"),) if args.num_labels else
                        (("head.output", "vocab_column"),))


class _Plan:
    """What the styles share: the layout being recorded, the TP group, SP, the model args."""

    def __init__(self, model: CausalLM, dims: ParallelDims, sp: bool, vocab_multiple: int):
        self.model, self.dims, self.args, self.sp = model, dims, model.args, sp
        self.group, self.meter = dims.tp_group, dims.meter
        self.layout = ShardLayout(tp_rank=dims.tp_rank, tp_size=dims.tp)
        self.vocab = pad_vocab(model.args.vocab_size, dims.tp, vocab_multiple)

    def replace(self, name: str, new: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, new)

    def column(self, name: str, linear: nn.Linear, split: bool = True) -> None:
        for n, _ in linear.named_parameters():
            if split:
                self.layout.shard_dim[f"{name}.{n}"] = 0
            else:  # replicated, but each rank uses only some output rows
                self.layout.partial_grad.add(f"{name}.{n}")
        self.replace(name, ColumnParallelLinear(linear.in_features, linear.out_features,
                                                linear.bias is not None, self.group, self.meter,
                                                self.sp, split))

    def row(self, name: str, linear: nn.Linear) -> None:
        self.layout.shard_dim[f"{name}.weight"] = 1
        if linear.bias is not None and self.sp:
            self.layout.partial_grad.add(f"{name}.bias")  # added to this rank's chunk only
        self.replace(name, RowParallelLinear(linear.in_features, linear.out_features,
                                             linear.bias is not None, self.group, self.meter,
                                             sequence_parallel=self.sp))

    def sequence(self, name: str, module: nn.Module) -> None:
        if self.sp:  # it sees this rank's sequence chunk: its gradients are partial
            self.layout.partial_grad.update(f"{name}.{n}" for n, _ in module.named_parameters())

    def column_kv(self, name: str, linear: nn.Linear) -> None:
        self.column(name, linear, split=self.args.num_kv_heads % self.dims.tp == 0)

    def heads(self, name: str, attn: Attention) -> None:
        """Query heads split over TP; kv heads too when tp divides them, otherwise each rank
        keeps the one (replicated) kv head its query heads share."""
        tp, a = self.dims.tp, self.args
        attn.num_heads = a.num_heads // tp
        if a.num_kv_heads % tp == 0:
            attn.num_kv_heads = a.num_kv_heads // tp
        else:  # kv_heads < tp: gradients partial (only the local q heads use them)
            kv = self.dims.tp_rank * a.num_kv_heads // tp
            attn.kv_heads_slice = slice(kv, kv + 1)
            attn.num_kv_heads = 1
        _to_parallel(attn, ParallelAttention)

    def mlp(self, name: str, mlp: MLP) -> None:
        _to_parallel(mlp, ParallelMLP)

    def vocab_embedding(self, name: str, embed: nn.Module) -> None:
        self.layout.shard_dim[f"{name}.tok.weight"] = 0
        seg, norm = getattr(embed, "seg", None), getattr(embed, "norm", None)
        self.replace(name, ParallelEmbedding(
            VocabParallelEmbedding(self.vocab, self.args.hidden_size, self.group, self.meter,
                                   self.sp), embed.pos, embed.drop, self.dims.tp_rank, seg, norm))

    def vocab_column(self, name: str, linear: nn.Linear) -> None:
        bias = linear.bias is not None  # bert's vocabulary bias, split with the rows
        self.column(name, nn.Linear(self.args.hidden_size, self.vocab, bias=bias,
                                    device="meta"))

    def classifier(self, name: str, head: nn.Module) -> None:
        if self.sp:
            head.group, head.meter = self.group, self.meter
            _to_parallel(head, ParallelClassifierHead)


def parallelize(model: CausalLM, dims: ParallelDims, sequence_parallel: bool = False,
                vocab_multiple: int = 64) -> ShardLayout:
    """Apply the family's TP plan (``plan_for``): replace ``model``'s modules with this TP
    rank's parallel twins (in place, on whatever device the model is — normally meta) and
    return which parameters are split or partial."""
    if dims.tp == 1:
        return ShardLayout(tp_rank=dims.tp_rank, tp_size=1)
    check_divisible(model.args, dims.tp)
    plan = _Plan(model, dims, sequence_parallel, vocab_multiple)
    for pattern, style in plan_for(model.args):
        for name, module in list(model.named_modules()):
            if fnmatch.fnmatchcase(name, pattern):
                getattr(plan, style)(name, module)
    if model.args.tie_embeddings and hasattr(model.head, "output"):
        model.head.output.weight = model.embed.tok.weight
    return plan.layout


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
