"""AdamW over fp32 master weights, fed by a ``GradBuffer``.

- fp32 parameters with fp32 gradients: the model's parameters are the master weights; their
  ``.grad`` already is the buffer view, so the step is exactly ``torch.optim.AdamW``'s.
- bf16 parameters: the optimizer holds fp32 copies (the master weights) whose ``.grad`` is the
  fp32 gradient; after each step the master values are cast back into the bf16 parameters.

Weight decay applies to matrices and embeddings, not to biases and norm weights (ndim < 2).
Gradient clipping works on the flat buffer: one norm over one tensor.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn

from megalite.parallel import comm
from megalite.zero.grad_buffer import GradBuffer


class MixedPrecisionAdamW:
    def __init__(self, params: List[nn.Parameter], grads: GradBuffer, lr: float,
                 betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params, self.grads = params, grads
        self.separate_master = any(p.dtype != torch.float32 for p in params)
        if self.separate_master:
            self.master = [nn.Parameter(p.detach().float().clone()) for p in params]
        else:
            self.master = params
        decay = [m for m in self.master if m.ndim >= 2]
        no_decay = [m for m in self.master if m.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas,
                                     eps=eps)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float, norm_group=None, tp_rank: int = 0,
                       meter=None) -> torch.Tensor:
        """Global L2 norm of the gradients (in fp32); scales them to ``max_norm`` when larger.

        Data-parallel replicas hold the same averaged gradient: nothing to reduce over dp.
        ``norm_group`` spans the model-parallel ranks (tp x pp): parameters split over TP count
        their shard on every rank, replicated ones only on TP rank 0, and the last pipeline
        stage's copy of a tied embedding not at all, so each is counted exactly once."""
        if comm.group_size(norm_group) == 1:
            norm = self.grads.buffer.float().norm()
        else:
            counted = [p.main_grad for p in self.params
                       if not getattr(p, "pp_tied_copy", False)
                       and (getattr(p, "tp_sharded", False) or tp_rank == 0)]
            sq = torch.zeros((), dtype=torch.float32, device=self.grads.buffer.device)
            if counted:
                sq += torch.stack(torch._foreach_norm(counted)).float().pow(2).sum()
            comm.all_reduce(sq, norm_group, meter)
            norm = sq.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            self.grads.buffer.mul_(coef.to(self.grads.buffer.dtype))
        return norm

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.separate_master:
            for m, p in zip(self.master, self.params):
                m.grad = p.main_grad if p.main_grad.dtype == torch.float32 else p.main_grad.float()
        self.opt.step()
        if self.separate_master:
            for m, p in zip(self.master, self.params):
                p.copy_(m)

    def master_state(self) -> List[torch.Tensor]:
        return [m.detach() for m in self.master]

    def state_dict(self) -> Dict:
        return self.opt.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: Dict, master_values: List[torch.Tensor]) -> None:
        """Restore optimizer moments and fp32 master weights (parameters follow the masters)."""
        for m, p, v in zip(self.master, self.params, master_values):
            m.copy_(v)
            if self.separate_master:
                p.copy_(v)
        self.opt.load_state_dict(state)


def lr_at(step: int, steps: int, lr: float, min_lr: float, warmup: int, schedule: str,
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up to ``lr`` over
    ``warmup`` steps, then ``schedule`` down to ``min_lr`` at the last step."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "wsd":  # warm-up, stable, then linear decay over the last decay_fraction
        decay_steps = max(1, int(round(steps * decay_fraction)))
        start = steps - decay_steps
        if step < start:
            return lr
        return lr - (lr - min_lr) * min(1.0, (step - start + 1) / decay_steps)
    progress = min(1.0, (step - warmup + 1) / max(1, steps - warmup))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.lr_schedule={schedule!r}: use cosine, linear, constant or wsd")
