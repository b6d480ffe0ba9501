"""ZeRO stages 0-3 over the data-parallel group, as flat shards per layer unit.

The model's units (embed, blocks, head) are cut into ``FlatGroup``s of at most one bucket
(``parallel.bucket_mb``); with stage >= 1 each group is padded to a multiple of dp and rank r
owns slice r. What each stage keeps on a rank:

=====  ==================  ==========================================  ================
stage  parameters          gradients                                   master + AdamW
=====  ==================  ==========================================  ================
0      full                full; all-reduced (summed: the loss is      full
                           already a global mean) once the step's
                           last contribution is in
1      full                full; reduce-scattered likewise             owned shard
2      full                owned shard: each micro-batch's gradients   owned shard
                           are reduce-scattered and added into it
                           (``zero2_accumulate=shard``); or as stage 1
                           (``full``: accumulate, reduce-scatter once)
3      owned shard; a      owned shard, as stage 2 ``shard``           owned shard
       unit's groups are
       gathered before its
       forward and its
       backward
=====  ==================  ==========================================  ================

After the optimizer updates the owned shard, stages 1-2 all-gather the parameters (so stage 1
moves reduce-scatter + all-gather = what one all-reduce moves); stage 3 just keeps the shard.
With one pipeline stage, stage 3 keeps the last unit gathered from its forward into its
backward, which comes right after (FSDP2 treats its root module so).

Gradients arrive through post-accumulate hooks and, for the weight gradients a split backward
(zb-h1) defers to its W pass, through ``on_grad_ready`` called by the weight-gradient store. A
group is reduced asynchronously as soon as its contributions are in (``zero/grads.py``): the
step's last one with full gradients — counted, so it is the last B or W pass of the group's
chunk whatever the schedule — or each bucket's with sharded ones. At most two reductions are in
flight. ``finalize_grads`` waits for them and adds the TP partial sums and the tied-embedding
sync: afterwards ``owned_grads()`` are the finished gradients.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence, Set, Union

import torch
import torch.nn as nn

from megalite.models.transformer import TIED_WEIGHTS
from megalite.parallel import comm
from megalite.parallel.dims import ParallelDims
from megalite.parallel.params import ParamTable
from megalite.zero import state as shard_state
from megalite.zero.flat import FlatGroup
from megalite.zero.grads import FullGrads, ShardGrads

TIED = TIED_WEIGHTS  # alone in their group when tied across stages


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
                 zero2_accumulate: str = "shard", reshard_after_forward: Union[bool, str] = "auto",
                 tied_across_stages: bool = False):
        self.stage, self.dims = stage, dims
        self.dtype, self.grad_dtype, self.bucket_mb = dtype, grad_dtype, bucket_mb
        self.group, self.meter = dims.dp_group, dims.meter
        self.dp = comm.group_size(self.group)
        self.shards = self.dp if stage >= 1 else 1
        self.shard_rank = dims.dp_rank if stage >= 1 else 0
        if stage == 3 or (stage == 2 and zero2_accumulate == "shard"):
            self.policy: Union[FullGrads, ShardGrads] = ShardGrads(grad_dtype, self.group,
                                                                   self.meter)
        else:
            self.policy = FullGrads(grad_dtype, self.group, self.dp, self.shards, self.meter)
        # auto: keep a unit gathered from its forward to its backward when pp > 1 (other
        # micro-batches' forwards come between them; torchtitan's default), else free it
        choice = {"auto": dims.pp == 1, "true": True, "false": False}.get(
            str(reshard_after_forward).lower())
        if choice is None:
            raise ValueError(f"zero3_reshard_after_forward={reshard_after_forward!r}: use auto, "
                             f"true or false")
        self.reshard_after_forward = choice
        self.solo: Set[str] = set(TIED) if tied_across_stages else set()
        self.groups: List[FlatGroup] = []
        self.unit_groups: List[List[FlatGroup]] = []
        self._inflight: list = []
        self.peak_param_bytes = 0  # ZeRO-3: shards + gathered groups, highest seen
        self.peak_temp_bytes = 0  # gradient buckets of sharded reductions, highest seen

    @property
    def shards_over_dp(self) -> bool:
        """Does each dp rank own a different part of the gradients and optimizer state?"""
        return self.shards > 1

    # ---- build --------------------------------------------------------------------------------
    def materialize(self, model: nn.Module, fill) -> None:
        """``models.build_model`` hook: allocate the meta-device ``model`` group by group and
        fill it (``fill(name, shape)`` gives a parameter's values). With ZeRO-3 each group keeps
        only this rank's shard once filled, so the full model never exists on one rank."""
        names = {id(p): n for n, p in model.named_parameters()}
        units = model.units()  # in forward order
        unit_params = [list(u.parameters()) for u in units]  # before any is replaced
        bucket = max(1, int(self.bucket_mb * 2**20 * 8 / torch.finfo(self.grad_dtype).bits))
        seen: Set[int] = set()
        for u, params in enumerate(unit_params):
            mine = [p for p in params if id(p) not in seen]
            seen.update(id(p) for p in mine)
            for members in self._cut(mine, names, bucket):
                g = FlatGroup([names[id(p)] for p in members], members, self.shards,
                              self.shard_rank, unit=u)
                new = g.materialize(fill, self.dtype, self.dims.device)
                _replace_params(model, dict(zip(map(id, members), new)))
                self.groups.append(g)
                self._track_params()  # ZeRO-3: earlier groups' shards + this full group
                if self.stage == 3:
                    g.keep_shard_only()
        self.group_of: Dict[nn.Parameter, FlatGroup] = {p: g for g in self.groups
                                                        for p in g.params}
        self.unit_groups = [[] for _ in units]
        self.last_use: Dict[FlatGroup, int] = {}  # the last unit (in forward order) using it
        for i, unit in enumerate(units):
            for p in unit.parameters():
                g = self.group_of[p]
                if g not in self.unit_groups[i]:
                    self.unit_groups[i].append(g)
                self.last_use[g] = i

    def _cut(self, params: List[nn.Parameter], names, bucket: int) -> List[List[nn.Parameter]]:
        """Runs of at most one bucket, in roughly the order backward produces gradients."""
        groups, run = [], []
        for p in reversed(params):
            solo = names[id(p)] in self.solo
            if run and (solo or sum(q.numel() for q in run) + p.numel() > bucket):
                groups.append(run)
                run = []
            run.append(p)
            if solo:
                groups.append(run)
                run = []
        return groups + ([run] if run else [])

    def attach(self, model: nn.Module) -> None:
        """Gradient storage and hooks; call once the model is built."""
        self.model = model
        self.table: ParamTable = model.shard_layout
        for g in self.groups:
            g.grad = self.policy.allocate(g)
            for p in g.params:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self.on_grad_ready)
        if self.stage == 3:
            for i, unit in enumerate(model.units()):
                unit.register_forward_pre_hook(functools.partial(self._pre_forward, i))
                unit.register_forward_hook(functools.partial(self._post_forward, i))

    # ---- gradients ----------------------------------------------------------------------------
    def begin_step(self, num_micro: int, split: bool = False) -> None:
        """Zero the gradients for a step of ``num_micro`` micro-batches: each parameter gets
        one contribution per micro-batch, from its backward or, when the backward is ``split``
        (zb-h1), for deferred weights from the W pass. Called by the executor."""
        for g in self.groups:
            self.policy.begin(g, num_micro, split)
        self._inflight = []

    @torch.no_grad()
    def on_grad_ready(self, p: nn.Parameter) -> None:
        """A contribution to ``p``'s gradient is in ``p.grad`` (or added to its ``main_grad``).
        A call with no gradient (autograd's hook on a weight whose dW was deferred) is none."""
        if p.grad is not None:
            self.on_weight_grad(p)

    @torch.no_grad()
    def on_weight_grad(self, p: nn.Parameter) -> None:
        """A split backward's W pass added a deferred weight gradient (into ``main_grad`` or
        ``p.grad``): one contribution."""
        g = self.group_of[p]
        if self.policy.on_grad(g, p):
            self._launch(g)
            if self.stage == 3 and self.reshard_after_forward:
                g.wait()
                g.free()

    def _launch(self, g: FlatGroup) -> None:
        work, bucket = self.policy.launch(g)
        self._inflight.append((g, work, bucket))
        # the bucket peak: nothing is freed between a bucket's allocation and the next launch,
        # so measuring here (before completing older reductions) sees every peak
        self._track_temp()
        while len(self._inflight) > 2:
            self._complete(self._inflight.pop(0))

    def _complete(self, entry) -> None:
        g, work, bucket = entry
        if work is not None:
            work.wait()
        self.policy.complete(g, bucket)

    def finalize_grads(self) -> None:
        """Finish the step's gradients: launch what backward did not (parameters without a
        gradient), wait for every reduction, sum TP-partial gradients over the TP group and
        the tied embedding's over its two stages."""
        for g in self.groups:
            if self.policy.needs_launch(g):
                self._launch(g)
        while self._inflight:
            self._complete(self._inflight.pop(0))
        self._reduce_partial()
        self._sync_tied()

    def owned_grads(self) -> List[torch.Tensor]:
        """This rank's reduced gradient shard of each group (after ``finalize_grads``)."""
        return [g.grad.shard for g in self.groups]

    def _reduce_partial(self) -> None:
        """Replicated parameters each TP rank only partly computed (sequence-parallel norms,
        replicated kv heads): one all-reduce of their owned segments over TP (TP ranks share
        the flat layout; sums commute, so after the dp reduction is equivalent)."""
        tp_group = self.dims.tp_group
        if comm.group_size(tp_group) == 1:
            return
        parts = [(g.grad.shard, s) for g in self.groups for s in g.segments
                 if self.table.info(g.names[s.index]).partial_grad]
        if not parts:
            return
        flat = torch.cat([t[s.start:s.start + s.numel] for t, s in parts])
        comm.all_reduce(flat, tp_group, self.meter)
        offset = 0
        for t, s in parts:
            t[s.start:s.start + s.numel].copy_(flat[offset:offset + s.numel])
            offset += s.numel

    def _sync_tied(self) -> None:
        """Sum the gradients of the embedding (first stage) and its tied copy (last stage), so
        both take the same step; both are alone in a group laid out alike, so the owned
        shards line up."""
        for g in self.groups:
            if g.names[0] in self.solo:
                comm.all_reduce(g.grad.shard, self.dims.embed_group, self.meter)

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
        # one stage: the last unit's backward follows its forward (only the loss between)
        backward_next = (i == len(self.unit_groups) - 1 and self.dims.pp == 1
                         and torch.is_grad_enabled())
        if self.reshard_after_forward and not backward_next:
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

    def _release(self) -> None:
        """ZeRO-3: free every gathered group (after the optimizer step: they are stale)."""
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
        if not self.policy.sharded:
            return
        live = sum(self.policy.bucket_bytes(g) for g in self.groups)
        live += sum(e[2].numel() * e[2].element_size() for e in self._inflight
                    if e[2] is not None)
        self.peak_temp_bytes = max(self.peak_temp_bytes, live)

    # ---- after the optimizer step -----------------------------------------------------------
    def publish(self) -> None:
        """The owned parameter shards were updated: stages 1-2 all-gather them into every
        rank's full parameters; stage 3 frees stale gathered copies."""
        if self.stage == 3:
            self._release()
            return
        if self.shards == 1:
            return
        works = [g.all_gather_params(self.group, self.meter) for g in self.groups]
        for w in works:
            if w is not None:
                w.wait()

    def skip_step(self) -> None:
        """The step is skipped (fp16 overflow): parameters are unchanged, but ZeRO-3's groups
        gathered for the backward must still be freed."""
        if self.stage == 3:
            self._release()

    # ---- accounting -----------------------------------------------------------------------------
    def memory(self) -> Dict[str, int]:
        """Model-state bytes held on this rank, by kind (persistent tensors only; ZeRO-3's
        transiently gathered groups are in ``peak_param_bytes``)."""
        def nbytes(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        params = nbytes(g.shard if self.stage == 3 else g.flat for g in self.groups)
        grads = nbytes(g.grad.full if g.grad.full is not None else g.grad.shard
                       for g in self.groups)
        return {"params": params, "grads": grads,
                "buffers": nbytes(b for b in self.model.buffers())}

    def metrics(self) -> Dict[str, int]:
        """Peaks worth a line in the step record (bytes)."""
        out = {}
        if self.stage == 3:
            out["mem.peak_gathered_params"] = self.peak_param_bytes
        if self.policy.sharded:
            out["mem.peak_grad_buckets"] = self.peak_temp_bytes
        return out

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, shard_state.ShardEntry]:
        """This rank's part of the model parameters as N-d boxes of each global tensor (see
        ``zero/state.py``): views into the owned shards, so loading writes in place."""
        return shard_state.entries(self, [g.owned() for g in self.groups])

    def load_state_dict(self, entries: Dict[str, shard_state.ShardEntry]) -> None:
        """Parameters only, in the model's dtype (collective over dp with ZeRO-1/2: publishes
        them). fp32 masters and moments come from ``ShardedAdamW.load_state_dict``."""
        shard_state.load_entries(self.state_dict(), entries)
        self.publish()

    # ---- full values; loading the per-layout checkpoint format of before DCP -----------------
    def full_values(self, shards: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Collective over dp: name -> full value of every parameter, from each group's owned
        shard of some per-group tensor (gradients, in tests), one group at a time. Checkpoints
        never gather: each rank saves its own boxes (``state_dict``)."""
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
