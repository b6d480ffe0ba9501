"""Autoregressive text sampling for ``CausalLM`` with a per-layer KV cache.

The prompt is prefilled in one forward pass, then each new token costs one single-token forward
over the cached keys/values. Sampling is temperature -> top-k -> top-p (nucleus), the order
Hugging Face uses, so the same knobs mean the same thing in both.

Seeds: row i of a batch samples from its own generator seeded ``seed + i``, so a row's draws do
not depend on the other rows, and ``megalite serve`` (one generator per request, choice k of a
request seeded ``seed + k``) draws exactly what ``generate`` draws for the same seed.

Context window (``model.args.max_seq_len`` = L): the model never attends over more than L
tokens. A prompt longer than L is conditioned on its last L tokens (the returned sequence still
holds the whole prompt). When the cache is full:
  * llama (RoPE, no position table): the window slides. The last L tokens are prefilled afresh
    for each further token (exact, but every such step costs a full L-token forward).
  * gpt (learned position table of size L): there is no position L to embed the next token at,
    so generation stops. The token predicted from a full window is still returned, so the output
    holds at most max(s, L) + 1 tokens.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from megalite.models import CausalLM, KVCache, ModelArgs

def decoder_problem(args: ModelArgs, where: str) -> Optional[str]:
    """Why ``where`` cannot generate text (an encoder: no next-token head), or None."""
    if not args.is_encoder:
        return None
    return (f"{where}: model family {args.family!r} is not a decoder (gpt, llama): an encoder "
            "has no next-token head to sample text from; use a gpt or llama checkpoint")


def row_generators(seed: int, rows: int, device: torch.device) -> List[torch.Generator]:
    """One private generator per row, row i seeded ``seed + i`` (see the module docstring)."""
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(rows)]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every token outside the top-k and then outside the nucleus: the smallest set
    of most probable tokens whose probability mass (renormalised after top-k) reaches ``top_p``.
    The most probable token always survives, so sampling never sees an all -inf row."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    neg_inf = float("-inf")
    if 0 < top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, neg_inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more probable tokens
        drop_sorted = mass_before >= top_p  # already reached p without this token
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg_inf)
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0,
                generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None
                ) -> torch.Tensor:
    """One token id per row of ``logits`` [b, vocab] -> [b]. ``temperature == 0`` is greedy
    (argmax; top-k/top-p are then irrelevant). Filtering runs in fp32 so bf16 logits do not
    collapse near-equal probabilities. ``generator``: one for all rows, or a list of one per
    row (each row then draws from its own)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = scaled.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).squeeze(-1)
                          for i, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _prefill(model: CausalLM, context: torch.Tensor) -> Tuple[List[KVCache], torch.Tensor]:
    """Fresh caches filled with ``context`` [b, s]; returns them and the last-position logits."""
    caches = [KVCache() for _ in range(model.args.num_layers)]
    logits = model(context, caches)
    return caches, logits[:, -1]


def _as_batch(prompt_ids: Union[Sequence[int], torch.Tensor], device: torch.device) -> torch.Tensor:
    """A list of ids is one row; a tensor is [s] or [b, s] (rows of equal length, no padding)."""
    seq = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if seq.dim() == 1:
        seq = seq.unsqueeze(0)
    if seq.dim() != 2 or seq.shape[1] == 0:
        raise ValueError(f"prompt must be non-empty [s] or [b, s], got shape {tuple(seq.shape)}")
    return seq


@torch.no_grad()
def generate(model: CausalLM, prompt_ids: Union[Sequence[int], torch.Tensor],
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, eod_id: Optional[int] = None) -> torch.Tensor:
    """Extend the prompt by up to ``max_new_tokens`` tokens -> [b, s + new] (long).

    Stops early when every row has emitted ``eod_id`` (rows that finished first are padded with
    ``eod_id``) or, for gpt, when the position table is exhausted (see the module docstring).
    ``seed`` seeds private generators (row i: ``seed + i``), so results do not depend on or
    disturb the global RNG.
    The model is run in eval mode (dropout off) and its previous mode is restored afterwards.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    seq = _as_batch(prompt_ids, device)
    if max_new_tokens == 0:
        return seq
    window = model.args.max_seq_len
    generators = row_generators(seed, seq.shape[0], device)
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        caches, logits = _prefill(model, seq[:, -window:])
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generators)
            if eod_id is not None:
                token = token.masked_fill(done, eod_id)
                done |= token == eod_id
            seq = torch.cat([seq, token.unsqueeze(1)], dim=1)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if caches[0].length < window:
                logits = model(token.unsqueeze(1), caches)[:, -1]
            elif model.args.is_llama:  # slide the window: recompute over the last L tokens
                caches, logits = _prefill(model, seq[:, -window:])
            else:  # gpt: no learned position left for the next token
                break
    finally:
        model.train(was_training)
    return seq
