"""Runs a schedule's actions on one pipeline rank: forward/backward of its chunks, and the
point-to-point transfers they imply, with shapes known ahead from the config (no metadata round
trip per micro-batch). Every layout takes this one path: with pp = 1 the rank is a single stage
(first and last) and the schedule is plain gradient accumulation (1F1B with p = 1).

A step gets one batch dict per micro-batch (``tokens``, ``labels``, and whatever later models
need, e.g. masks), on every stage. Loss normalisation lives here: each micro-batch's summed
token loss is divided by the number of loss-bearing tokens in the whole global batch (counted
over micro-batches and data-parallel ranks) and multiplied by the loss scale, so any mask keeps
every layout equal to one process. Packed documents (``models.documents``): ``eod_mask_loss``
sets label -100 where the input is EOD before the tokens are counted, and every stage rebuilds
the micro-batch's positions and attention mask from its tokens.

Communication (``p2p.py``): a send is posted as soon as its tensor exists, a receive when its
action starts, each direction between two stages on its own process group, so that NCCL — which
ignores tags and runs a group's transfers in order — cannot stall (tests/test_nccl_replay.py
replays every schedule under NCCL's rules). With TP, every TP rank sends its own copy of the
activation to its peer TP rank (without sequence parallelism the activation is replicated over
TP; with it, each TP rank sends only its 1/tp sequence chunk — Megatron's scatter/gather
saving, for free).

Memory: once an activation has been sent, its data is freed and only its autograd graph kept
(the next backward needs the graph, not the values) — Megatron's ``deallocate_output_tensor``:
on CPU once its send is done, on CUDA at the second receive after it, through a stream-ordered
``wait()`` (``p2p.P2P`` says why not sooner).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from megalite.models.documents import batch_context, mask_eod_labels
from megalite.parallel import comm
from megalite.parallel.dims import ParallelDims
from megalite.pipeline.p2p import P2P, TorchTransport, free_values
from megalite.pipeline.schedules import Action
from megalite.pipeline.stage import PipelineStage
from megalite.pipeline.zero_bubble import WeightGradStore, defer_weight_grads

Batch = Dict[str, torch.Tensor]  # one micro-batch: "tokens", "labels", ...
IGNORE_INDEX = -100  # labels that carry no loss

_engine = torch.autograd.Variable._execution_engine  # backward without the shape check


def _backward(tensor: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
    """autograd backward that accepts an output whose data was freed after sending; ``grad``
    None means d(loss)/d(loss) = 1."""
    grad = torch.ones_like(tensor) if grad is None else grad
    _engine.run_backward((tensor,), (grad,), False, False, (), True, True)


@dataclass
class _Micro:
    inputs: Optional[torch.Tensor] = None  # received activation (leaf), None on stage 0
    output: Optional[torch.Tensor] = None  # sent activation, or the loss on the last stage
    grad: Optional[torch.Tensor] = None  # gradient received for ``output``


class _NoTimers:
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


@dataclass
class StepLoss:
    """A step's loss on this rank: the sum of its micro-batches' token losses (last stage;
    zero elsewhere) and the global number of loss-bearing tokens."""
    total: torch.Tensor
    tokens: torch.Tensor


class PipelineExecutor:
    def __init__(self, stage: PipelineStage, dims: ParallelDims, loss_fn: Callable,
                 act_shape: Tuple[int, ...], dtype: torch.dtype,
                 grads=None, timers=None):
        """``loss_fn(logits, labels)`` sums the token losses of a micro-batch. ``grads`` (the
        ZeRO engine) is told when a training step starts — ``begin_step(num_micro, split)``
        — and when a split backward's W pass has added a deferred weight gradient —
        ``on_weight_grad(param)`` — so it reduces a group once its last contribution is in;
        ``timers`` (``trainer.metrics.Timers``) accumulate forward and backward seconds."""
        self.stage, self.dims, self.loss_fn = stage, dims, loss_fn
        self.act_shape, self.dtype = act_shape, dtype
        self.grads = grads
        self.peak_in_flight = 0
        self.wgrad_store = WeightGradStore()  # used by split (zero-bubble) schedules
        if grads is not None:
            self.wgrad_store.on_accumulate = grads.on_weight_grad
        self._deferring = False
        self.timers = timers if timers is not None else _NoTimers()
        self.transport = TorchTransport()
        # CUDA: a wait only orders streams, so sent activations can be freed without polling
        self.stream_ordered = dims.device.type == "cuda"
        # activation-memory counter around micro-batch 0's forwards (trainer.activations)
        self.probe = None

    def vstage(self, chunk: int) -> int:
        return chunk * self.dims.pp + self.dims.pp_rank

    def global_tokens(self, batches: List[Batch]) -> torch.Tensor:
        """Loss-bearing tokens of the global batch (every stage computes it from its copy of
        the micro-batches; one small all-reduce over dp)."""
        count = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).to(torch.float32)
        comm.all_reduce(count, self.dims.dp_group, self.dims.meter)
        return count

    def run(self, actions: List[Action], batches: List[Batch],
            loss_scale: float = 1.0) -> StepLoss:
        """Execute ``actions`` over ``batches``; backward passes (if any) leave gradients of
        sum(loss) / tokens * loss_scale. Returns the unscaled loss sum and token count."""
        batches = [mask_eod_labels(b, self.stage.args) for b in batches]
        tokens = self.global_tokens(batches)
        self._scale = loss_scale / tokens.clamp(min=1)
        self.p2p = P2P(self.dims, len(batches), self.transport, self.stream_ordered)
        state: Dict[Tuple[int, int], _Micro] = {}
        self._inputs_until_w: Dict[Tuple[int, int], torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float32, device=self.dims.device)
        split = any(a.kind == "W" for a in actions)
        if split and not self._deferring:
            defer_weight_grads(self.stage, self.wgrad_store)
            self._deferring = True
        if self.grads is not None and torch.is_grad_enabled():
            self.grads.begin_step(len(batches), split)
        live = self.peak_in_flight = 0
        for action in actions:
            slot = state.setdefault((action.chunk, action.micro), _Micro())
            if action.kind == "F":
                probe = self.probe if self.probe is not None and action.micro == 0 else None
                with self.timers.phase("forward"), probe or contextlib.nullcontext():
                    loss = self._forward(action, slot, batches[action.micro], probe)
                if loss is not None:
                    total += loss
                live += 1
                self.peak_in_flight = max(self.peak_in_flight, live)
            elif action.kind == "B":
                with self.timers.phase("backward"):
                    self._backward_input(action, slot, split)
                live -= 1
            else:  # W
                with self.timers.phase("backward"):
                    self._backward_weight(action)
            if action.kind != "F":
                del state[(action.chunk, action.micro)]  # done: free its graph
        self.p2p.flush()
        return StepLoss(total, tokens)

    def _forward(self, a: Action, slot: _Micro, batch: Batch,
                 probe=None) -> Optional[torch.Tensor]:
        rank, s = self.dims.pp_rank, self.vstage(a.chunk)
        if self.stage.is_first(a.chunk):
            x = batch["tokens"]
        else:
            x = self.p2p.recv(self.act_shape, self.dtype, self.dims.device, rank - 1, s - 1,
                              a.micro, 0)
            x.requires_grad_(torch.is_grad_enabled())
            slot.inputs = x
        doc = batch_context(batch, self.stage.args)
        if probe is not None:  # alive before the forward: not this micro-batch's activations
            probe.exclude(x, *batch.values(),
                          *((doc.positions, doc.attend, doc.blocked) if doc else ()))
        out = self.stage.forward_chunk(a.chunk, x, doc=doc)
        if self.stage.is_last(a.chunk):
            loss = self.loss_fn(out, batch["labels"])
            if torch.is_grad_enabled():
                slot.output = loss * self._scale
            return loss.detach()
        if torch.is_grad_enabled():
            slot.output = out
        self.p2p.send(out, rank + 1, s, a.micro, 0)
        return None

    def _backward_input(self, a: Action, slot: _Micro, split: bool) -> None:
        """The backward of a micro-batch; with ``split`` the linear layers' weight-gradient
        matmuls are deferred to its W pass (B: everything on the critical path)."""
        rank, s = self.dims.pp_rank, self.vstage(a.chunk)
        if not self.stage.is_last(a.chunk):
            slot.grad = self.p2p.recv(self.act_shape, self.dtype, slot.output.device, rank + 1,
                                      s + 1, a.micro, 1)
        self.wgrad_store.key = (a.chunk, a.micro) if split else None
        _backward(slot.output, slot.grad)
        self.wgrad_store.key = None
        if slot.inputs is not None:
            self.p2p.send(slot.inputs.grad, rank - 1, s, a.micro, 1)
            # the received activation is done with once its weight gradients are (split: at
            # W; bert's post-norm q,k,v read it): drop its values then, as a hook may still
            # hold the tensor (MemTracker's module hooks keep a grad-requiring input alive for
            # the tracker's lifetime: a tracked step grew by one activation per micro-batch)
            if split:
                self._inputs_until_w[(a.chunk, a.micro)] = slot.inputs
            else:
                free_values(slot.inputs)

    def _backward_weight(self, a: Action) -> None:
        """W: the deferred weight-gradient matmuls of this micro-batch's B pass."""
        self.wgrad_store.run((a.chunk, a.micro))
        done = self._inputs_until_w.pop((a.chunk, a.micro), None)
        if done is not None:
            free_values(done)
