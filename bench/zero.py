"""ZeRO side by side: megalite's ZeRO stages 0-3 against DeepSpeed's ZeRO 0-3 and plain PyTorch
DistributedDataParallel, DP=2 on CPU/gloo, one torch thread per rank.

Every configuration trains megalite's own GPT (``build_model``, same seed, so the same initial
weights) on the same batches (taken once from megalite's data pipeline, ``data.source=synthetic``,
and handed to every system as explicit token tensors), with AdamW (torch's, in all three
systems), the same lr/betas/eps/weight decay (no decay on biases and norm weights), gradient
clipping at 1.0 and a constant learning rate.

Configurations, run back to back in one invocation, each in its own freshly spawned 2-rank world:
  ddp                 torch DDP (gradient_as_bucket_view) + torch.optim.AdamW: the baseline
  ddp-fused           the same with AdamW(fused=True), the kernel megalite's optimizer runs
  ml-z0 .. ml-z3      megalite Trainer, parallel.zero_stage=0..3, fp32
  ml-z3-bf16          megalite, stage 3, train.precision=bf16
  ml-z3-keep          megalite stage 3 with parallel.zero3_reshard_after_forward=false
  ds-z0 .. ds-z3      DeepSpeed engine, zero_optimization.stage=0..3, fp32, otherwise its
                      documented defaults; optimizer AdamW with torch_adam (FusedAdam needs CUDA)
  ds-z3-bf16          DeepSpeed stage 3 with bf16.enabled
DeepSpeed's ZeRO-3 defaults (stage3_max_reuse_distance=1e9 elements) keep every gathered
parameter of a model this small from its forward to its backward: one all-gather of the model per
step, like ml-z3-keep; megalite's default re-gathers for backward (two; the head unit, whose
backward follows its forward, once).

Per configuration: median step time after warm-up (rank 0; every step includes the loss
all-reduce and its host sync, as megalite's train_step does), overhead over DDP, model-state
bytes per rank (max over ranks), peak RSS per rank (ru_maxrss of the rank process, which is fresh
for every configuration, read after the timed steps; the delta over its RSS before the model was
built is printed too), bytes communicated per step, and the first losses.

Model state, per rank:
  megalite: ``Trainer.memory()`` (= ``engine.memory()`` + ``opt.memory()``: params, grads, master,
    optimizer, buffers; persistent tensors, ZeRO-3's transiently gathered units not included),
    read after the last step.
  DDP / DeepSpeed: counted between backward and optimizer step (gradients alive) of an untimed
    step after the first update (DDP: the last warm-up step; DeepSpeed: the first extra step):
    distinct tensor storages (deduplicated by data pointer; a view into a flat buffer counts its
    whole buffer once) of the module's parameters (and ZeRO-3's ``ds_tensor`` partitions), their
    ``.grad``, the inner torch optimizer's state, and every tensor held in the ZeRO optimizer's
    attributes, sorted by attribute name: ``*fp32*`` -> master, ``*bit16*``/``*fp16*``/
    ``lp_param*`` -> params, ``*grad*`` -> grads, anything else -> buffers (shown apart: ZeRO-3's
    ``ipg_buckets`` is a torch.empty of reduce_bucket_size=5e8 elements, of which CPU memory
    only holds the pages touched).

Bytes communicated per step, in megalite's convention (all-gather and reduce-scatter count the
full, gathered/reduced size; an all-reduce counts its tensor) plus ring traffic per rank
("wire": all-reduce 2(n-1)/n, all-gather/reduce-scatter (n-1)/n of the full size):
  megalite: its CommMeter over the timed steps (``comm_bytes.<kind>``; its own wire figures
    ``comm_bytes.wire.<kind>``).
  DeepSpeed: its comms_logger, switched on (``deepspeed.comm.configure``) only for
    ``--comm-steps`` extra steps after the timed ones, off while timing. Its message size is the
    ``tensor`` argument: the input shard for all_gather_into_tensor (multiplied by n here),
    the full input for reduce_scatter_tensor / all_reduce. Wire: estimated as above.
  DDP: its gradient all-reduce, parameters x 4 bytes (every gradient is reduced once per step).
  (The loss all-reduce of DDP and DeepSpeed, 4 bytes, is not counted; megalite's is.)

bf16 matmuls are emulated on CPUs without AVX-512 BF16 (about 15x slower than fp32 here), so the
bf16 configurations run fewer steps (--bf16-warmup, --bf16-steps) and their time compares with
each other, not with DDP's fp32.

Per-phase times (forward, backward, comm, optimizer, other) come from megalite's step record
(``time.<phase>``) and from the same phases timed around the DDP and DeepSpeed loops. Every rank
pins glibc's heap (``pin_malloc``; ``--no-pin-malloc`` leaves the default trimming).

    python bench/zero.py [--warmup 3 --steps 10 --bf16-warmup 1 --bf16-steps 3 --comm-steps 1]
                         [--only ddp,megalite,deepspeed,ml-z2,...] [--rounds 1]
                         [--layers 9 --hidden 384 --heads 6 --vocab 8192 --seq 256 --mbs 2]
                         [--parallel.zero2_accumulate=full ...]   (extra megalite overrides)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from _host import pin_malloc, table
from _worlds import collect

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

WORLD = 2
Batch = Tuple[torch.Tensor, torch.Tensor]  # (inputs, labels) int64 [mbs, seq]


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str  # e.g. "ml-z2"
    system: str  # "ddp" | "megalite" | "deepspeed"
    stage: int = 0
    bf16: bool = False
    reshard: bool = True  # megalite ZeRO-3: parallel.zero3_reshard_after_forward
    fused: bool = False  # DDP: torch AdamW(fused=True), the kernel megalite's optimizer uses

    @property
    def label(self) -> str:
        if self.system == "ddp":
            return "DDP + AdamW" + (" fused" if self.fused else "")
        name = {"megalite": "megalite", "deepspeed": "DeepSpeed"}[self.system]
        keep = "" if self.reshard else " no-reshard"
        return f"{name} ZeRO-{self.stage} {'bf16' if self.bf16 else 'fp32'}{keep}"


def variants() -> List[Variant]:
    """Side by side: DDP, then each stage as megalite then DeepSpeed, bf16 last. Also megalite
    ZeRO-3 keeping gathered parameters from forward to backward, which is what DeepSpeed's
    defaults (stage3_max_reuse_distance=1e9) amount to for a model this size."""
    out = [Variant("ddp", "ddp"), Variant("ddp-fused", "ddp", fused=True)]
    for stage in range(4):
        out += [Variant(f"ml-z{stage}", "megalite", stage),
                Variant(f"ds-z{stage}", "deepspeed", stage)]
    return out + [Variant("ml-z3-keep", "megalite", 3, reshard=False),
                  Variant("ml-z3-bf16", "megalite", 3, True),
                  Variant("ds-z3-bf16", "deepspeed", 3, True)]


# ---- configuration shared by every system ------------------------------------------------------
def megalite_argv(a, run_dir: str, total_steps: int) -> List[str]:
    """megalite's command line for the benchmark model and training settings (stage and
    precision are added per configuration)."""
    return ["--config", os.path.join(REPO, "configs", "tiny.yaml"), f"--run.dir={run_dir}",
            "--run.tensorboard=false", "--run.sample_tokens=0", "--train.eval_interval=0",
            f"--data.cache_dir={os.path.join(REPO, '.cache', 'megalite')}",
            "--data.source=synthetic", f"--data.seq_len={a.seq}",
            "--model.family=gpt", f"--model.num_layers={a.layers}",
            f"--model.hidden_size={a.hidden}", f"--model.num_heads={a.heads}",
            f"--model.vocab_size={a.vocab}", f"--model.max_seq_len={a.seq}",
            "--model.dropout=0", f"--parallel.dp={WORLD}", "--parallel.tp=1", "--parallel.pp=1",
            f"--train.micro_batch_size={a.mbs}", f"--train.grad_accum={a.ga}",
            f"--train.steps={total_steps}", f"--train.lr={a.lr}", "--train.lr_schedule=constant",
            "--train.warmup_steps=0", "--train.beta1=0.9", "--train.beta2=0.95",
            "--train.eps=1e-8", "--train.weight_decay=0.1", "--train.grad_clip=1.0",
            "--train.precision=fp32", *a.overrides]


def make_batches(cfg, steps: int) -> List[List[List[Batch]]]:
    """batches[step][dp_rank][micro]: megalite's own global batches (synthetic corpus), built
    once so every system consumes exactly the same token tensors."""
    from megalite.data import build_datasets, micro_batch

    t = cfg.train
    train, _, _ = build_datasets(cfg.data, t.seed, steps * t.global_batch_size, 0)
    return [[[micro_batch(train, s, m, r, t.micro_batch_size, t.grad_accum, WORLD)
              for m in range(t.grad_accum)] for r in range(WORLD)] for s in range(steps)]


def adamw_groups(params, weight_decay: float) -> List[dict]:
    """megalite's rule: weight decay on matrices and embeddings, not on biases / norm weights."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


# ---- measurement helpers -----------------------------------------------------------------------
def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StateCounter:
    """Bytes of distinct tensor storages per category; a storage counts once, in the first
    category that claims it (claim params, master, optimizer, grads, then buffers). ``where``
    keeps which attribute the bytes of each category came from."""

    def __init__(self):
        self.seen: set = set()
        self.bytes: Dict[str, int] = {k: 0 for k in
                                      ("params", "grads", "master", "optimizer", "buffers")}
        self.where: Dict[str, Dict[str, int]] = {k: {} for k in self.bytes}

    def add(self, kind: str, t: Optional[torch.Tensor], source: str = "") -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[kind] += storage.nbytes()
        self.where[kind][source] = self.where[kind].get(source, 0) + storage.nbytes()

    def report(self) -> Dict[str, int]:
        return {**self.bytes, "total": sum(self.bytes.values())}


def tensors_in(obj, depth: int = 4, _seen: Optional[set] = None):
    """Tensors held by ``obj``: itself, inside lists/tuples/dicts, or in the attributes of
    DeepSpeed's helper objects (buckets, partitions), without entering modules or optimizers."""
    _seen = set() if _seen is None else _seen
    if id(obj) in _seen or depth < 0:
        return
    _seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, depth - 1, _seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from tensors_in(v, depth - 1, _seen)
    elif (type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__")
          and not isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))):
        for v in vars(obj).values():
            yield from tensors_in(v, depth - 1, _seen)


def count_torch_state(module: torch.nn.Module, opt: torch.optim.Optimizer,
                      counter: Optional[StateCounter] = None) -> StateCounter:
    c = counter or StateCounter()
    for p in module.parameters():
        c.add("params", p.data, "module parameters")
        c.add("params", getattr(p, "ds_tensor", None), "ds_tensor")  # ZeRO-3: own partition
    for state in opt.state.values():
        for v in state.values():
            c.add("optimizer", v, "AdamW state")
    for p in module.parameters():
        c.add("grads", p.grad, ".grad")
    return c


def count_deepspeed_state(engine) -> Tuple[Dict[str, int], str]:
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)  # ZeRO wraps the torch optimizer; stage 0 does not
    c = StateCounter()
    attrs = vars(zero) if zero is not inner else {}
    for name, v in attrs.items():  # parameters and master copies before the rest
        if "fp32" in name:
            kind = "master"
        elif "bit16" in name or "fp16" in name or name.startswith("lp_param"):
            kind = "params"
        else:
            continue
        for t in tensors_in(v):
            c.add(kind, t, name)
    count_torch_state(engine.module, inner, c)
    for name, v in attrs.items():
        if name in ("optimizer", "module") or "fp32" in name or "bit16" in name \
                or "fp16" in name:
            continue
        for t in tensors_in(v):
            c.add("grads" if "grad" in name else "buffers", t, name)
    big = sorted(((b, n) for n, b in c.where["buffers"].items() if b >= 2**20), reverse=True)
    how = "counted storages"
    if big:
        how += "; buffers: " + ", ".join(f"{n} {b / 2**20:.0f} MiB" for b, n in big)
    if "ipg_buckets" in c.where["buffers"] and engine.zero_optimization_stage() == 3:
        how += " (torch.empty(reduce_bucket_size), mostly untouched on CPU)"
    return c.report(), how


def ring_wire(kind: str, full_bytes: float, n: int = WORLD) -> float:
    """Bytes one rank sends in a ring implementation of the collective (full-size convention)."""
    if kind.startswith("all_reduce"):
        return 2 * (n - 1) / n * full_bytes
    if kind.startswith(("all_gather", "reduce_scatter")):
        return (n - 1) / n * full_bytes
    return full_bytes  # broadcast, reduce, send/recv: the whole message


def mean_loss(losses: List[torch.Tensor]) -> float:
    """The step's loss as megalite reports it: mean over micro-batches and data-parallel ranks."""
    t = torch.stack([x.detach().float() for x in losses]).mean()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


PHASES = ("forward", "backward", "comm", "optimizer")


class Clock:
    """Wall-clock seconds per phase of one step (the DDP and DeepSpeed loops; megalite's
    Trainer keeps its own: ``time.<phase>`` in the step record)."""

    def __init__(self):
        self.totals: Dict[str, float] = {}

    def reset(self) -> None:
        self.totals = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def take(self) -> Dict[str, float]:
        return dict(self.totals)


@dataclasses.dataclass
class RankRun:
    """What a system gives the common driver."""
    step: Callable[[int, bool], float]  # (step index, snapshot model state before opt step) -> loss
    state: Callable[[], Tuple[Dict[str, int], str]]  # model state bytes + how they were counted
    extra_steps: bool = False  # needs untimed steps after the timed ones to count its bytes
    timed_start: Callable[[], None] = lambda: None  # called before the first timed step
    comm_on: Callable[[], None] = lambda: None  # called before the extra steps
    comm_take: Callable[[int], Dict[str, float]] = lambda steps: {}  # full-size bytes/step
    wire_take: Callable[[int], Dict[str, float]] = lambda steps: {}  # reported wire, if any
    phases: Callable[[], Dict[str, float]] = dict  # seconds per phase of the last step


# ---- the three systems -------------------------------------------------------------------------
def run_ddp(ctx, v: Variant) -> RankRun:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from megalite.models import build_model, lm_loss

    t = ctx["cfg"].train
    model = build_model(ctx["args"], t.seed)
    ddp = DDP(model, gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(adamw_groups(model.parameters(), t.weight_decay), lr=t.lr,
                            betas=(t.beta1, t.beta2), eps=t.eps, fused=v.fused or None)
    n_params = sum(p.numel() for p in model.parameters())
    snap: Dict = {}

    clock = Clock()

    def step(i: int, snapshot: bool) -> float:
        clock.reset()
        opt.zero_grad(set_to_none=False)
        micro = ctx["batches"][i][ctx["rank"]]
        losses = []
        for m, (x, y) in enumerate(micro):
            sync = contextlib.nullcontext() if m == len(micro) - 1 else ddp.no_sync()
            with sync:
                with clock("forward"):
                    loss = lm_loss(ddp(x), y)
                with clock("backward"):  # DDP's all-reduce overlaps it; its wait ends it
                    (loss / len(micro)).backward()
            losses.append(loss)
        with clock("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        if snapshot:
            snap["state"] = count_torch_state(model, opt).report()
        with clock("optimizer"):
            opt.step()
        with clock("comm"):  # the loss all-reduce and its host sync
            return mean_loss(losses)

    how = "counted storages: params, .grad (bucket views), AdamW state"
    return RankRun(step, lambda: (snap["state"], how),
                   comm_take=lambda steps: {"all_reduce": 4.0 * n_params}, phases=clock.take)


def run_megalite(ctx, v: Variant) -> RankRun:
    from megalite.config import parse_args
    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.env import discover
    from megalite.trainer.loop import Trainer

    argv = list(ctx["argv"])
    argv.append(f"--parallel.zero_stage={v.stage}")
    argv.append(f"--train.precision={'bf16' if v.bf16 else 'fp32'}")
    if not v.reshard:
        argv.append("--parallel.zero3_reshard_after_forward=false")
    cfg, _ = parse_args(argv, verbose=False)
    dims = ParallelDims.initialize(WORLD, 1, 1, discover(), "gloo")
    trainer = Trainer(cfg, dims)
    if trainer.args != ctx["args"]:
        raise RuntimeError(f"megalite resolved other model args: {trainer.args} != {ctx['args']}")
    batches, rank = ctx["batches"], dims.dp_rank

    def micro_batches(step: int, data=None) -> List[Dict[str, torch.Tensor]]:
        if data is not None:
            raise RuntimeError("the benchmark feeds training batches only")
        return [{"tokens": x, "labels": y} for x, y in batches[step][rank]]

    trainer.micro_batches = micro_batches  # the benchmark's batches, the same for every system
    records: List[dict] = []  # the timed steps' records: megalite's meter is always on
    on = {"timed": False}
    last: Dict[str, float] = {}

    def step(i: int, snapshot: bool) -> float:
        assert trainer.step == i, (trainer.step, i)
        record = trainer.train_step()
        last.clear()
        last.update({k: record.get(f"time.{k}", 0.0) for k in PHASES})
        if on["timed"]:
            records.append(record)
        return record["loss"]

    def state() -> Tuple[Dict[str, int], str]:
        how = "Trainer.memory()"
        peak = records[-1].get("mem.peak_gathered_params") if records else None
        if peak is not None:
            how += f"; ZeRO-3 peak gathered params {peak / 2**20:.1f} MiB (not in total)"
        return dict(trainer.memory()), how

    def take(wire: bool) -> Dict[str, float]:
        """Per-step bytes by kind: ``comm_bytes.<kind>`` are message sizes, wire bytes come as
        ``comm_bytes.wire.<kind>``."""
        out: Dict[str, float] = {}
        steps = len(records)
        for r in records:
            for k, val in r.items():
                if k.startswith("comm_bytes.wire."):
                    kind, is_wire = k[len("comm_bytes.wire."):], True
                elif k.startswith("comm_bytes."):
                    kind, is_wire = k[len("comm_bytes."):], False
                else:
                    continue
                if is_wire == wire:
                    out[kind] = out.get(kind, 0.0) + val / steps
        return out

    def timed_start() -> None:
        on["timed"] = True

    return RankRun(step, state, timed_start=timed_start, comm_take=lambda n: take(False),
                   wire_take=lambda n: take(True), phases=lambda: dict(last))


def run_deepspeed(ctx, v: Variant) -> RankRun:
    import logging

    import deepspeed
    import deepspeed.comm
    from deepspeed.comm.comm import comms_logger
    from deepspeed.utils import logger as ds_logger

    from megalite.models import build_model, lm_loss

    ds_logger.setLevel(logging.WARNING)
    t = ctx["cfg"].train
    model = build_model(ctx["args"], t.seed)
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
            "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": v.stage},
        "bf16": {"enabled": v.bf16},
        "comms_logger": {"enabled": False, "verbose": False, "prof_all": True, "debug": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=adamw_groups(model.parameters(), t.weight_decay),
        config=config)
    snap: Dict = {}
    clock = Clock()

    def step(i: int, snapshot: bool) -> float:
        clock.reset()
        losses = []
        micro = ctx["batches"][i][ctx["rank"]]
        for m, (x, y) in enumerate(micro):
            with clock("forward"):
                loss = lm_loss(engine(x), y)
            with clock("backward"):
                engine.backward(loss)
            if snapshot and m == len(micro) - 1:
                snap["state"] = count_deepspeed_state(engine)
            with clock("optimizer"):  # the step's gradient reduction waits, clip, AdamW
                engine.step()
            losses.append(loss)
        with clock("comm"):
            return mean_loss(losses)

    def comm_on() -> None:
        comms_logger.reset_data()
        deepspeed.comm.configure(enabled=True, prof_all=True, verbose=False, debug=False)

    def comm_take(steps: int) -> Dict[str, float]:
        deepspeed.comm.configure(enabled=False)
        out: Dict[str, float] = {}
        for name, sizes in comms_logger.get_raw_data().items():
            factor = WORLD if name.startswith("all_gather") else 1  # logged: the input shard
            total = sum(size * rec[0] for size, rec in sizes.items()) * factor
            out[name] = out.get(name, 0.0) + total / steps
        return out

    return RankRun(step, lambda: snap["state"], extra_steps=True, comm_on=comm_on,
                   comm_take=comm_take, phases=clock.take)


# ---- one rank of one configuration -------------------------------------------------------------
def _rank(rank: int, port: int, v: Variant, ctx: dict, log_path: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      OMP_NUM_THREADS="1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # the systems' own chatter goes to the log, not the table
    os.dup2(log, 2)
    os.close(log)
    torch.set_num_threads(1)
    if ctx["pin_malloc"]:
        # each step would otherwise return 30-130 MB at the heap top to the system and fault it
        # back in (10-40k page faults, ~2 us each) or not: a +-40 ms per step lottery
        pin_malloc(32 << 20)
    ctx = dict(ctx, rank=rank, t_start=time.perf_counter())
    try:
        import warnings

        warnings.filterwarnings("ignore")
        if v.system == "deepspeed":
            import deepspeed  # noqa: F401 - its import cost belongs to the baseline RSS
        if v.system != "megalite":
            dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        rss_base = rss_mib()
        run = {"ddp": lambda: run_ddp(ctx, v), "megalite": lambda: run_megalite(ctx, v),
               "deepspeed": lambda: run_deepspeed(ctx, v)}[v.system]()
        warmup, steps = (ctx["bf16_warmup"], ctx["bf16_steps"]) if v.bf16 else \
            (ctx["warmup"], ctx["steps"])
        n_extra = ctx["comm_steps"] if run.extra_steps else 0
        # model state is snapshotted between backward and optimizer step of an untimed step
        # after at least one optimizer step (the first extra step, else the last warm-up step;
        # else the last timed step, where it costs well under a millisecond)
        snap = warmup + steps if n_extra else (warmup - 1 if warmup >= 2 else warmup + steps - 1)
        setup_s = time.perf_counter() - ctx["t_start"]
        losses, times, phases = [], [], []
        for i in range(warmup + steps + n_extra):
            if i == warmup:
                run.timed_start()
            if i == warmup + steps:
                rss_peak = rss_mib()
                run.comm_on()
            dist.barrier()
            t0 = time.perf_counter()
            losses.append(run.step(i, i == snap))
            if warmup <= i < warmup + steps:
                times.append(time.perf_counter() - t0)
                ph = run.phases()
                ph["other"] = times[-1] - sum(ph.values())  # outside the phases (bench's own too)
                phases.append(ph)
        if not n_extra:
            rss_peak = rss_mib()
        comm, wire = run.comm_take(n_extra), run.wire_take(n_extra)
        state, how = run.state()
        out.put((rank, "ok", dict(times=times, rounds=[statistics.median(times)] if times else [],
                                  phases=phases, losses=losses[:warmup + steps], state=state,
                                  state_how=how, comm=comm, wire=wire, rss_base=rss_base,
                                  rss_peak=rss_peak, setup_s=setup_s)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(v: Variant, ctx: dict, log_dir: str, timeout_s: float) -> Tuple[bool, object]:
    from megalite.launcher.local import free_port

    mp = tmp.get_context("spawn")
    out = mp.Queue()
    port = free_port()
    logs = [os.path.join(log_dir, f"{v.key}.rank{r}.log") for r in range(WORLD)]
    procs = [mp.Process(target=_rank, args=(r, port, v, ctx, logs[r], out), daemon=True)
             for r in range(WORLD)]
    results, failure = collect(procs, out, timeout_s)
    error = None
    if failure is not None:
        rank, value = failure
        error = (f"no result within {timeout_s:.0f} s (logs: {log_dir})" if rank is None else
                 f"rank {rank}: {value.strip().splitlines()[-1]} (log: {logs[rank]})")
    return (False, error) if error else (True, [results[r] for r in range(WORLD)])


# ---- report ------------------------------------------------------------------------------------
def report(done: Dict[Variant, List[dict]], failed: Dict[Variant, str], a, n_params: int) -> None:
    MiB = 2**20
    ddp = next((r[0] for v, r in done.items() if v.key == "ddp"), None)  # the baseline
    base = statistics.median(ddp["times"]) if ddp is not None else None
    rows, state_rows, comm_rows, loss_rows, phase_rows = [], [], [], [], []
    ref_losses = None if ddp is None else ddp["losses"]
    for v in variants():
        if v in failed:
            rows.append([v.label, "failed"] + [""] * 8)
            continue
        if v not in done:
            continue
        ranks = done[v]
        med = statistics.median(ranks[0]["times"])
        over = f"{(med / base - 1) * 100:+.1f}%" if base else "-"
        state = {k: max(r["state"].get(k, 0) for r in ranks) for k in ranks[0]["state"]}
        peak = max(r["rss_peak"] for r in ranks)
        delta = max(r["rss_peak"] - r["rss_base"] for r in ranks)
        comm = ranks[0]["comm"]
        wire = ranks[0]["wire"] or {k: ring_wire(k, b) for k, b in comm.items()}
        model_state = sum(state.get(k, 0) for k in ("params", "grads", "master", "optimizer"))
        spread = "-"
        if ddp is not None and v.key != "ddp":  # per round: its median over DDP's
            per = [(m / b - 1) * 100 for m, b in zip(ranks[0]["rounds"], ddp["rounds"])]
            spread = "/".join(f"{x:+.1f}" for x in per)
            if len(per) > 1:  # a burst of load on the machine spoils one round, not the median
                spread = f"{statistics.median(per):+.1f} ({spread})"
        rows.append([v.label, f"{med * 1e3:.0f}", over, spread, f"{model_state / MiB:.1f}",
                     f"{state.get('buffers', 0) / MiB:.1f}", f"{peak:.0f}", f"{delta:+.0f}",
                     f"{sum(comm.values()) / 1e6:.1f}", f"{sum(wire.values()) / 1e6:.1f}",
                     str(len(ranks[0]["times"]))])
        ph = {k: statistics.median(p.get(k, 0.0) for p in ranks[0]["phases"])
              for k in PHASES + ("other",)}
        ref = None if ddp is None else {k: statistics.median(p.get(k, 0.0) for p in ddp["phases"])
                                        for k in PHASES + ("other",)}
        phase_rows.append([v.label] + [
            f"{ph[k] * 1e3:.0f}" + ("" if ref is None or v.key == "ddp"
                                    else f" ({(ph[k] - ref[k]) * 1e3:+.0f})")
            for k in PHASES + ("other",)])
        state_rows.append([v.label] + [f"{state.get(k, 0) / MiB:.1f}" for k in
                                       ("params", "grads", "master", "optimizer", "buffers")]
                          + [ranks[0]["state_how"]])
        comm_rows.append([v.label, ", ".join(f"{k} {b / 1e6:.2f}" for k, b in sorted(comm.items()))
                          or "-"])
        losses = ranks[0]["losses"][:10]
        diff = "-" if ref_losses is None else \
            f"{max(abs(x - y) for x, y in zip(losses, ref_losses)):.1e}"
        loss_rows.append([v.label] + [f"{x:.4f}" for x in losses] + [""] * (10 - len(losses))
                         + [diff])
    print(f"model: megalite gpt {n_params / 1e6:.2f}M params ({a.layers} layers, hidden "
          f"{a.hidden}, {a.heads} heads, vocab {a.vocab}), seq {a.seq}, micro-batch {a.mbs} x "
          f"grad_accum {a.ga} x dp {WORLD}; CPU/gloo, 1 thread per rank; fp32 {a.warmup} "
          f"warm-up + {a.steps} timed steps, bf16 {a.bf16_warmup} + {a.bf16_steps}; "
          f"{a.rounds} round(s); glibc heap {'pinned' if a.pin_malloc else 'trimmed (default)'}")
    print()
    print(table(rows, ["configuration", "ms/step", "vs DDP", "per round", "state MiB",
                       "buffers MiB", "peak RSS MiB", "RSS delta", "comm MB/step",
                       "wire MB/step", "timed"]))
    print("  ms/step: median on rank 0 (steps of every round pooled); vs DDP: against fp32 "
          "DDP (the bf16 rows too);\n  per round: each round's median against DDP's in that "
          "round, their median first. The rounds run every\n  configuration in turn, so a "
          "burst of load from elsewhere on the machine spoils one configuration of one\n"
          "  round: read the per-round figures, not only the pooled one.\n"
          "  state: params + grads + master + optimizer bytes per rank (max over ranks); "
          "buffers: other tensors the system holds (breakdown below).\n"
          "  peak RSS: ru_maxrss of the rank process (a fresh process per configuration); "
          "delta: over its RSS before the model was built.\n"
          "  comm: message sizes per step (all-gather/reduce-scatter at full size); wire: "
          "per-rank ring traffic (megalite's own figure when it reports one, else estimated)")
    print()
    print("per-phase ms/step (median over the timed steps, rank 0; in brackets: against DDP)")
    print(table(phase_rows, ["configuration", "forward", "backward", "comm", "optimizer",
                             "other"]))
    print("  forward/backward: the micro-batches' passes (DDP's bucket all-reduces overlap its "
          "backward and\n  its wait ends it; megalite's hooks launch reductions during it); "
          "comm: megalite finalize_grads (the\n  reductions left in flight) and the summary "
          "all-reduce, DDP/DeepSpeed the loss all-reduce; optimizer: clip\n  + AdamW (+ the "
          "ZeRO-1/2 parameter all-gather; DeepSpeed engine.step: its reductions too); "
          "other: the rest\n  of the step (megalite: token count all-reduce, zeroing, "
          "step record)")
    print()
    print("model state per rank, MiB")
    print(table(state_rows, ["configuration", "params", "grads", "master", "optimizer",
                             "buffers", "how"]))
    print()
    print(f"bytes communicated per step by kind, MB (DeepSpeed: comms_logger over {a.comm_steps} "
          "step(s) after the timed ones; DDP: parameters x 4)")
    print(table(comm_rows, ["configuration", "kinds"]))
    print()
    print("first losses (mean over ranks), and max |loss - DDP loss| over them")
    print(table(loss_rows, ["configuration"] + [str(i + 1) for i in range(10)] + ["max|d|"]))
    med = {v.key: statistics.median(r[0]["times"]) for v, r in done.items()}
    pairs = [(f"ml-z{s}", f"ds-z{s}") for s in range(4)] + [("ml-z3-bf16", "ds-z3-bf16")]
    ratios = [f"{m}/{d} {med[m] / med[d]:.2f}" for m, d in pairs if m in med and d in med]
    if ratios:
        print()
        print("step time megalite / DeepSpeed: " + ", ".join(ratios))
    fused = next((r[0] for v, r in done.items() if v.key == "ddp-fused"), None)
    if fused is not None:  # megalite steps AdamW with the fused kernel: so does this DDP
        over = []
        for v, r in done.items():
            if v.key in [f"ml-z{s}" for s in range(4)]:
                per = [(m / b - 1) * 100 for m, b in zip(r[0]["rounds"], fused["rounds"])]
                over.append(f"{v.key} {(med[v.key] / med['ddp-fused'] - 1) * 100:+.1f}% "
                            f"(rounds: median {statistics.median(per):+.1f}, "
                            + "/".join(f"{x:+.1f}" for x in per) + ")")
        print("step time megalite against DDP with fused AdamW: " + "; ".join(over))
    for v, why in failed.items():
        print(f"{v.label}: FAILED: {why}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, val in dict(warmup=3, steps=10, bf16_warmup=1, bf16_steps=3, comm_steps=1, rounds=1,
                       layers=9, hidden=384, heads=6, vocab=8192, seq=256, mbs=2,
                       ga=1).items():
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=val)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--only", default="", help="comma list of systems (ddp, megalite, deepspeed) "
                    "or configuration keys (ml-z2, ds-z3-bf16, ...)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--pin-malloc", action=argparse.BooleanOptionalAction, default=True,
                    help="glibc: no heap trimming, fixed mmap threshold, in every rank "
                    "(see pin_malloc)")
    a, extra = ap.parse_known_args()
    bad = [x for x in extra if not (x.startswith("--") and "." in x.split("=")[0])]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    a.overrides = extra
    if a.comm_steps < 1:
        ap.error("--comm-steps must be >= 1 (model state is taken on the first of them)")
    torch.set_num_threads(1)
    from megalite.config import parse_args
    from megalite.models import resolve_model_args
    from megalite.models.transformer import CausalLM, num_params

    run_dir = tempfile.mkdtemp(prefix="bench-zero-")
    total = max(a.warmup + a.steps, a.bf16_warmup + a.bf16_steps) + a.comm_steps
    argv = megalite_argv(a, run_dir, total)
    cfg, _ = parse_args(argv, verbose=False)
    args = resolve_model_args(cfg.model)
    with torch.device("meta"):
        n_params = num_params(CausalLM(args))
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    chosen = [v for v in variants() if not only or v.system in only or v.key in only]
    ctx = dict(cfg=cfg, args=args, argv=argv, batches=make_batches(cfg, total),
               warmup=a.warmup, steps=a.steps, bf16_warmup=a.bf16_warmup,
               bf16_steps=a.bf16_steps, comm_steps=a.comm_steps, pin_malloc=a.pin_malloc)
    done: Dict[Variant, List[dict]] = {}
    failed: Dict[Variant, str] = {}
    start = time.perf_counter()
    for rnd in range(a.rounds):
        for v in chosen:
            if v in failed:
                continue
            t0 = time.perf_counter()
            ok, res = run_world(v, ctx, run_dir, a.timeout)
            setup = f" (start-up {max(r['setup_s'] for r in res):4.1f} s)" if ok else ""
            print(f"[round {rnd + 1}/{a.rounds}] {v.label:32s} {'ok' if ok else 'FAILED'} in "
                  f"{time.perf_counter() - t0:5.1f} s{setup}", file=sys.stderr, flush=True)
            if not ok:
                failed[v] = res
            elif v not in done:
                done[v] = res
            else:  # later rounds: pool the step times, keep the first round's other figures
                for mine, new in zip(done[v], res):
                    for k in ("times", "rounds", "phases"):
                        mine[k] += new[k]
    print(f"total {time.perf_counter() - start:.0f} s; logs in {run_dir}", file=sys.stderr)
    report(done, failed, a, n_params)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
