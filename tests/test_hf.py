"""megalite <-> Hugging Face: logits match, round trips are exact, bad configs are refused.

HF models are built from tiny configs with random weights (no hub access). Norm weights and
biases are perturbed away from 1/0 so a mis-mapped norm changes the logits.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megalite.interop.hf import (args_from_hf_config, from_hf, hf_state_dict,  # noqa: E402
                                 megalite_state_dict, save_hf, to_hf)

torch.set_num_threads(1)

# Logits are a few units (max ~5 here) and every op runs in fp32 on both sides; the only
# differences are the order of floating point reductions (fused vs split qkv matmul, sdpa vs
# eager softmax, tanh-GELU formula): measured max error ~2e-6 over 2 layers. 1e-5 abs sits above
# that noise yet far below any mapping error (swapping two norms moves logits by ~4).
ATOL = 1e-5
VOCAB, SEQ = 97, 16


# LLaMA-3.x RoPE scaled so that, with head dim 8 and theta 500, one frequency is kept
# (wavelength 6 < 32/4), one is interpolated (30) and two are divided by the factor (140, 664).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def gpt2_config(dropout: float = 0.0, **kw: Any) -> Any:
    base = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    base.update(kw)
    return transformers.GPT2Config(**base)


def llama_config(heads: int = 4, kv_heads: int = 4, tie: bool = False, **kw: Any) -> Any:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=32, rms_norm_eps=1e-5, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def make_hf(config: Any, seed: int = 0) -> Any:
    """A random HF model whose norms are not the identity (weights ~1±0.5, biases ~±0.5)."""
    torch.manual_seed(seed)
    cls = (transformers.LlamaForCausalLM if config.model_type == "llama"
           else transformers.GPT2LMHeadModel)
    model = cls._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


CASES = {
    "gpt2": lambda: gpt2_config(),
    "gpt2_dropout": lambda: gpt2_config(dropout=0.1),
    "gpt2_untied": lambda: gpt2_config(tie_word_embeddings=False),
    "llama_mha": lambda: llama_config(),
    "llama_gqa": lambda: llama_config(heads=4, kv_heads=2),
    "llama_tied": lambda: llama_config(kv_heads=2, tie=True),
    "llama_rope3": lambda: llama_config(kv_heads=2, rope_parameters=LLAMA3_ROPE),
}


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match(case: str) -> None:
    hf = make_hf(CASES[case]())
    ours = from_hf(hf).eval()
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert ref.abs().max() > 0.5  # logits are not trivially small, so ATOL is meaningful
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_exact(case: str) -> None:
    hf = make_hf(CASES[case]())
    back = to_hf(from_hf(hf))
    ref, got = hf.state_dict(), back.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa"])
def test_pure_state_dict_inverse(case: str) -> None:
    """The tensor converters are inverses without instantiating the HF model."""
    hf = make_hf(CASES[case]())
    args = args_from_hf_config(hf.config)
    sd = megalite_state_dict(hf.state_dict(), args)
    back = hf_state_dict(sd, args)
    for k, v in hf.state_dict().items():
        assert torch.equal(back[k], v), k


def test_llama3_rope_scaling_is_modelled() -> None:
    """The llama3 case above matches HF's logits; here: its scaling is read, changes the
    logits (so that match is not plain RoPE's), and the config string round-trips."""
    from megalite.config.schema import parse_rope_scaling
    from megalite.interop.hf import rope_scaling_spec

    hf = make_hf(llama_config(kv_heads=2, rope_parameters=LLAMA3_ROPE))
    ours = from_hf(hf).eval()
    assert ours.args.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert parse_rope_scaling(rope_scaling_spec(ours.args.rope_scaling)) == ours.args.rope_scaling
    x = tokens()
    with torch.no_grad():
        scaled = ours(x)
        ours.args.rope_scaling = None
        for layer in ours.layers:
            layer.attn.rope_scaling = None
        plain = ours(x)
    assert (scaled - plain).abs().max() > 100 * ATOL


def test_tied_embeddings_stay_tied() -> None:
    ours = from_hf(make_hf(llama_config(tie=True)))
    assert ours.head.output.weight is ours.embed.tok.weight
    hf = to_hf(ours)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa"])
def test_save_and_load_directory(case: str, tmp_path: Any) -> None:
    hf = make_hf(CASES[case]())
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)
    save_hf(ours, tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors").exists()
    again = from_hf(tmp_path / "ours")
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_config_translation() -> None:
    args = args_from_hf_config(llama_config(heads=4, kv_heads=2, rms_norm_eps=1e-6))
    assert (args.family, args.num_kv_heads, args.norm_eps, args.rope_theta) == \
        ("llama", 2, 1e-6, 500.0)
    legacy = llama_config()
    legacy.rope_parameters = None
    legacy.rope_theta = 1234.0  # pre-v5 location of the RoPE base
    assert args_from_hf_config(legacy).rope_theta == 1234.0
    gpt = args_from_hf_config(gpt2_config(dropout=0.1, n_inner=40))
    assert (gpt.family, gpt.ffn_hidden_size, gpt.dropout, gpt.tie_embeddings) == \
        ("gpt", 40, 0.1, True)


@pytest.mark.parametrize("config,field", [
    (lambda: gpt2_config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (lambda: gpt2_config(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (lambda: gpt2_config(scale_attn_weights=False), "scale_attn_weights"),
    (lambda: gpt2_config(activation_function="relu"), "activation_function"),
    (lambda: llama_config(attention_bias=True), "attention_bias"),
    (lambda: llama_config(mlp_bias=True), "mlp_bias"),
    (lambda: llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                           "rope_theta": 1e4}), "rope_type"),
])
def test_bad_config_is_refused(config: Any, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        args_from_hf_config(config())


def test_gqa_gpt_cannot_be_exported() -> None:
    ours = from_hf(make_hf(gpt2_config()))
    ours.args.num_kv_heads = 2
    with pytest.raises(ValueError, match="num_kv_heads"):
        to_hf(ours)


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install -e \.\[interop\]"):
        to_hf(from_hf(make_hf(llama_config())))
