"""The dry run: rank R of the real job at full scale, on fake tensors, one step under a memory
tracker (``megalite train ... --dry_run [--rank R] [--world_size N]``).

What runs is the training code itself: ``ParallelDims`` builds its groups on torch's fake
process-group backend (collectives are no-ops), then — under ``FakeTensorMode``, so no tensor
holds memory — ``build_model`` through the TP plan and the pipeline cut, the ZeRO engine, the
executor and ``ShardedAdamW`` are built exactly as ``Trainer.__init__`` builds them, and one step
runs: the schedule's actions for the fewest micro-batches that reach the step's peak, the
engine's reductions, clipping and the optimizer update. Nothing is read from the dataset (the
micro-batches are fake tensors with the objective's keys: ``step_batch``; bert's masked LM
too) and nothing is written to ``run.dir``; host reads (``.item()``, which fake tensors
refuse) are left out — the step never needs one but for the loss it logs. Not modelled: a
classifier head (``model.num_labels`` > 0, fine-tuning): ``unsupported``.

Memory is measured by ``torch.distributed._tools.mem_tracker.MemTracker``. The model states
exist before the step: the engine's and the optimizer's own buffers (parameters, gradients,
fp32 masters, AdamW moments) are registered with ``track_external`` and reported under their
kind from the same registry ``Trainer.memory()`` reads; what the tracker sees on top at the
peak is split into activations (saved by forward), temporaries (backward and optimizer
scratch, parameter gradients before the engine takes them) and the rest (ZeRO-3 gathered
units, ZeRO-2/3 gradient buckets). The kinds add up to the tracker's peak by construction;
``check`` says how far the named rest is from the engine's own peak counters.

Private torch APIs (``fake_pg``, ``MemTracker``): feature-detected by ``missing_apis``; the
tracker needs torch >= 2.5. Norms run PyTorch's ops here (megalite's fused CPU kernels cannot
take fake tensors); they save the same tensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch

from megalite.config.schema import Config
from megalite.parallel.dims import ParallelDims
from megalite.pipeline import schedules

MIN_TORCH = "2.5"  # MemTracker (torch.distributed._tools.mem_tracker) first shipped in 2.5


def missing_apis() -> Optional[str]:
    """None when this torch has what the dry run needs, else the reason (naming the version)."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: F401
        from torch.distributed._tools.mem_tracker import MemTracker  # noqa: F401
        from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401
    except ImportError as e:
        return (f"the dry run needs torch >= {MIN_TORCH} (fake process group, FakeTensorMode, "
                f"MemTracker); this is torch {torch.__version__} ({e})")
    return None


def layout_dims(cfg: Config, rank: int = 0) -> ParallelDims:
    """``ParallelDims`` of ``rank`` in ``cfg``'s dp x tp x pp layout, no groups built: the one
    place the planner maps ranks to coordinates (``.pp_rank``; ``.rank_of(pp_rank, 0, 0)`` the
    first rank of a pipeline stage)."""
    p = cfg.parallel
    return ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp, rank=rank)


@contextlib.contextmanager
def fake_world(cfg: Config, rank: int) -> Iterator[ParallelDims]:
    """``ParallelDims`` of ``rank`` in ``cfg``'s world on the fake backend: every group is
    built as in training, every collective returns at once without moving data."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the dry run needs its own (fake) process group; one is running")
    dims = layout_dims(cfg, rank)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    dims.backend = "fake"
    try:
        dims._build_groups()
        yield dims
    finally:
        dist.destroy_process_group()


def gloo_dims(cfg: Config, rank: int) -> ParallelDims:
    """``ParallelDims`` of ``rank`` for ``cfg``'s layout on the running gloo process group: the
    real step that dry runs are held to (bench/plan_vs_measured.py, tests/test_dry_run.py)."""
    dims = layout_dims(cfg, rank)
    dims.backend = "gloo"
    dims._build_groups()
    return dims


def peak_micro_batches(schedule: str, pp: int, ga: int, pp_rank: int, v: int) -> int:
    """How many of the step's ``ga`` micro-batches the dry run runs on this rank: with pp = 1,
    one (each micro-batch's forward and backward end before the next begins); with pp > 1 the
    fewest whose schedule holds as many micro-batches in flight (and, for zb-h1, defers as many
    weight passes) as the full step's — warm-up plus a steady pair for 1F1B, every one for
    GPipe — plus two steady micro-batches more: a sent activation's values are freed only at
    the second receive posted after its send (``p2p.P2P``'s CUDA rule, which the dry run
    follows), so a stage's peak settles a little after the in-flight count does. Interleaved
    counts go in multiples of pp."""
    from megalite.planner.memory import live_states

    if pp == 1:
        return min(ga, 1)

    def shape(m: int):  # the most of each of live_states' counts over m micro-batches
        return tuple(max(col) for col in zip(*live_states(schedule, pp, m, pp_rank, v)))

    target = shape(ga)
    step = pp if schedule == "interleaved" else 1
    fewest = next((m for m in range(step, ga, step) if shape(m) == target), ga)
    return min(ga, -(-(fewest + 2) // step) * step)


def dry_vocab(cfg: Config) -> int:
    """The vocabulary size without reading the dataset: model.vocab_size, else the tokenizer's
    (bytes: 257; a tokenizer.json: its size; bpe:N, wordpiece:N: N, an upper bound of what
    training on the corpus yields). Raises DataError (a missing tokenizer file)."""
    from megalite.data.tokenizer import ByteTokenizer, load_tokenizer, parse_spec

    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    if cfg.data.source == "synthetic":
        return ByteTokenizer().vocab_size
    if cfg.data.source == "prepared" and cfg.data.paths:
        import os

        from megalite.data.dataset import tokenizer_file

        path = tokenizer_file(cfg.data.paths[0], cfg.data)
        if os.path.isfile(path):
            return load_tokenizer(path).vocab_size
    kind, value = parse_spec(cfg.data.tokenizer)
    if kind == "bytes":
        return ByteTokenizer().vocab_size
    if kind == "file":
        return load_tokenizer(str(value)).vocab_size
    return int(value)  # bpe:N, wordpiece:N


@dataclass
class RankParts:
    """One rank's training objects, built as ``Trainer.__init__`` builds them."""
    args: object
    model: torch.nn.Module
    engine: object
    executor: object
    opt: object
    dims: ParallelDims
    dtype: torch.dtype
    split_rng: object = None  # TP ranks' dropout stream (tp > 1 with dropout)


def build_rank(cfg: Config, dims: ParallelDims, vocab_size: int) -> RankParts:
    """Model through the plan, ZeRO engine, executor, optimizer of ``dims``' rank — the
    Trainer's constructors with the Trainer's arguments, minus data and run directory
    (``tests/test_dry_run.py`` holds the two to the same parameters and states). Weights are
    not drawn (``torch.empty``): the dry run and the memory tests need shapes. Norms run
    PyTorch's ops (fake tensors cannot enter the fused kernels; they save the same tensors)."""
    from megalite.models import DTYPES, build_model, resolve_model_args
    from megalite.models.recompute import apply_recompute
    from megalite.pipeline.executor import PipelineExecutor
    from megalite.plan import model_plan
    from megalite.tensor_parallel.plan import loss_fn
    from megalite.tensor_parallel.random import SplitRegionRNG, cover_split_regions
    from megalite.zero import ShardedAdamW, ZeroEngine

    t, p = cfg.train, cfg.parallel
    args = dataclasses.replace(resolve_model_args(cfg.model, vocab_size, cfg.data, None),
                               kernels="torch")
    dtype = DTYPES[t.precision]
    engine = ZeroEngine(p.zero_stage, dims, dtype, DTYPES[t.grad_dtype], p.bucket_mb,
                        p.zero2_accumulate, p.zero3_reshard_after_forward,
                        tied_across_stages=args.tie_embeddings and dims.pp > 1)
    model = build_model(args, t.seed, dims.device, dtype, plan=model_plan(dims, p),
                        materialize=engine.materialize,
                        values=lambda name, shape: torch.empty(shape))
    engine.attach(model)
    split_rng = None  # as the Trainer: per-TP-rank dropout stream, then recomputation
    if dims.tp > 1 and args.dropout > 0:
        split_rng = SplitRegionRNG(dims.device)
        cover_split_regions(model, split_rng, p.sequence_parallel)
    apply_recompute(model, cfg.model.recompute, cfg.model.recompute_layers, split_rng)
    seq = cfg.data.seq_len // (dims.tp if p.sequence_parallel else 1)
    executor = PipelineExecutor(model, dims, loss_fn(args, dims, p.vocab_multiple, "sum"),
                                (t.micro_batch_size, seq, args.hidden_size), dtype,
                                grads=engine)
    opt = ShardedAdamW(engine, t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay,
                       offload=p.offload_optimizer)
    opt._ensure_moments()  # the steady state: moments exist from the second step on
    return RankParts(args, model, engine, executor, opt, dims, dtype, split_rng)


KINDS = ("params", "grads", "master", "optimizer", "buffers", "activations", "temporaries",
         "gathered+buckets")


@dataclass
class StepMemory:
    """Peak bytes of one step on one rank, by kind (``KINDS``); ``peak`` is the tracker's."""
    peak: int
    kinds: Dict[str, int] = field(default_factory=dict)
    micro_batches: int = 0
    of: int = 0  # micro-batches of the real step
    seconds: float = 0.0


def _step_tracker():
    """A MemTracker that keeps no per-module snapshots: the step calls each module once per
    micro-batch, which MemTracker's per-module statistics refuse ("multiple iterative calls"),
    and the snapshots (a deep copy per module call) dominate its cost. The device-wide peak and
    the activation / temporary split (forward vs backward, from its ModTracker) are kept."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs) -> None:
            pass

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            pass

        def _pre_bw_hook(self, module, args) -> None:
            pass

        def _post_bw_hook(self, module, args) -> None:
            pass

    return StepTracker()


MLM_FRACTION = 0.15  # of the tokens a masked-LM batch labels (data.mlm's default)


def step_batch(cfg: Config, vocab: int) -> Dict[str, torch.Tensor]:
    """One micro-batch of random tokens with the keys and shapes the run's objective gives
    (``trainer.objective``): a decoder's ``tokens``/``labels``; a masked-LM's also
    ``token_types`` and ``attention_mask`` (no padding), labels -100 but at ~15% of tokens."""
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    tokens, labels = torch.randint(0, vocab, shape), torch.randint(0, vocab, shape)
    if cfg.model.family != "bert":
        return {"tokens": tokens, "labels": labels}
    labels = labels.masked_fill(torch.rand(shape) >= MLM_FRACTION, -100)
    return {"tokens": tokens, "labels": labels, "token_types": torch.zeros_like(tokens),
            "attention_mask": torch.ones_like(tokens)}


def tracked_step(parts: RankParts, cfg: Config, micro_batches: int) -> StepMemory:
    """Run one training step of ``micro_batches`` (random tokens) under MemTracker and return
    its peak by kind. Real or fake tensors alike: the CPU measurement of a real step uses the
    same function."""
    e, o, dims = parts.engine, parts.opt, parts.dims
    actions = schedules.build(cfg.parallel.schedule, dims.pp, micro_batches, dims.pp_rank,
                              len(parts.model.chunks))
    batches = [step_batch(cfg, parts.args.vocab_size) for _ in range(micro_batches)]
    start = time.perf_counter()
    with track_step(e, o, parts.model) as result:
        parts.executor.run(actions, batches, 1.0)
        e.finalize_grads()
        o.clip_grad_norm(cfg.train.grad_clip)
        o.step(cfg.train.lr)
    result.micro_batches, result.seconds = micro_batches, time.perf_counter() - start
    return result


@contextlib.contextmanager
def track_step(engine, opt, model: torch.nn.Module) -> Iterator[StepMemory]:
    """MemTracker around a step, the model states registered from the engine's and the
    optimizer's own buffers (offloaded ones left out: host memory); the yielded StepMemory is
    filled when the block exits."""
    state = {**engine.memory(), **opt.memory()}
    offloaded = {"master", "optimizer", "offload_grads"} if opt.offload else set()
    device_tensors: List[torch.Tensor] = []
    for g in engine.groups:
        device_tensors += [g.grad.full if g.grad.full is not None else g.grad.shard]
        if g.shard is not None:
            device_tensors.append(g.shard)
    if not opt.offload:
        device_tensors += [m for m, a in zip(opt.masters, opt.aliased) if not a]
    tracker = _step_tracker()
    tracker.track_external(model, *device_tensors)
    if not opt.offload:
        tracker.track_external(opt.opt)
    result = StepMemory(0)
    with tracker:
        yield result
    snap = next(iter(tracker.get_tracker_snapshot("peak").values()), {})
    by_type = {str(getattr(k, "value", k)): v for k, v in snap.items()}
    result.peak = by_type.get("Total", 0)
    kinds = {k: state.get(k, 0) for k in ("params", "grads", "master", "optimizer", "buffers")
             if k not in offloaded}
    kinds["activations"] = by_type.get("Activation", 0)
    kinds["temporaries"] = by_type.get("Temp", 0) + by_type.get("Gradient", 0)
    kinds["gathered+buckets"] = result.peak - sum(kinds.values())
    result.kinds = kinds


def unsupported(cfg: Config) -> Optional[str]:
    """Why the planner cannot model this config, or None."""
    if cfg.model.num_labels or cfg.finetune.train is not None:
        field = (f"model.num_labels={cfg.model.num_labels}" if cfg.model.num_labels else
                 f"finetune.train={cfg.finetune.train}")
        return (f"{field}: the dry run and megalite plan model the language-model heads (gpt, "
                "llama, bert's masked LM), not a classifier: plan the pre-training run "
                "(model.num_labels=0, no finetune section)")
    return None


@contextlib.contextmanager
def fake_rank(cfg: Config, rank: int, vocab: int) -> Iterator[RankParts]:
    """Rank ``rank`` of ``cfg``'s job built on the fake backend under ``FakeTensorMode``, its
    sent activations freed as on CUDA, at the second receive posted after the send
    (``p2p.P2P``): a fake send never reports completion, so the CPU rule would keep every one
    until the step's end (gloo's sends do too: they complete only at ``wait()``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with fake_world(cfg, rank) as dims, FakeTensorMode():
        parts = build_rank(cfg, dims, vocab)
        parts.executor.stream_ordered = True
        yield parts


def dry_run(cfg: Config, rank: int) -> StepMemory:
    """Rank ``rank`` of ``cfg``'s job (validated, dp resolved) on fake tensors: its step's
    peak memory by kind."""
    p = cfg.parallel
    start = time.perf_counter()
    with fake_rank(cfg, rank, dry_vocab(cfg)) as parts:
        ga = cfg.train.grad_accum
        m = peak_micro_batches(p.schedule, p.pp, ga, parts.dims.pp_rank, p.virtual_stages)
        result = tracked_step(parts, cfg, m)
    result.of, result.seconds = ga, time.perf_counter() - start
    return result
