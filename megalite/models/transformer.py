"""Decoder-only transformer language models: GPT-2 and LLaMA, plain PyTorch.

Read top to bottom like nanoGPT. Nothing here knows about parallelism: tensor parallelism swaps
Linear/Embedding modules for their parallel twins (and lowers ``num_heads`` / ``num_kv_heads`` to
the local count), pipeline parallelism cuts the list of units returned by ``units()``.

Shapes: b = batch, s = sequence, h = hidden, nh/nkv = (local) query/key-value heads, d = head dim.
Both families equal their Hugging Face counterparts weight for weight (see ``megalite.interop.hf``).

Packed documents (``models.documents``): with ``reset_position_ids`` / ``reset_attention_mask`` the
forward takes a ``DocumentContext`` built from the tokens — per-token positions for the embedding
(gpt) or RoPE (llama), and a block-diagonal causal mask for attention. Without them nothing changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite import ops
from megalite.config.schema import parse_rope_scaling  # noqa: F401 (re-exported)
from megalite.models.documents import DocumentContext, batch_context
from megalite.models.rope import apply_rope, rope_cos_sin, rope_inv_freq  # noqa: F401 (API)


@dataclass
class ModelArgs:
    """Resolved architecture (no Nones), built from ``config.ModelConfig`` by ``models.resolve``."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float
    rope_theta: float
    dropout: float
    tie_embeddings: bool
    init_std: float
    kernels: str = "fused"  # "fused": norms (and masked attention) use megalite.ops kernels
    # packed documents (data.reset_attention_mask, ...): the EOD id the masks are built from
    eod_id: Optional[int] = None
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
    # LLaMA-3.x long-context RoPE (``parse_rope_scaling``): None is plain RoPE
    rope_scaling: Optional[Dict[str, Any]] = None
    type_vocab_size: int = 2  # bert: segment (token type) embeddings
    num_labels: int = 0  # bert: > 0 replaces the MLM head by a classifier over that many classes

    @property
    def is_encoder(self) -> bool:
        """BERT: bidirectional attention over a padding mask, post-LN blocks, an MLM head."""
        return self.family == "bert"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_llama(self) -> bool:
        return self.family == "llama"


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, statistics in fp32 (as Hugging Face's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and ops.model_uses_kernels(x.device):
            return ops.rms_norm(x, self.weight, self.eps)  # one rounding to x.dtype, not two
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters) that runs megalite's fused kernel when ``fused``."""

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__(dim, eps=eps)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and ops.model_uses_kernels(x.device):
            return ops.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def make_norm(args: ModelArgs) -> nn.Module:
    fused = args.kernels == "fused"
    if args.is_llama:
        return RMSNorm(args.hidden_size, args.norm_eps, fused)
    return LayerNorm(args.hidden_size, args.norm_eps, fused)


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads; RoPE for llama."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        bias = not args.is_llama
        d = args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, d
        self.rope_theta = args.rope_theta if args.is_llama else None
        self.rope_scaling = args.rope_scaling if args.is_llama else None
        self.dropout = args.dropout
        self.fused = args.kernels == "fused"  # a document mask runs the fused masked softmax
        self.causal = not args.is_encoder  # an encoder attends both ways (padding keys masked)
        # Tensor parallelism with fewer kv heads than ranks replicates k/v_proj and tells each
        # rank which kv head(s) its query heads use; None means all of them.
        self.kv_heads_slice: Optional[slice] = None
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(args.num_heads * d, args.hidden_size, bias=bias)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of ``x``: [b, s, nh*d], [b, s, nkv*d], [b, s, nkv*d]. The seam of tensor
        parallelism, which computes the three as one column-parallel layer."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None,
                doc: Optional[DocumentContext] = None) -> torch.Tensor:
        q, k, v = self.project(x)
        b, s, _ = q.shape  # of the projections: under sequence parallelism x is a chunk
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)  # [b, nh, s, d]
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)  # [b, nkv, s, d]
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.kv_heads_slice is not None:
            k, v = k[:, self.kv_heads_slice], v[:, self.kv_heads_slice]
        start = cache.length if cache is not None else 0
        if self.rope_theta is not None:
            pos = torch.arange(start, start + s, device=x.device)
            if doc is not None and doc.positions is not None:
                pos = doc.positions  # [b, s]: the full sequence's (SP gathered it for q, k)
            cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_theta, q.dtype,
                                    self.rope_scaling)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        mask, causal, blocked = None, self.causal and start == 0 and s > 1, None
        if start > 0 and s > 1:  # chunk after a prefix: query i sees keys <= start + i
            mask = torch.ones(s, start + s, dtype=torch.bool, device=x.device).tril(start)
        # packed documents: block-diagonal causal; an encoder's padding: keys masked
        if doc is not None and doc.attend is not None:
            if self.fused and ops.model_uses_kernels(q.device):
                blocked = doc.blocked
            else:
                mask, causal = doc.attend, False
        y = self.core(q, k, v, mask, causal, blocked)  # [b, nh, s, d]
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: Optional[torch.Tensor], causal: bool,
             blocked: Optional[torch.Tensor]) -> torch.Tensor:
        """Core attention — what selective recomputation re-runs (``models.recompute``):
        grouped-query kv expansion, softmax(q kᵀ/√d, masked) with dropout, times v; q [b, nh,
        s, d], k/v [b, nkv, s, d] -> [b, nh, s, d]. ``blocked`` [b, 1, s, s] (True = masked
        out) takes megalite's fused masked softmax; otherwise SDPA with ``mask``/``causal``.

        What each path keeps for backward (measured by ``models.activation_memory``'s counter,
        byte for byte the re-derived terms there): SDPA's math path (CPU with dropout) keeps
        scaled copies of q and k, v, the softmax output, the dropout mask (of the activation
        dtype on CPU) and the dropped probabilities — two s² tensors of the dtype and the mask
        per head; CPU's flash path (no dropout) keeps q, k, v, the log-sum-exp and the output
        (which o_proj then reads as is), and with a document mask that mask as floats, no s²
        term per head (CUDA's flash/efficient kernels likewise); the fused masked softmax keeps
        q, k, its output probabilities, the dropout mask, the dropped probabilities and v."""
        if k.shape[1] != q.shape[1]:  # grouped-query: each kv head serves nh/nkv query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        p = self.dropout if self.training else 0.0
        if blocked is not None:
            return self._fused_masked(q, k, v, blocked, p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                              is_causal=causal)

    def _fused_masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      blocked: torch.Tensor, p: float) -> torch.Tensor:
        """softmax(q k^T / sqrt(d), blocked keys -inf) v with megalite's fused scaled masked
        softmax (Megatron's ``FusedScaleMaskSoftmax``); q, k, v [b, nh, s, d], blocked
        [b, 1, s, s] True = masked out."""
        scores = torch.matmul(q, k.transpose(-2, -1))  # [b, nh, s, s]
        probs = ops.scaled_masked_softmax(scores, blocked, 1.0 / math.sqrt(self.head_dim))
        return torch.matmul(F.dropout(probs, p, self.training), v)  # [b, nh, s, d]


class MLP(nn.Module):
    """GPT-2: fc_out(gelu_tanh(fc_in x)). BERT: the same with the exact (erf) GELU. LLaMA:
    down_proj(silu(gate_proj x) * up_proj x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.swiglu = args.is_llama
        self.gelu = "none" if args.is_encoder else "tanh"
        h, f = args.hidden_size, args.ffn_hidden_size
        if self.swiglu:
            self.gate_proj = nn.Linear(h, f, bias=False)
            self.up_proj = nn.Linear(h, f, bias=False)
            self.down_proj = nn.Linear(f, h, bias=False)
        else:
            self.fc_in = nn.Linear(h, f)
            self.fc_out = nn.Linear(f, h)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The input projections of ``x``, [b, s, f] each: (gate, up) for SwiGLU, (fc_in,) for
        GPT-2. The seam of tensor parallelism, which computes them as one column-parallel layer."""
        if self.swiglu:
            return self.gate_proj(x), self.up_proj(x)
        return (self.fc_in(x),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.project(x)
            return self.down_proj(F.silu(gate) * up)
        (hidden,) = self.project(x)
        return self.fc_out(F.gelu(hidden, approximate=self.gelu))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). BERT's post-norm:
    norm(x + attn(x)), then norm(x + mlp(x)) (``attn_norm``/``mlp_norm`` are then HF's
    ``attention.output.LayerNorm``/``output.LayerNorm``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = make_norm(args)
        self.attn = Attention(args)
        self.mlp_norm = make_norm(args)
        self.mlp = MLP(args)
        self.drop = nn.Dropout(args.dropout)
        self.post_norm = args.is_encoder

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None,
                doc: Optional[DocumentContext] = None) -> torch.Tensor:
        if self.post_norm:
            x = self.attn_norm(x + self.drop(self.attn(x, cache, doc)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), cache, doc))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Embedding(nn.Module):
    """Token embedding (+ learned positions for gpt), then dropout."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.tok = nn.Embedding(args.vocab_size, args.hidden_size)
        self.pos = None if args.is_llama else nn.Embedding(args.max_seq_len, args.hidden_size)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, tokens: torch.Tensor, start: int = 0,
                positions: Optional[torch.Tensor] = None,
                token_types: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``positions`` [b, s] (restarting per document) replace start..start+s-1; decoders
        have no ``token_types``."""
        x = self.tok(tokens)  # [b, s, h]
        if self.pos is not None:
            if positions is None:
                positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
            x = x + self.pos(positions)
        return self.drop(x)


class Head(nn.Module):
    """Final norm and the output projection to vocabulary logits."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = make_norm(args)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x))  # [b, s, vocab]


TIED_WEIGHTS = ("embed.tok.weight", "head.output.weight")
"""The word embeddings and the output projection that shares them (``tie_embeddings``): on a
pipeline, the last stage's copy is named by the second and holds the first."""


class CausalLM(nn.Module):
    """embed -> blocks -> head. ``units()`` is the sequence pipeline/ZeRO-3/recompute speak in.
    With ``family=bert`` the same shape holds the encoder (``models.bert``: embeddings with
    segments and a norm, post-norm blocks, the MLM head)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        if args.is_encoder:
            from megalite.models.bert import BertEmbedding, ClassifierHead, MLMHead
            self.embed = BertEmbedding(args)
            self.head = ClassifierHead(args) if args.num_labels else MLMHead(args)
        else:
            self.embed, self.head = Embedding(args), Head(args)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        if args.tie_embeddings:
            self.head.output.weight = self.embed.tok.weight

    def units(self) -> List[nn.Module]:
        return [self.embed, *self.layers, self.head]

    def forward(self, tokens: torch.Tensor, caches: Optional[List[KVCache]] = None,
                **batch: torch.Tensor) -> torch.Tensor:
        """Logits [b, s, vocab]. Without caches, packed documents are separated as the model's
        flags say (``models.documents``); decoding with caches sees one text. An encoder takes
        ``attention_mask`` (1 = token, 0 = padding) and ``token_types`` [b, s]."""
        start = caches[0].length if caches else 0
        doc = batch_context({"tokens": tokens, **batch}, self.args) if not caches else None
        x = self.embed(tokens, start, doc.positions if doc is not None else None,
                       doc.token_types if doc is not None else None)
        for i, layer in enumerate(self.layers):
            x = layer(x, caches[i] if caches else None, doc)
        return self.head(x)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32, mean (or sum) over the tokens whose label is not -100."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100,
                           reduction=reduction)


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings and isinstance(model, CausalLM):
        n -= model.embed.tok.weight.numel()
        if model.embed.pos is not None:
            n -= model.embed.pos.weight.numel()
    return n


def flops_per_token(args: ModelArgs, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6 per parameter (fwd + bwd) plus attention scores
    (12 * layers * hidden * seq; PaLM appendix B)."""
    return 6.0 * n_params + 12.0 * args.num_layers * args.hidden_size * seq_len


def residual_scaled(name: str) -> bool:
    """Output projections onto the residual stream get std/sqrt(2L) (GPT-2 paper)."""
    return name.endswith(("o_proj.weight", "fc_out.weight", "down_proj.weight"))


def init_tensor(name: str, shape: torch.Size, args: ModelArgs, seed: int) -> torch.Tensor:
    """The full fp32 initial value of parameter ``name``: a function of (seed, name) only, so a
    sharded or pipelined model can draw exactly the slice the single-process model holds."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if "norm" in name.split(".")[-2]:
        return torch.ones(shape)
    gen = torch.Generator().manual_seed(_stable_seed(seed, name))
    std = args.init_std / math.sqrt(2 * args.num_layers) if residual_scaled(name) else args.init_std
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def _stable_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
