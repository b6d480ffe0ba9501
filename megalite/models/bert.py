"""BERT's own units (Devlin et al. 2018), in plain PyTorch like GPT-2 and LLaMA.

The encoder is ``transformer.CausalLM`` with ``family=bert``: the same ``embed -> blocks -> head``
units (so the pipeline cut, ZeRO-3 units, recomputation and the TP plan apply unchanged), with
``Block`` in its post-norm form, bidirectional ``Attention`` over a padding mask
(``documents.batch_context``) and the exact GELU. This file holds the two units that differ:
embeddings with segment ids and a LayerNorm, and the masked-LM head (dense, GELU, LayerNorm, then
the word embeddings tied as the decoder, with their own bias). No next-sentence head. Names map
one to one onto Hugging Face's ``BertForMaskedLM`` (``interop.hf_bert``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.models.transformer import LayerNorm, ModelArgs


class BertEmbedding(nn.Module):
    """norm(word + position + segment embeddings), then dropout (``seg``: not ``type``, which
    nn.Module already names)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.tok = nn.Embedding(args.vocab_size, args.hidden_size)
        self.pos = nn.Embedding(args.max_seq_len, args.hidden_size)
        self.seg = nn.Embedding(args.type_vocab_size, args.hidden_size)
        self.norm = LayerNorm(args.hidden_size, args.norm_eps, args.kernels == "fused")
        self.drop = nn.Dropout(args.dropout)

    def forward(self, tokens: torch.Tensor, start: int = 0,
                positions: Optional[torch.Tensor] = None,
                token_types: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``token_types`` [b, s] (None: all segment 0)."""
        s = tokens.shape[1]
        if positions is None:
            positions = torch.arange(start, start + s, device=tokens.device)
        if token_types is None:
            token_types = torch.zeros_like(tokens)
        x = self.tok(tokens) + self.pos(positions) + self.seg(token_types)
        return self.drop(self.norm(x))


class ClassifierHead(nn.Module):
    """Sequence classification (``num_labels`` > 0): classifier(dropout(tanh(pooler(x[:, 0]))))
    — BERT's pooled [CLS] token (HF ``bert.pooler.dense``, ``classifier``); logits [b, labels].
    ``first_token`` is the seam sequence parallelism overrides (the [CLS] token lives in TP
    rank 0's chunk)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.pooler = nn.Linear(args.hidden_size, args.hidden_size)
        self.drop = nn.Dropout(args.dropout)
        self.classifier = nn.Linear(args.hidden_size, args.num_labels)

    def first_token(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(self.first_token(x)))
        return self.classifier(self.drop(pooled))


class MLMHead(nn.Module):
    """Masked-LM logits: output(norm(gelu(dense(x)))); ``output`` holds the vocabulary bias and,
    tied, the word embeddings as its weight."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.hidden_size)
        self.norm = LayerNorm(args.hidden_size, args.norm_eps, args.kernels == "fused")
        self.output = nn.Linear(args.hidden_size, args.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(F.gelu(self.dense(x))))  # [b, s, vocab]
