"""ZeRO stages 0-3 over the data-parallel group, as flat shards per layer unit.

The model's units (embed, blocks, head) are cut into ``FlatGroup``s of at most one bucket
(``parallel.bucket_mb``); with stage >= 1 each group is padded to a multiple of dp and rank r
owns slice r. What each stage keeps on a rank:

=====  ==================  ==========================================  ================
stage  parameters          gradients                                   master + AdamW
=====  ==================  ==========================================  ================
0      full                full; all-reduced (mean) on the last micro  full
1      full                full; reduce-scattered on the last micro    owned shard
2      full                owned shard: each micro-batch's gradients   owned shard
                           are reduce-scattered and added into it
                           (``zero2_accumulate=shard``); or as stage 1
                           (``full``: accumulate, reduce-scatter once)
3      owned shard; a      owned shard, as stage 2 ``shard``           owned shard
       unit's groups are
       gathered before its
       forward and its
       backward, freed after
=====  ==================  ==========================================  ================

After the optimizer updates the owned shard, stages 1-2 all-gather the parameters (so stage 1
moves reduce-scatter + all-gather = what one all-reduce moves); stage 3 just keeps the shard.

Gradients arrive through post-accumulate hooks. A group whose gradients are all in is reduced
asynchronously while backward carries on (at most two reductions in flight, so no more than two
groups' temporary buffers exist at once).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Sequence, Set

import torch
import torch.nn as nn

from megalite.parallel import comm
from megalite.parallel.dims import ParallelDims
from megalite.zero.flat import FlatGroup

Fill = Callable[[str, torch.Size], torch.Tensor]


class _PreBackward(torch.autograd.Function):
    """Identity whose backward first calls ``hook`` (gathers a unit's parameters before the
    unit's own backward runs)."""

    @staticmethod
    def forward(ctx, x, hook):
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.hook()
        return grad, None


class ZeroEngine:
    def __init__(self, stage: int, dims: ParallelDims, dtype: torch.dtype,
                 grad_dtype: torch.dtype, bucket_mb: float = 25.0,
                 zero2_accumulate: str = "shard", reshard_after_forward: bool = True,
                 solo: Sequence[str] = ()):
        self.stage, self.dims = stage, dims
        self.dtype, self.grad_dtype = dtype, grad_dtype
        self.bucket_mb, self.solo = bucket_mb, set(solo)
        self.group = dims.dp_group
        self.dp = comm.group_size(self.group)
        self.shards = self.dp if stage >= 1 else 1
        self.shard_rank = dims.dp_rank if stage >= 1 else 0
        # gradients: "full" buffer reduced once per step, or reduced into the owned "shard"
        self.grad_mode = "shard" if stage == 3 or (stage == 2 and zero2_accumulate == "shard") \
            else "full"
        self.reshard_after_forward = reshard_after_forward
        self.meter = dims.meter
        self.groups: List[FlatGroup] = []
        self.unit_groups: List[List[FlatGroup]] = []
        self._sync = False
        self._inflight: list = []
        self.peak_param_bytes = 0  # ZeRO-3: shards + gathered groups, highest seen
        self.peak_temp_bytes = 0  # gradient temporaries of reductions, highest seen

    # ---- build --------------------------------------------------------------------------------
    def materialize(self, model: nn.Module, fill: Fill) -> None:
        """``models.build_model`` hook: allocate the meta-device ``model`` group by group and
        fill it (``fill(name, shape)`` gives a parameter's values). With ZeRO-3 each group keeps
        only this rank's shard once filled, so the full model never exists on one rank."""
        names = {id(p): n for n, p in model.named_parameters()}
        units = model.units()  # CausalLM or PipelineStage, in forward order
        unit_params = [list(u.parameters()) for u in units]  # before any is replaced
        bucket = max(1, int(self.bucket_mb * 2**20 * 8 / torch.finfo(self.grad_dtype).bits))
        seen: Set[int] = set()
        device = self.dims.device
        for params in unit_params:
            mine = [p for p in params if id(p) not in seen]
            seen.update(id(p) for p in mine)
            groups: List[List[nn.Parameter]] = []
            run: List[nn.Parameter] = []
            for p in reversed(mine):  # roughly the order backward produces gradients
                solo = names[id(p)] in self.solo
                if run and (solo or sum(q.numel() for q in run) + p.numel() > bucket):
                    groups.append(run)
                    run = []
                run.append(p)
                if solo:
                    groups.append(run)
                    run = []
            if run:
                groups.append(run)
            for members in groups:
                g = FlatGroup([names[id(p)] for p in members], members, self.shards,
                              self.shard_rank)
                new = g.materialize(fill, self.dtype, device)
                _replace_params(model, dict(zip(map(id, members), new)))
                self.groups.append(g)
                self._track_params()  # ZeRO-3: earlier groups' shards + this full group
                if self.stage == 3:
                    g.keep_shard_only()
        self.group_of: Dict[nn.Parameter, FlatGroup] = {}
        for g in self.groups:
            for p in g.params:
                self.group_of[p] = g
        self.unit_groups = []
        self.last_use: Dict[FlatGroup, int] = {}  # the last unit (in forward order) using it
        for i, unit in enumerate(units):
            gs = []
            for p in unit.parameters():
                if self.group_of[p] not in gs:
                    gs.append(self.group_of[p])
                self.last_use[self.group_of[p]] = i
            self.unit_groups.append(gs)

    def attach(self, model: nn.Module) -> None:
        """Gradient storage and hooks; call once the model is built (and annotated)."""
        self.model = model
        for g in self.groups:
            g.n_grads = sum(p.requires_grad for p in g.params)
            g.index = {p: i for i, p in enumerate(g.params)}
            g.pending = g.n_grads
            g.temp = None
            if self.grad_mode == "full":
                g.grad_full = torch.zeros(g.numel, dtype=self.grad_dtype, device=g.flat.device)
                g.grad_shard = g.grad_full[g.lo:g.hi]
                for p, view in zip(g.params, g.param_views(g.grad_full)):
                    p.main_grad = view
            else:
                g.grad_full = None
                g.grad_shard = torch.zeros(g.shard_numel, dtype=self.grad_dtype,
                                           device=g.flat.device)
            for p in g.params:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._point_grads()
        if self.stage == 3:
            for i, unit in enumerate(model.units()):
                unit.register_forward_pre_hook(functools.partial(self._pre_forward, i))
                unit.register_forward_hook(functools.partial(self._post_forward, i))

    def _point_grads(self) -> None:
        """Same dtype: autograd accumulates straight into the full buffer (no copy)."""
        if self.grad_mode == "full":
            for g in self.groups:
                for p in g.params:
                    if p.dtype == self.grad_dtype:
                        p.grad = p.main_grad

    # ---- gradients ----------------------------------------------------------------------------
    def sync_next_backward(self, enabled: bool) -> None:
        """Full-gradient modes: reduce during the coming backward (the step's last
        micro-batch) or not. The sharded mode reduces every micro-batch anyway."""
        self._sync = enabled and self.dp > 1

    @torch.no_grad()
    def _on_grad_ready(self, p: nn.Parameter) -> None:
        g = self.group_of[p]
        if self.grad_mode == "full":
            if p.grad is not p.main_grad:
                p.main_grad.add_(p.grad)
                p.grad = None
        else:
            if g.temp is None:  # only the padding needs zeros: each parameter writes its part
                g.temp = torch.empty(g.numel, dtype=self.grad_dtype, device=p.device)
                g.temp[g.used:].zero_()
                g.filled = set()
                self._track_temp()
            i = g.index[p]
            o = g.offsets[i]
            # pre-divided by dp (sum of grad/dp == mean), in the copy's pass when dtypes agree
            view = g.temp[o:o + p.numel()].view_as(p)
            if p.grad.dtype == view.dtype:
                torch.div(p.grad, self.dp, out=view)
            else:  # bf16/fp16 gradient into fp32: divide after the exact upcast
                view.copy_(p.grad).div_(self.dp)
            g.filled.add(i)
            p.grad = None
        g.pending -= 1
        if g.pending == 0:
            g.pending = g.n_grads
            if self.grad_mode == "shard" or self._sync:
                self._launch(g)
                if self.stage == 3 and self.reshard_after_forward:
                    g.wait()
                    g.free()

    def _launch(self, g: FlatGroup) -> None:
        """Reduce a group's gradients asynchronously. Reduce-scatters run in place: the output
        is this rank's chunk of the input (the full buffer, or the bucket), so no extra shard
        buffer exists; a bucket's chunk is added into the owned shard once it is done."""
        if self.grad_mode == "full":
            if self.dp == 1:
                return
            g.grad_full.div_(self.dp)  # sum of grad/dp == mean, on every backend
            if self.shards == 1:
                work = comm.all_reduce(g.grad_full, self.group, self.meter, async_op=True)
            else:  # into grad_shard, the owned chunk of grad_full
                work = comm.reduce_scatter_into(g.grad_shard, g.grad_full, self.group,
                                                self.meter, async_op=True)
            self._inflight.append((g, work, None))
        else:
            bucket, g.temp = g.temp, None
            if len(g.filled) < len(g.params):
                for i in set(range(len(g.params))) - g.filled:  # no gradient this backward
                    o = g.offsets[i]
                    bucket[o:o + g.params[i].numel()].zero_()
            work = comm.reduce_scatter_into(bucket[g.lo:g.hi], bucket, self.group, self.meter,
                                            async_op=True)
            self._inflight.append((g, work, bucket))
        g.launched = True
        while len(self._inflight) > 2:
            self._complete(self._inflight.pop(0))

    def _complete(self, entry) -> None:
        g, work, bucket = entry
        if work is not None:
            work.wait()
        if bucket is not None:
            g.grad_shard.add_(bucket[g.lo:g.hi])

    def finish(self) -> None:
        """Wait for every reduction, first launching those not launched during backward
        (parameters without a gradient, or a schedule that reduces only at the end)."""
        for g in self.groups:
            pending_full = self.grad_mode == "full" and self.dp > 1 and not g.launched
            if pending_full or (self.grad_mode == "shard" and g.temp is not None):
                self._launch(g)
        while self._inflight:
            self._complete(self._inflight.pop(0))
        self._sync = False

    def zero_grad(self) -> None:
        """Start a step: zero gradients, no reduction in flight."""
        for g in self.groups:
            g.grad_shard.zero_() if g.grad_full is None else g.grad_full.zero_()
            g.temp, g.launched, g.pending = None, False, g.n_grads
        self._sync = False
        self._point_grads()

    def owned_grads(self) -> List[torch.Tensor]:
        """This rank's reduced gradient shard of each group (after ``finish``)."""
        return [g.grad_shard for g in self.groups]

    def reduce_partial(self, tp_group) -> None:
        """Sum over the TP group the gradients of replicated parameters that each TP rank only
        partly computed (``tp_partial_grad``: sequence-parallel norms, replicated kv heads), in
        one all-reduce of their owned segments (TP ranks share the flat layout). Sums commute,
        so doing it after the dp reduction is equivalent."""
        if comm.group_size(tp_group) == 1:
            return
        parts = [(g.grad_shard, s) for g in self.groups for s in g.segments
                 if getattr(g.params[s.index], "tp_partial_grad", False)]
        if not parts:
            return
        flat = torch.cat([t[s.start:s.start + s.numel] for t, s in parts])
        comm.all_reduce(flat, tp_group, self.meter)
        offset = 0
        for t, s in parts:
            t[s.start:s.start + s.numel].copy_(flat[offset:offset + s.numel])
            offset += s.numel

    def grad_of(self, p: nn.Parameter) -> torch.Tensor:
        """The owned, reduced gradient of a parameter that is alone in its group (``solo``:
        the tied embedding and its copy on the last pipeline stage), flat."""
        g = self.group_of[p]
        assert len(g.params) == 1, "grad_of needs a parameter alone in its group"
        return g.grad_shard

    # ---- ZeRO-3 parameter gathering -------------------------------------------------------
    def _gather(self, groups: List[FlatGroup], async_op: bool) -> None:
        for g in groups:
            g.gather(self.group, self.meter, async_op=async_op)
        self._track_params()

    def _ensure(self, i: int) -> None:
        for g in self.unit_groups[i]:
            g.gather(self.group, self.meter)
            g.wait()
        self._track_params()

    def _pre_forward(self, i: int, module, args) -> None:
        self._ensure(i)
        if i + 1 < len(self.unit_groups):
            self._gather(self.unit_groups[i + 1], async_op=True)

    def _post_forward(self, i: int, module, args, output):
        if self.reshard_after_forward:
            for g in self.unit_groups[i]:
                if self.last_use[g] > i:  # a tied weight a later unit uses: keep it gathered
                    continue
                g.wait()
                g.free()
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            return _PreBackward.apply(output, functools.partial(self._pre_backward, i))
        return output

    def _pre_backward(self, i: int) -> None:
        self._ensure(i)
        if i > 0:
            self._gather(self.unit_groups[i - 1], async_op=True)

    def release(self) -> None:
        """ZeRO-3: free every gathered group (after the optimizer step: they are stale)."""
        if self.stage != 3:
            return
        for g in self.groups:
            g.wait()
            if g.gathered:
                g.free()

    def _track_params(self) -> None:
        if self.stage != 3:
            return
        live = sum(g.shard.numel() * g.shard.element_size() for g in self.groups
                   if g.shard is not None)
        live += sum(g.full_bytes for g in self.groups if g.gathered or g.handle is not None)
        self.peak_param_bytes = max(self.peak_param_bytes, live)

    def _track_temp(self) -> None:
        live = sum(g.numel * g.grad_shard.element_size() for g in self.groups
                   if g.temp is not None)
        live += sum(e[2].numel() * e[2].element_size() for e in self._inflight
                    if e[2] is not None)
        self.peak_temp_bytes = max(self.peak_temp_bytes, live)

    # ---- after the optimizer step -----------------------------------------------------------
    def publish(self) -> None:
        """The owned parameter shards were updated: stages 1-2 all-gather them into every
        rank's full parameters; stage 3 frees stale gathered copies."""
        if self.stage == 3:
            self.release()
            return
        if self.shards == 1:
            return
        works = [g.all_gather_params(self.group, self.meter) for g in self.groups]
        for w in works:
            if w is not None:
                w.wait()

    # ---- accounting -----------------------------------------------------------------------------
    def memory_report(self, optimizer=None) -> Dict[str, int]:
        """Model-state bytes held on this rank, by kind (persistent tensors only; ZeRO-3's
        transiently gathered groups are in ``peak_param_bytes``)."""
        def nbytes(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        if self.stage == 3:
            params = nbytes(g.shard for g in self.groups)
        else:
            params = nbytes(g.flat for g in self.groups)
        grads = nbytes(g.grad_full if g.grad_full is not None else g.grad_shard
                       for g in self.groups)
        report = {"params": params, "grads": grads, "master": 0, "optimizer": 0,
                  "buffers": nbytes(b for b in self.model.buffers())}
        if optimizer is not None:
            report.update(optimizer.memory())
        report["total"] = sum(report.values())
        return report

    # ---- checkpoints ------------------------------------------------------------------------
    def full_values(self, shards: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Collective over dp: name -> full value of every parameter, from each group's owned
        shard of some per-group tensor (the fp32 master weights), one group at a time."""
        out: Dict[str, torch.Tensor] = {}
        for g, shard in zip(self.groups, shards):
            if self.shards == 1:
                full = shard
            else:
                full = torch.empty(g.numel, dtype=shard.dtype, device=self.dims.device)
                comm.all_gather_into(full, shard.to(full.device), self.group)
            out.update({n: v.cpu() for n, v in g.values(full).items()})
        return out

    def layout(self) -> Dict[str, object]:
        """What the optimizer state's shape depends on (checkpoints must match it)."""
        return {"shards": self.shards, "bucket_mb": self.bucket_mb,
                "grad_dtype": str(self.grad_dtype).replace("torch.", "")}

    def owned_slice(self, g: FlatGroup, values: Dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's shard of a group, built from full per-parameter values."""
        full = torch.zeros(g.numel, dtype=torch.float32)
        for n, o, p in zip(g.names, g.offsets, g.params):
            full[o:o + p.numel()] = values[n].reshape(-1).float()
        return full[g.lo:g.hi]


def _replace_params(model: nn.Module, new: Dict[int, nn.Parameter]) -> None:
    """Swap parameters (by identity) in every module that holds them (tied ones included)."""
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and id(p) in new:
                module._parameters[key] = new[id(p)]
