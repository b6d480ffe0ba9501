"""AdamW over this rank's fp32 shards of the flat parameter groups (every ZeRO stage).

The optimizer sees, per group, the owned shard of the fp32 master weights, cut into *segments*
(the parts of parameters inside the shard): torch's AdamW steps each segment as if it were a
parameter, so the update is element for element the one ``torch.optim.AdamW`` makes on the
whole model, whatever the stage. Weight decay applies to segments of matrices and embeddings,
not of biases and norm weights (ndim < 2).

torch's fused AdamW kernel runs the update (on CPU and CUDA): one pass over parameter,
gradient and moments instead of the dozen whole-tensor passes of the per-tensor loop (19M fp32
parameters on one CPU thread: ~13 against ~75 ms). Its arithmetic is the same update with
another rounding of the intermediate terms: parameters move by about 1 ulp per step from the
loop's, far inside any loss tolerance.

- fp32 parameters: the owned parameter shard *is* the master (no copy).
- bf16/fp16 parameters: a separate fp32 master shard; after the step it is cast back into the
  owned parameter shard (then ``ZeroEngine.publish`` all-gathers stages 1-2).
- ``offload``: masters, AdamW moments and an fp32 gradient copy live in their own CPU buffers
  (pinned when the model is on a GPU) and the update runs there (ZeRO-Offload).

Gradient clipping and the fp16 overflow check share one all-reduce of the squared norm of the
owned gradient segments. The optimizer picks the group: every rank when the engine shards
gradients over dp, else the model-parallel group (tp x pp); parameters replicated over TP count
on TP rank 0 only, a last stage's tied copy of the embedding not at all (``ParamTable``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from megalite.parallel import comm
from megalite.zero import state as shard_state
from megalite.zero.engine import ZeroEngine


@torch.no_grad()
def publish_masters(engine: ZeroEngine, masters: Sequence[torch.Tensor],
                    aliased: Sequence[bool], values: Optional[Dict[str, torch.Tensor]] = None,
                    non_blocking: bool = False) -> None:
    """The model takes its fp32 master shards (one per flat group): with ``values`` (full
    per-parameter tensors) each master is first filled with this rank's slice of them; each is
    then cast into its owned parameter shard (nothing to cast where ``aliased``: the master
    *is* that shard — fp32, not offloaded; said, not found by data pointers, which fake
    tensors do not have) and ``ZeroEngine.publish`` spreads the shards. The optimizer's update
    and loads, and eval's weights-only load (no optimizer), all end here."""
    for g, master, same in zip(engine.groups, masters, aliased):
        if values is not None:
            master.copy_(engine.owned_slice(g, values))
        if not same:
            g.owned().copy_(master, non_blocking=non_blocking)
    engine.publish()


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
        self.fused = device.type in ("cpu", "cuda")  # torch's fused AdamW kernels
        self.opt = torch.optim.AdamW([x for x in groups if x["params"]], lr=lr, betas=betas,
                                     eps=eps, fused=self.fused or None)

    # ---- gradients ----------------------------------------------------------------------------
        dims = engine.dims
        self.norm_group = dims.world_group if engine.shards_over_dp else dims.mp_group
        self._norm_parts = self._counted_segments(engine, dims.tp_rank)
        # unscale-and-clip factor still owed by bf16/fp16 gradients: applied in fp32 in step()
        self._pending_coef: Optional[torch.Tensor] = None

    @staticmethod
    def _counted_segments(engine: ZeroEngine, tp_rank: int) -> List[torch.Tensor]:
        """The owned gradient segments this rank counts in the global norm (views)."""
        parts = []
        for g, grad in zip(engine.groups, engine.owned_grads()):
            for s in g.segments:
                info = engine.table.info(g.names[s.index])
                if not info.tied_copy and (info.tp_dim is not None or tp_rank == 0):
                    parts.append(grad[s.start:s.start + s.numel])
        return parts

    @torch.no_grad()
    def grad_norm_sq(self) -> torch.Tensor:
        """Sum of squares (fp32) of the owned gradient segments this rank counts. The norms are
        computed in fp32 whatever the gradients' dtype: an fp16 norm above 65504 would be inf
        (every such step skipped as an overflow) and a bf16 one rounded to 8 bits."""
        sq = torch.zeros((), dtype=torch.float32, device=self.engine.dims.device)
        if self._norm_parts:
            norms = torch._foreach_norm(self._norm_parts, 2, dtype=torch.float32)
            sq += torch.stack(norms).pow(2).sum()
        return sq

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float, loss_scale: float = 1.0) -> torch.Tensor:
        """The true global L2 norm of the gradients (divided by ``loss_scale``); scales the
        owned gradients by ``min(1, max_norm / norm) / loss_scale`` (unscale and clip in one
        multiply). A non-finite norm means an fp16 overflow somewhere: the caller skips the
        step (every rank sees the same reduced norm). fp32 gradients are scaled here; bf16/fp16
        ones in fp32 when ``step`` widens them (``coef`` cast to fp16 would underflow to 0 for a
        large norm under a large loss scale)."""
        self._pending_coef = None
        sq = self.grad_norm_sq()
        comm.all_reduce(sq, self.norm_group, self.engine.meter)
        norm = sq.sqrt() / loss_scale
        coef = torch.ones_like(norm) if max_norm <= 0 else torch.clamp(
            max_norm / (norm + 1e-6), max=1.0)
        coef = coef / loss_scale
        if max_norm > 0 or loss_scale != 1.0:
            for grad in self.engine.owned_grads():
                if grad.dtype == torch.float32:
                    grad.mul_(coef)
            self._pending_coef = coef
        return norm

    # ---- the update ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr
        grads = self.engine.owned_grads()
        owed: List[torch.Tensor] = []  # fp32 copies of bf16/fp16 gradients, not yet clipped
        for g, grad, segs, copy in zip(self.engine.groups, grads, self.segments,
                                       self.grad_copies):
            low_precision = grad.dtype != torch.float32
            if copy is not None:
                copy.copy_(grad, non_blocking=True)
                grad = copy
            elif low_precision:
                grad = grad.float()
            if low_precision and self._pending_coef is not None:
                owed.append(grad)
            for view, s in zip(segs, g.segments):
                view.grad = grad[s.start:s.start + s.numel]
        if self.offload and self.engine.dims.device.type == "cuda":
            torch.cuda.synchronize()
        for grad in owed:  # after the offload copies have landed
            grad.mul_(self._pending_coef.to(grad.device))
        self.opt.step()
        self._pending_coef = None
        for segs in self.segments:
            for view in segs:
                view.grad = None
        publish_masters(self.engine, self.masters, self.aliased, non_blocking=True)

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

    def state_dict(self) -> Dict[str, object]:
        """fp32 master weights and AdamW moments as N-d boxes of the global tensors (views of
        this rank's state, see ``zero/state.py``), and the step count."""
        self._ensure_moments()
        moments = {k: [[self.opt.state[v][k] for v in segs] for segs in self.segments]
                   for k in ("exp_avg", "exp_avg_sq")}
        out: Dict[str, object] = {"master": shard_state.entries(self.engine, self.segments)}
        out.update({k: shard_state.entries(self.engine, m) for k, m in moments.items()})
        out["step"] = self._step_count()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Inverse of ``state_dict`` for this rank's boxes; the parameters follow the masters."""
        mine = self.state_dict()
        for key in ("master", "exp_avg", "exp_avg_sq"):
            shard_state.load_entries(mine[key], state[key])
        for segs in self.segments:
            for v in segs:
                self.opt.state[v]["step"].fill_(float(state["step"]))
        publish_masters(self.engine, self.masters, self.aliased)

    def _ensure_moments(self) -> None:
        """AdamW creates its state at the first step; create it (zeros) for state I/O."""
        for segs in self.segments:
            for v in segs:
                if v not in self.opt.state or not self.opt.state[v]:
                    where = v.device if self.fused else "cpu"  # as AdamW's own first step
                    self.opt.state[v] = {"step": torch.zeros((), dtype=torch.float32,
                                                             device=where),
                                         "exp_avg": torch.zeros_like(v),
                                         "exp_avg_sq": torch.zeros_like(v)}

    def _step_count(self) -> int:
        for st in self.opt.state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    @torch.no_grad()
    def load(self, values: Dict[str, torch.Tensor], state: Optional[Dict]) -> None:
        """Restore fp32 master weights from full per-parameter ``values`` (the parameters
        follow them) and, when given, the AdamW moments of this rank's segments."""
        publish_masters(self.engine, self.masters, self.aliased, values)
        if state is not None:
            self.opt.load_state_dict(state)
            for group in self.opt.param_groups:  # a checkpoint's groups replace ours: keep
                group["fused"] = self.fused or None  # this run's kernel choice (its step
                for v in group["params"]:  # counts live beside the parameters)
                    st = self.opt.state.get(v, {})
                    if self.fused and "step" in st:
                        st["step"] = st["step"].to(v.device)
