"""AdamW over this rank's fp32 shards of the flat parameter groups (every ZeRO stage).

The optimizer sees, per group, the owned shard of the fp32 master weights, cut into *segments*
(the parts of parameters inside the shard): torch's AdamW steps each segment as if it were a
parameter, so the update is element for element the one ``torch.optim.AdamW`` makes on the
whole model, whatever the stage. Weight decay applies to segments of matrices and embeddings,
not of biases and norm weights (ndim < 2).

- fp32 parameters: the owned parameter shard *is* the master (no copy).
- bf16/fp16 parameters: a separate fp32 master shard; after the step it is cast back into the
  owned parameter shard (then ``ZeroEngine.publish`` all-gathers stages 1-2).
- ``offload``: masters, AdamW moments and an fp32 gradient copy live in their own CPU buffers
  (pinned when the model is on a GPU) and the update runs there (ZeRO-Offload).

Gradient clipping and the fp16 overflow check share one all-reduce of the squared norm of the
owned gradient segments: over dp x tp x pp when gradients are sharded over dp, else over tp x
pp; parameters replicated over TP count on TP rank 0 only, a last stage's tied copy not at all.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from megalite.parallel import comm
from megalite.zero.engine import ZeroEngine


class ShardedAdamW:
    def __init__(self, engine: ZeroEngine, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, offload: bool = False):
        self.engine, self.offload = engine, offload
        device = torch.device("cpu") if offload else engine.dims.device
        pin = offload and engine.dims.device.type == "cuda"
        self.masters: List[torch.Tensor] = []
        self.aliased: List[bool] = []  # master is the parameter shard itself
        self.grad_copies: List[Optional[torch.Tensor]] = []  # fp32 gradients on the optimizer side
        decay, no_decay = [], []
        self.segments: List[List[torch.Tensor]] = []
        for g in engine.groups:
            owned = g.owned()
            self.aliased.append(owned.dtype == torch.float32 and not offload)
            if self.aliased[-1]:
                master = owned  # the parameters are the master weights
            else:
                master = torch.empty(owned.shape, dtype=torch.float32, device=device,
                                     pin_memory=pin)
                master.copy_(owned)
            self.masters.append(master)
            self.grad_copies.append(torch.zeros(g.shard_numel, dtype=torch.float32, device=device,
                                                pin_memory=pin) if offload else None)
            segs = g.segment_views(master)
            self.segments.append(segs)
            for s, view in zip(g.segments, segs):
                (decay if g.params[s.index].ndim >= 2 else no_decay).append(view)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([x for x in groups if x["params"]], lr=lr, betas=betas,
                                     eps=eps)

    # ---- gradients ----------------------------------------------------------------------------
    @torch.no_grad()
    def grad_norm_sq(self, tp_rank: int) -> torch.Tensor:
        """Sum of squares (fp32) of the owned gradient segments this rank counts."""
        parts = []
        for g in self.engine.groups:
            for s in g.segments:
                p = g.params[s.index]
                if getattr(p, "pp_tied_copy", False):
                    continue
                if getattr(p, "tp_sharded", False) or tp_rank == 0:
                    parts.append(g.grad_shard[s.start:s.start + s.numel])
        sq = torch.zeros((), dtype=torch.float32, device=self.engine.dims.device)
        if parts:
            sq += torch.stack(torch._foreach_norm(parts)).float().pow(2).sum()
        return sq

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float, norm_group, tp_rank: int = 0, meter=None,
                       loss_scale: float = 1.0) -> torch.Tensor:
        """The true global L2 norm of the gradients (divided by ``loss_scale``); scales the
        owned gradients by ``min(1, max_norm / norm) / loss_scale`` (unscale and clip in one
        multiply). A non-finite norm means an fp16 overflow somewhere: the caller skips the
        step (every rank sees the same reduced norm)."""
        sq = self.grad_norm_sq(tp_rank)
        comm.all_reduce(sq, norm_group, meter)
        norm = sq.sqrt() / loss_scale
        coef = torch.ones_like(norm) if max_norm <= 0 else torch.clamp(
            max_norm / (norm + 1e-6), max=1.0)
        coef = coef / loss_scale
        if max_norm > 0 or loss_scale != 1.0:
            for grad in self.engine.owned_grads():
                grad.mul_(coef.to(grad.dtype))
        return norm

    # ---- the update ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr
        for g, segs, copy in zip(self.engine.groups, self.segments, self.grad_copies):
            grad = g.grad_shard
            if copy is not None:
                copy.copy_(grad, non_blocking=True)
                grad = copy
            elif grad.dtype != torch.float32:
                grad = grad.float()
            for view, s in zip(segs, g.segments):
                view.grad = grad[s.start:s.start + s.numel]
        if self.offload and self.engine.dims.device.type == "cuda":
            torch.cuda.synchronize()
        self.opt.step()
        for segs in self.segments:
            for view in segs:
                view.grad = None
        for g, master, aliased in zip(self.engine.groups, self.masters, self.aliased):
            if not aliased:
                g.owned().copy_(master, non_blocking=True)
        self.engine.publish()

    # ---- accounting and state ---------------------------------------------------------------
    def memory(self) -> Dict[str, int]:
        def nbytes(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        masters = [m for m, aliased in zip(self.masters, self.aliased) if not aliased]
        if self.opt.state:
            states = nbytes(t for st in self.opt.state.values() for t in st.values()
                            if isinstance(t, torch.Tensor) and t.numel() > 1)
        else:  # AdamW allocates its two fp32 moments at the first step: count them already
            states = 8 * sum(m.numel() for m in self.masters)
        out = {"master": nbytes(masters), "optimizer": states}
        if self.offload:
            out["offload_grads"] = nbytes(self.grad_copies)
        return out

    def state_dict(self) -> Dict:
        return self.opt.state_dict()

    @torch.no_grad()
    def load(self, values: Dict[str, torch.Tensor], state: Optional[Dict]) -> None:
        """Restore fp32 master weights from full per-parameter ``values`` (the parameters
        follow them) and, when given, the AdamW moments of this rank's segments."""
        for g, master, aliased in zip(self.engine.groups, self.masters, self.aliased):
            master.copy_(self.engine.owned_slice(g, values))
            if not aliased:
                g.owned().copy_(master)
        self.engine.publish()
        if state is not None:
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
