"""Hugging Face interop: megalite ``CausalLM`` <-> ``GPT2LMHeadModel`` / ``LlamaForCausalLM``.

The pure-tensor converters (``hf_state_dict`` / ``megalite_state_dict``) are the core, so that
checkpoint tools can translate state dicts without building either model. ``from_hf`` / ``to_hf``
/ ``save_hf`` wrap them with config translation. ``transformers`` is imported lazily: it is an
optional dependency (the ``interop`` extra), and training never needs it.

Every config option we cannot reproduce exactly is rejected with a ``ValueError`` naming the
field, because a silently approximate conversion is worse than none.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from megalite.config.schema import LLAMA3_ROPE_FIELDS
from megalite.interop import hf_bert
from megalite.interop.hf_bert import Get, Sources, copied
from megalite.models import CausalLM, ModelArgs, build_model

StateDict = Dict[str, torch.Tensor]
_GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _transformers() -> Any:
    """Import transformers on demand so the core package does not depend on it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("megalite.interop.hf needs the Hugging Face `transformers` package: "
                          "install the interop extra with `pip install -e .[interop]`") from e
    return transformers


def _family(hf_config: Any) -> str:
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "gpt2":
        return "gpt"
    if model_type == "llama":
        return "llama"
    if model_type == "bert":
        return "bert"
    raise ValueError(f"model_type {model_type!r} is not supported (only 'gpt2', 'llama' and "
                     "'bert')")


def _rope(cfg: Any) -> Tuple[float, Optional[Dict[str, Any]]]:
    """RoPE base and scaling from a LlamaConfig. transformers 5 keeps both in
    ``rope_parameters``; 4.x uses ``rope_theta`` plus an optional ``rope_scaling`` dict. Plain
    RoPE and LLaMA-3.x's ``llama3`` scaling are modelled; any other type (linear, dynamic, yarn,
    ...) is refused."""
    theta, scaling = getattr(cfg, "rope_theta", None), None
    for field in ("rope_parameters", "rope_scaling"):
        params = getattr(cfg, field, None)
        if not params:
            continue
        if not isinstance(params, Mapping):
            raise ValueError(f"{field}={params!r}: expected a dict")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"{field}: rope_type {kind!r} is not supported (only 'default' "
                             "and 'llama3')")
        if kind == "llama3":
            missing = [k for k in LLAMA3_ROPE_FIELDS if params.get(k) is None]
            if missing:
                raise ValueError(f"{field}: rope_type 'llama3' without {', '.join(missing)}")
            scaling = {"rope_type": "llama3",
                       **{k: float(params[k]) for k in LLAMA3_ROPE_FIELDS}}
            scaling["original_max_position_embeddings"] = int(
                params["original_max_position_embeddings"])
        if params.get("rope_theta") is not None:
            theta = params["rope_theta"]
    return float(theta if theta is not None else 10000.0), scaling


def rope_scaling_spec(scaling: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The ``model.rope_scaling`` string of a scaling dict (inverse of ``parse_rope_scaling``)."""
    if not scaling:
        return None
    fields = ",".join(f"{k}={scaling[k]:g}" for k in LLAMA3_ROPE_FIELDS)
    return f"{scaling['rope_type']}:{fields}"


def args_from_hf_config(hf_config: Any) -> ModelArgs:
    """Translate a ``GPT2Config`` / ``LlamaConfig`` into ``ModelArgs``, refusing what we do not
    model. Dropout: megalite has one rate; GPT-2's three are folded into their maximum (dropout
    never affects eval-mode equivalence)."""
    c = hf_config
    if _family(c) == "bert":
        return hf_bert.args_from_bert_config(c)
    if _family(c) == "gpt":
        for field in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                      "add_cross_attention"):
            if getattr(c, field, False):
                raise ValueError(f"GPT-2 config: {field}=True is not supported")
        if not getattr(c, "scale_attn_weights", True):
            raise ValueError("GPT-2 config: scale_attn_weights=False is not supported")
        if c.activation_function not in _GPT2_TANH_GELUS:
            raise ValueError(f"GPT-2 config: activation_function={c.activation_function!r} is "
                             f"not supported (megalite uses tanh GELU: {_GPT2_TANH_GELUS})")
        return ModelArgs(
            family="gpt", num_layers=c.n_layer, hidden_size=c.n_embd, num_heads=c.n_head,
            num_kv_heads=c.n_head, ffn_hidden_size=c.n_inner or 4 * c.n_embd,
            vocab_size=c.vocab_size, max_seq_len=c.n_positions, norm_eps=c.layer_norm_epsilon,
            rope_theta=10000.0, dropout=max(c.resid_pdrop, c.embd_pdrop, c.attn_pdrop),
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
            init_std=c.initializer_range)
    for field in ("attention_bias", "mlp_bias"):
        if getattr(c, field, False):
            raise ValueError(f"LLaMA config: {field}=True is not supported")
    if c.hidden_act != "silu":
        raise ValueError(f"LLaMA config: hidden_act={c.hidden_act!r} is not supported ('silu')")
    if getattr(c, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(f"LLaMA config: pretraining_tp={c.pretraining_tp} is not supported")
    theta, scaling = _rope(c)
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"LLaMA config: head_dim={head_dim} != hidden_size/num_attention_heads")
    return ModelArgs(
        family="llama", num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        ffn_hidden_size=c.intermediate_size, vocab_size=c.vocab_size,
        max_seq_len=c.max_position_embeddings, norm_eps=c.rms_norm_eps, rope_theta=theta,
        rope_scaling=scaling,
        dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        init_std=c.initializer_range)


def rope_fields(args: ModelArgs) -> Dict[str, Any]:
    """RoPE keys of an HF LLaMA config.json, for both transformers lines: ``rope_parameters``
    (5.x) and top-level ``rope_theta`` / ``rope_scaling`` (4.x, which ignores
    ``rope_parameters`` and would silently use theta 10000)."""
    scaling = dict(args.rope_scaling) if args.rope_scaling else None
    params = {"rope_type": "default", "rope_theta": args.rope_theta, **(scaling or {})}
    return {"rope_theta": args.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def hf_config_from_args(args: ModelArgs) -> Any:
    """The transformers config equivalent to ``args`` (inverse of ``args_from_hf_config``)."""
    tf = _transformers()
    if args.is_encoder:
        return hf_bert.bert_config_from_args(args, tf)
    if args.is_llama:
        return tf.LlamaConfig(
            vocab_size=args.vocab_size, hidden_size=args.hidden_size,
            intermediate_size=args.ffn_hidden_size, num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
            head_dim=args.head_dim, hidden_act="silu", max_position_embeddings=args.max_seq_len,
            rms_norm_eps=args.norm_eps, initializer_range=args.init_std,
            **rope_fields(args),  # both spellings: transformers 4.x and 5.x
            attention_dropout=args.dropout, tie_word_embeddings=args.tie_embeddings,
            bos_token_id=None, eos_token_id=None, architectures=["LlamaForCausalLM"])
    if args.num_kv_heads != args.num_heads:
        raise ValueError("GPT-2 has no grouped-query attention: num_kv_heads must equal num_heads")
    return tf.GPT2Config(
        vocab_size=args.vocab_size, n_positions=args.max_seq_len, n_embd=args.hidden_size,
        n_layer=args.num_layers, n_head=args.num_heads, n_inner=args.ffn_hidden_size,
        activation_function="gelu_new", resid_pdrop=args.dropout, embd_pdrop=args.dropout,
        attn_pdrop=args.dropout, layer_norm_epsilon=args.norm_eps,
        initializer_range=args.init_std, tie_word_embeddings=args.tie_embeddings,
        bos_token_id=None, eos_token_id=None, architectures=["GPT2LMHeadModel"])


_LLAMA_LAYER = {  # megalite name in layers.i -> HF name in model.layers.i
    **{f"attn.{n}_proj.weight": f"self_attn.{n}_proj.weight" for n in "qkvo"},
    **{f"mlp.{n}_proj.weight": f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")},
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight"}
# GPT-2 names that are a plain copy (norms) or a Conv1D transpose (projections), per layer
_GPT2_NORMS = {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
_GPT2_CONV = {"attn.o_proj": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}


def _transposed(name: str) -> Callable[[Get], torch.Tensor]:
    """The source of a tensor that is another side's ``name`` transposed (GPT-2's Conv1D)."""
    return lambda get: get(name).t().contiguous()


def hf_sources(args: ModelArgs, with_tied_head: bool = True) -> Sources:
    """For every HF tensor name, how to compute it from megalite tensors fetched by name: the
    lazy form of ``hf_state_dict``, so an export holds one tensor at a time. GPT-2's Conv1D
    stores weights [in, out], so projections are transposed, and q/k/v are fused into
    ``c_attn`` along the output dim. ``lm_head.weight`` is listed when untied or
    ``with_tied_head`` (HF state dicts list it even when tied; its files do not)."""
    if args.is_encoder:
        return hf_bert.hf_sources(args, with_tied_head)
    out: Sources = {}
    if args.is_llama:
        out["model.embed_tokens.weight"] = copied("embed.tok.weight")
        for i in range(args.num_layers):
            for ours, theirs in _LLAMA_LAYER.items():
                out[f"model.layers.{i}.{theirs}"] = copied(f"layers.{i}.{ours}")
        out["model.norm.weight"] = copied("head.norm.weight")
    else:
        out["transformer.wte.weight"] = copied("embed.tok.weight")
        out["transformer.wpe.weight"] = copied("embed.pos.weight")
        for i in range(args.num_layers):
            src, dst = f"layers.{i}.", f"transformer.h.{i}."
            for ours, theirs in _GPT2_NORMS.items():
                for p in ("weight", "bias"):
                    out[f"{dst}{theirs}.{p}"] = copied(f"{src}{ours}.{p}")
            qkv = [f"{src}attn.{n}_proj" for n in "qkv"]
            out[f"{dst}attn.c_attn.weight"] = lambda get, qkv=qkv: torch.cat(
                [get(f"{n}.weight") for n in qkv], dim=0).t().contiguous()
            out[f"{dst}attn.c_attn.bias"] = lambda get, qkv=qkv: torch.cat(
                [get(f"{n}.bias") for n in qkv], dim=0)
            for ours, theirs in _GPT2_CONV.items():
                out[f"{dst}{theirs}.weight"] = _transposed(f"{src}{ours}.weight")
                out[f"{dst}{theirs}.bias"] = copied(f"{src}{ours}.bias")
        out["transformer.ln_f.weight"] = copied("head.norm.weight")
        out["transformer.ln_f.bias"] = copied("head.norm.bias")
    if with_tied_head or not args.tie_embeddings:
        out["lm_head.weight"] = copied("embed.tok.weight" if args.tie_embeddings
                                       else "head.output.weight")
    return out


def hf_state_dict(model_or_sd: Union[CausalLM, Mapping[str, torch.Tensor]],
                  args: Optional[ModelArgs] = None) -> StateDict:
    """megalite tensors -> HF names and layouts (``hf_sources`` applied to every name)."""
    if isinstance(model_or_sd, CausalLM):
        args, sd = model_or_sd.args, model_or_sd.state_dict()
    else:
        sd = dict(model_or_sd)
        if args is None:
            raise ValueError("hf_state_dict: pass args with a bare state dict")
    return {name: fn(sd.__getitem__) for name, fn in hf_sources(args).items()}


def megalite_sources(args: ModelArgs) -> Sources:
    """For every megalite parameter name (``named_parameters``: a tied head is not listed), how
    to compute it from HF tensors fetched by name: the lazy inverse of ``hf_sources``, so a rank
    building its slices reads one full tensor at a time."""
    if args.is_encoder:
        return hf_bert.megalite_sources(args)
    sd: Sources = {}
    if args.is_llama:
        sd["embed.tok.weight"] = copied("model.embed_tokens.weight")
        for i in range(args.num_layers):
            for ours, theirs in _LLAMA_LAYER.items():
                sd[f"layers.{i}.{ours}"] = copied(f"model.layers.{i}.{theirs}")
        sd["head.norm.weight"] = copied("model.norm.weight")
    else:
        sd["embed.tok.weight"] = copied("transformer.wte.weight")
        sd["embed.pos.weight"] = copied("transformer.wpe.weight")
        h, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        for i in range(args.num_layers):
            src, dst = f"transformer.h.{i}.", f"layers.{i}."
            for ours, theirs in _GPT2_NORMS.items():
                for p in ("weight", "bias"):
                    sd[f"{dst}{ours}.{p}"] = copied(f"{src}{theirs}.{p}")
            for j, name in enumerate("qkv"):  # c_attn.weight [in, h + 2kv] -> rows of [3h, in]
                sd[f"{dst}attn.{name}_proj.weight"] = lambda get, j=j, src=src: get(
                    f"{src}attn.c_attn.weight").t().split([h, kv, kv], 0)[j].contiguous()
                sd[f"{dst}attn.{name}_proj.bias"] = lambda get, j=j, src=src: get(
                    f"{src}attn.c_attn.bias").split([h, kv, kv])[j].contiguous()
            for ours, theirs in _GPT2_CONV.items():
                sd[f"{dst}{ours}.weight"] = _transposed(f"{src}{theirs}.weight")
                sd[f"{dst}{ours}.bias"] = copied(f"{src}{theirs}.bias")
        sd["head.norm.bias"] = copied("transformer.ln_f.bias")
        sd["head.norm.weight"] = copied("transformer.ln_f.weight")
    if not args.tie_embeddings:
        sd["head.output.weight"] = copied("lm_head.weight")
    return sd


def megalite_state_dict(hf_sd: Mapping[str, torch.Tensor], args: ModelArgs) -> StateDict:
    """HF tensors -> megalite names and layouts (inverse of ``hf_state_dict``). When tied, both
    ``embed.tok.weight`` and ``head.output.weight`` name the embedding, as ``state_dict()`` does."""
    sd = {name: fn(hf_sd.__getitem__) for name, fn in megalite_sources(args).items()}
    if args.tie_embeddings:
        sd["head.output.weight"] = sd["embed.tok.weight"]
    return sd


def from_hf(model_or_path: Union[Any, str, os.PathLike]) -> CausalLM:
    """A megalite ``CausalLM`` (fp32, CPU) with the weights of an HF model or a saved directory
    (read locally with ``AutoModelForCausalLM.from_pretrained``; nothing is downloaded)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        tf = _transformers()
        config = tf.AutoConfig.from_pretrained(os.fspath(model_or_path), local_files_only=True)
        auto = tf.AutoModelForCausalLM
        if _family(config) == "bert":
            auto = tf.AutoModelForSequenceClassification if hf_bert.is_classifier(config) \
                else tf.AutoModelForMaskedLM
        hf = auto.from_pretrained(os.fspath(model_or_path), local_files_only=True)
    else:
        hf = model_or_path
    args = args_from_hf_config(hf.config)
    if args.is_encoder:  # an in-memory model may carry no `architectures`: its class tells
        args = hf_bert.args_from_bert_config(hf.config, hf_bert.is_classifier(hf.config, hf))
    model = build_model(args, seed=0)
    hf_sd = {k: v.detach().to("cpu", torch.float32) for k, v in hf.state_dict().items()}
    model.load_state_dict(megalite_state_dict(hf_sd, args), strict=True)
    return model


def to_hf(model: CausalLM) -> Any:
    """The ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` holding ``model``'s weights (copies).
    ``model`` must be whole: one tensor- or pipeline-parallel rank's part is refused with the
    ways to get the merged model."""
    layout = getattr(model, "shard_layout", None)
    tp = getattr(layout, "tp_size", 1)
    if not isinstance(model, CausalLM) or tp > 1 or getattr(model, "chunks", None) is not None:
        raise ValueError(
            f"to_hf: this model is one rank's part (tp={tp}, or a pipeline stage), not the "
            "whole model: export its checkpoint with `megalite convert --to hf CKPT OUT` (merges "
            "every tp/pp shard), or pass load_for_inference(CKPT)[0] from "
            "megalite.trainer.inference")
    tf = _transformers()
    config = hf_config_from_args(model.args)
    cls = tf.LlamaForCausalLM if model.args.is_llama else tf.GPT2LMHeadModel
    if model.args.is_encoder:
        cls = getattr(tf, hf_bert.class_name(model.args))
    hf = cls(config)
    sd = {k: v.detach().clone() for k, v in hf_state_dict(model).items()}
    hf.load_state_dict(sd, strict=True)
    return hf.to(next(model.parameters()).dtype).eval()


def save_hf(model: CausalLM, directory: Union[str, os.PathLike]) -> None:
    """Write ``model`` as an HF checkpoint (config.json + model.safetensors)."""
    to_hf(model).save_pretrained(os.fspath(directory), safe_serialization=True)
