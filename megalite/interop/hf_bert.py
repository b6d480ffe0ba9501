"""Hugging Face BERT <-> megalite ``family=bert``: ``BertForMaskedLM`` (``num_labels`` 0) and
``BertForSequenceClassification`` (``num_labels`` > 0: the pooler and classifier are the head).

Called by ``interop.hf`` for ``model_type == "bert"``; the same lazy ``Sources`` form (one tensor
at a time) as GPT-2 and LLaMA. Every config option megalite does not reproduce is refused with
the field named.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from megalite.models import ModelArgs

Get = Callable[[str], torch.Tensor]
Sources = Dict[str, Callable[[Get], torch.Tensor]]


def copied(name: str) -> Callable[[Get], torch.Tensor]:
    """The source of a tensor that is another side's ``name`` unchanged."""
    return lambda get: get(name)


_LAYER = {  # megalite name in layers.i -> HF name in bert.encoder.layer.i
    **{f"attn.{m}_proj.{p}": f"attention.self.{hf}.{p}"
       for m, hf in (("q", "query"), ("k", "key"), ("v", "value")) for p in ("weight", "bias")},
    **{f"attn.o_proj.{p}": f"attention.output.dense.{p}" for p in ("weight", "bias")},
    **{f"attn_norm.{p}": f"attention.output.LayerNorm.{p}" for p in ("weight", "bias")},
    **{f"mlp.fc_in.{p}": f"intermediate.dense.{p}" for p in ("weight", "bias")},
    **{f"mlp.fc_out.{p}": f"output.dense.{p}" for p in ("weight", "bias")},
    **{f"mlp_norm.{p}": f"output.LayerNorm.{p}" for p in ("weight", "bias")},
}
_EMBED = {"embed.tok.weight": "bert.embeddings.word_embeddings.weight",
          "embed.pos.weight": "bert.embeddings.position_embeddings.weight",
          "embed.seg.weight": "bert.embeddings.token_type_embeddings.weight",
          "embed.norm.weight": "bert.embeddings.LayerNorm.weight",
          "embed.norm.bias": "bert.embeddings.LayerNorm.bias"}
_CLASSIFIER = {"head.pooler.weight": "bert.pooler.dense.weight",
               "head.pooler.bias": "bert.pooler.dense.bias",
               "head.classifier.weight": "classifier.weight",
               "head.classifier.bias": "classifier.bias"}
_HEAD = {"head.dense.weight": "cls.predictions.transform.dense.weight",
         "head.dense.bias": "cls.predictions.transform.dense.bias",
         "head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
         "head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
         "head.output.bias": "cls.predictions.bias"}


def args_from_bert_config(c: Any, classifier: Optional[bool] = None) -> ModelArgs:
    """``BertConfig`` -> ``ModelArgs(family="bert")``; dropout is one rate (the maximum).
    ``classifier`` (None: read ``architectures``) makes the sequence classifier's args."""
    if c.hidden_act != "gelu":
        raise ValueError(f"BERT config: hidden_act={c.hidden_act!r} is not supported ('gelu')")
    kind = getattr(c, "position_embedding_type", None) or "absolute"
    if kind != "absolute":
        raise ValueError(f"BERT config: position_embedding_type={kind!r} is not supported")
    for field in ("is_decoder", "add_cross_attention"):
        if getattr(c, field, False):
            raise ValueError(f"BERT config: {field}=True is not supported (encoder only)")
    if classifier is None:
        classifier = is_classifier(c)
    if classifier and getattr(c, "problem_type", None) not in (None,
                                                                "single_label_classification"):
        raise ValueError(f"BERT config: problem_type={c.problem_type!r} is not supported "
                         "(single_label_classification)")
    return ModelArgs(
        family="bert", num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_attention_heads,
        ffn_hidden_size=c.intermediate_size, vocab_size=c.vocab_size,
        max_seq_len=c.max_position_embeddings, norm_eps=c.layer_norm_eps, rope_theta=10000.0,
        dropout=max(c.hidden_dropout_prob, c.attention_probs_dropout_prob),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)) and not classifier,
        init_std=c.initializer_range, type_vocab_size=c.type_vocab_size,
        num_labels=c.num_labels if classifier else 0)


def bert_config_from_args(args: ModelArgs, tf: Any) -> Any:
    return tf.BertConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        intermediate_size=args.ffn_hidden_size, hidden_act="gelu",
        hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
        max_position_embeddings=args.max_seq_len, type_vocab_size=args.type_vocab_size,
        initializer_range=args.init_std, layer_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings, num_labels=max(args.num_labels, 2),
        architectures=[class_name(args)])


def is_classifier(config: Any, model: Any = None) -> bool:
    """A sequence classifier (not a masked LM): ``model``'s class when given (an in-memory
    model may carry no ``architectures``), else the config's ``architectures``."""
    if model is not None:
        return type(model).__name__.endswith("ForSequenceClassification")
    return any("SequenceClassification" in a for a in (config.architectures or []))


def class_name(args: ModelArgs) -> str:
    """The transformers class holding a bert model of ``args``."""
    return "BertForSequenceClassification" if args.num_labels else "BertForMaskedLM"


def _names(args: ModelArgs) -> Dict[str, str]:
    """megalite parameter name -> HF name (the decoder weight: the word embeddings if tied)."""
    out = {**_EMBED, **(_CLASSIFIER if args.num_labels else _HEAD)}
    for i in range(args.num_layers):
        out.update({f"layers.{i}.{ours}": f"bert.encoder.layer.{i}.{theirs}"
                    for ours, theirs in _LAYER.items()})
    if not args.tie_embeddings and not args.num_labels:
        out["head.output.weight"] = "cls.predictions.decoder.weight"
    return out


def hf_sources(args: ModelArgs, with_tied_head: bool = True) -> Sources:
    out: Sources = {theirs: copied(ours) for ours, theirs in _names(args).items()}
    if not args.num_labels and (with_tied_head or not args.tie_embeddings):
        out["cls.predictions.decoder.weight"] = copied(
            "embed.tok.weight" if args.tie_embeddings else "head.output.weight")
        out["cls.predictions.decoder.bias"] = copied("head.output.bias")
    return out


def megalite_sources(args: ModelArgs) -> Sources:
    return {ours: copied(theirs) for ours, theirs in _names(args).items()}
