"""Sampling and KV-cached generation: cached == recomputed, filters are exact, seeds reproduce."""
from __future__ import annotations

import math

import pytest
import torch

from megalite.generate import filter_logits, generate, sample_next
from megalite.models import CausalLM, ModelArgs, build_model

torch.set_num_threads(1)
VOCAB = 61


def tiny(family: str, max_seq_len: int = 32, dtype: torch.dtype = torch.float64) -> CausalLM:
    """A tiny random model. A large init_std makes logits peaked, and fp64 makes cached and
    recomputed logits agree to ~1e-15, so greedy argmax cannot flip on a near tie."""
    llama = family == "llama"
    args = ModelArgs(family=family, num_layers=2, hidden_size=32, num_heads=4,
                     num_kv_heads=2 if llama else 4, ffn_hidden_size=64, vocab_size=VOCAB,
                     max_seq_len=max_seq_len, norm_eps=1e-5, rope_theta=10000.0, dropout=0.1,
                     tie_embeddings=not llama, init_std=0.5)
    return build_model(args, seed=3, dtype=dtype)


def greedy_reference(model: CausalLM, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Slow greedy decoding: recompute the whole (window-truncated) context every step, no cache.
    For gpt, stop once the sequence is longer than the position table (nothing left to embed)."""
    window = model.args.max_seq_len
    seq = prompt.clone()
    model.eval()
    with torch.no_grad():
        for _ in range(new):
            logits = model(seq[:, -window:])[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            if not model.args.is_llama and seq.shape[1] > window:
                break
    return seq


def prompt(b: int = 2, s: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_cached_greedy_equals_recompute(family: str) -> None:
    model = tiny(family)
    x = prompt()
    got = generate(model, x, 12, temperature=0.0)
    assert got.shape == (2, 17)
    assert torch.equal(got, greedy_reference(model, x, 12))
    assert torch.equal(got[:, :5], x)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_context_window_limit(family: str) -> None:
    """max_seq_len=8: llama slides its window, gpt stops when positions run out; a prompt longer
    than the window is conditioned on its tail in both."""
    model = tiny(family, max_seq_len=8)
    for s in (5, 10):
        x = prompt(s=s)
        got = generate(model, x, 12, temperature=0.0)
        assert torch.equal(got, greedy_reference(model, x, 12))
        expected = s + 12 if family == "llama" else max(s, 8) + 1
        assert got.shape[1] == expected


def test_fp32_model_and_list_prompt() -> None:
    model = tiny("gpt", dtype=torch.float32)
    got = generate(model, [1, 2, 3], 4, temperature=0.0)
    assert got.shape == (1, 7) and got.dtype == torch.long
    assert got[0, :3].tolist() == [1, 2, 3]


def test_training_mode_restored() -> None:
    model = tiny("llama")
    model.train()
    generate(model, prompt(), 3)
    assert model.training


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_top_k_one_is_greedy(family: str) -> None:
    model = tiny(family)
    x = prompt()
    greedy = generate(model, x, 8, temperature=0.0)
    assert torch.equal(generate(model, x, 8, temperature=1.5, top_k=1, seed=4), greedy)


def test_seeded_sampling_reproducible() -> None:
    model = tiny("llama")
    x = prompt()
    a = generate(model, x, 16, temperature=3.0, top_p=0.95, seed=11)
    b = generate(model, x, 16, temperature=3.0, top_p=0.95, seed=11)
    c = generate(model, x, 16, temperature=3.0, top_p=0.95, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eod_stops_and_pads() -> None:
    model = tiny("gpt")
    x = prompt()
    free = generate(model, x, 12, temperature=0.0)
    eod = int(free[0, 5 + 3])  # row 0 emits this at its 4th new token (maybe earlier)
    first = [next((i for i, t in enumerate(free[r, 5:].tolist()) if t == eod), None)
             for r in range(2)]
    got = generate(model, x, 12, temperature=0.0, eod_id=eod)
    if first[1] is None:  # row 1 never emits eod: runs to the end
        assert got.shape[1] == 17
    else:
        assert got.shape[1] == 5 + max(first) + 1
    for r in range(2):
        stop = 5 + first[r] if first[r] is not None else got.shape[1]
        assert torch.equal(got[r, :stop + 1], free[r, :stop + 1][: got.shape[1]])
        assert (got[r, stop:] == eod).all()
    single = generate(model, x[:1], 12, temperature=0.0, eod_id=eod)
    assert single.shape[1] == 5 + first[0] + 1 and int(single[0, -1]) == eod


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(filter_logits(logits, top_p=p))[0].nonzero()[:, 0].tolist())
    # p sits off the exact cumulative sums (0.4, 0.7, 0.85, 0.95) so rounding cannot flip a case
    assert kept(0.39) == {1}  # 0.4 alone reaches 0.39
    assert kept(0.41) == {1, 3}
    assert kept(0.69) == {1, 3}
    assert kept(0.71) == {1, 3, 4}
    assert kept(0.9) == {1, 3, 4, 2}
    assert kept(0.96) == {0, 1, 2, 3, 4}
    assert kept(1e-6) == {1}  # at least one token survives
    # top-k first, then top-p on the renormalised top-k mass: {1, 3} -> 0.4/0.7 = 0.57 >= 0.5
    assert set(torch.isfinite(filter_logits(logits, top_k=2, top_p=0.5))[0]
               .nonzero()[:, 0].tolist()) == {1}
    # sampling never leaves the nucleus
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(2000, -1), 1.0, 0, 0.71, gen)
    assert set(draws.tolist()) == {1, 3, 4}
    freq = (draws == 1).double().mean().item()
    assert math.isclose(freq, 0.4 / 0.85, abs_tol=0.05)


def test_sample_next_basics() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 5.0]])
    assert sample_next(logits, 0.0, 0, 1.0, None).tolist() == [1, 2]
    assert sample_next(logits, 1.0, 1, 1.0, torch.Generator().manual_seed(1)).tolist() == [1, 2]
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0, 0, 1.0, None)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, 0, 0.0, None)
