"""The analytic memory model of one GPU (one rank) of a job, as named byte terms.

**Model states** (ZeRO paper's accounting, Rajbhandari et al. 2020, with megalite's layout):
Ψ_r = the parameters this rank's pipeline stage and TP slice hold (counted on the meta-device
model through the real TP plan: padded vocabulary, replicated norms and kv heads included),
cut into flat groups per layer unit of at most one bucket (``parallel.bucket_mb``), each
padded to a multiple of the shard count N (dp with ZeRO >= 1, else 1) — the engine's cut,
mirrored here. Per rank, with e = parameter bytes, g = gradient bytes:

=====  ===========  =================================  =========================
stage  parameters   gradients                          fp32 master + AdamW (12)
=====  ===========  =================================  =========================
0      e·Ψ_r        g·Ψ_r                              (4 if e < 4) + 8, ·Ψ_r
1      e·Ψ_r        g·Ψ_r (reduce-scattered in place)  ((4 if e < 4) + 8)·Ψ_r/N
2      e·Ψ_r        g·Ψ_r/N (+ in-flight buckets)      ((4 if e < 4) + 8)·Ψ_r/N
3      e·Ψ_r/N      g·Ψ_r/N (+ in-flight buckets)      ((4 if e < 4) + 8)·Ψ_r/N
=====  ===========  =================================  =========================

plus ZeRO-3's gathered units (the unit running and the one prefetched, or every unit when
units stay gathered from forward to backward, pp > 1). fp32 parameters are their own master.
Offload moves masters and moments (and an fp32 gradient copy) to host memory.

**Activations**: per transformer layer, ``models.activation_memory.layer_activation_terms``
(issue 15's re-derived terms, by recompute kind); times the layers of a chunk, times the chunks
in flight at the schedule's peak (``live_states`` of the rank's real action list:
p - r for 1F1B, more for interleaved; zb-h1's deferred weight passes keep their linear layers'
inputs). The last stage adds the head: final-norm tensors and the loss's fp32 softmax over the
(local) vocabulary; bert's (post-norm blocks: the same bytes under other names) its MLM
transform instead of the final norm, and its first stage the embedding norm's input and
dropout mask. **Temporaries**: the backward's working set at the peak — the largest of one
layer's recomputed activations plus its gradients, and on the last stage the logits' gradient.
**Allocator allowance** (GPU only): CUDA context and caching-allocator rounding.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from megalite import ops
from megalite.ops import _backend
from megalite.config.schema import Config
from megalite.models.activation_memory import attention_path, layer_activation_terms
from megalite.models.transformer import TIED_WEIGHTS
from megalite.pipeline import schedules
from megalite.pipeline.stage import split_layers

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CUDA_CONTEXT = 600 * 2**20  # CUDA context + cuBLAS/NCCL workspaces per process, measured-ish
FRAGMENTATION = 0.05  # caching-allocator rounding and fragmentation, of the tracked peak
# the linear layers' inputs: what a deferred weight pass (zb-h1) keeps after its B pass
LINEAR_INPUTS = ("q,k,v input", "o_proj input", "mlp input", "down_proj input",
                 "fc_out input")

Named = List[Tuple[str, int]]  # (parameter name, numel) in unit.parameters() order
# the term names' prefixes by kind (the report's columns, the dry run's kinds)
STATES = ("params", "grads", "master", "optimizer")
ACTIVATIONS = ("activations", "head", "loss")
TEMPORARIES = ("temporaries",)


def term_bytes(terms: Dict[str, int], prefixes: Tuple[str, ...]) -> int:
    """The bytes of the terms whose names start with one of ``prefixes``."""
    return sum(v for k, v in terms.items() if k.startswith(prefixes))


_UNITS: Dict[str, Tuple[Named, Named, Named, int]] = {}


def _units(args, tp: int, sp: bool, vocab_multiple: int) -> Tuple[Named, Named, Named, int]:
    """(embed, one block, head) parameters of TP rank 0 on the meta device, through the real
    TP plan; and the token embedding's size (vocabulary rows x hidden / tp). Cached."""
    key = repr((args, tp, sp, vocab_multiple))
    if key not in _UNITS:
        _UNITS[key] = _build_units(args, tp, sp, vocab_multiple)
    return _UNITS[key]


def _build_units(args, tp: int, sp: bool, vocab_multiple: int
                 ) -> Tuple[Named, Named, Named, int]:
    from megalite.models import CausalLM
    from megalite.parallel.dims import ParallelDims
    from megalite.tensor_parallel.plan import parallelize

    split = set()
    with torch.device("meta"):
        model = CausalLM(args)
        if tp > 1:  # without a process group the twins keep full shapes: split by the layout
            split = set(parallelize(model, ParallelDims(dp=1, tp=tp, pp=1), sp,
                                    vocab_multiple).shard_dim)
    names = {id(p): n for n, p in model.named_parameters()}

    def numel(p) -> int:
        return p.numel() // tp if names[id(p)] in split else p.numel()

    def named(unit) -> Named:
        return [(names[id(p)], numel(p)) for p in unit.parameters()]

    embed, block = named(model.embed), named(model.layers[0])
    emb_ids = {id(p) for p in model.embed.parameters()}
    head = [(names[id(p)], numel(p)) for p in model.head.parameters() if id(p) not in emb_ids]
    return embed, block, head, numel(model.embed.tok.weight)


def stage_units(cfg: Config, args, pp_rank: int) -> List[Named]:
    """This pipeline rank's layer units (embed, its blocks, head), in forward order."""
    p = cfg.parallel
    embed, block, head, tok = _units(args, p.tp, p.sequence_parallel and p.tp > 1,
                                     p.vocab_multiple)
    ranges = split_layers(args.num_layers, p.pp, p.virtual_stages, p.layers_per_stage)
    units: List[Named] = [embed] if pp_rank == 0 else []
    for c in range(p.virtual_stages):
        units += [block] * len(ranges[c * p.pp + pp_rank])
    if pp_rank == p.pp - 1:
        tied_copy = args.tie_embeddings and p.pp > 1
        units.append(head + ([("head.output.weight", tok)] if tied_copy else []))
    return units


def flat_groups(units: List[Named], bucket_mb: float, grad_bits: int, tied_solo: bool
                ) -> List[Tuple[int, int]]:
    """(unit index, numel) of the ZeRO engine's flat groups: each unit's parameters, last
    first, in runs of at most one bucket; a tied embedding alone (``ZeroEngine._cut``)."""
    bucket = max(1, int(bucket_mb * 2**20 * 8 / grad_bits))
    solo = set(TIED_WEIGHTS) if tied_solo else set()
    out = []
    for u, params in enumerate(units):
        run: List[int] = []
        for name, n in reversed(params):
            if run and (name in solo or sum(run) + n > bucket):
                out.append((u, sum(run)))
                run = []
            run.append(n)
            if name in solo:
                out.append((u, sum(run)))
                run = []
        if run:
            out.append((u, sum(run)))
    return out


def state_bytes(numel: int, shards: int, stage: int, param_bytes: int, grad_bytes: int,
                sharded_grads: bool, offload: bool = False) -> Dict[str, int]:
    """The table above for ``numel`` parameters (a multiple of ``shards``) on one rank."""
    e, g, shard = param_bytes, grad_bytes, numel // shards
    out = {"params": e * (shard if stage == 3 else numel),
           "grads": g * (shard if sharded_grads else numel)}
    master = 4 * shard if (e < 4 or offload) else 0  # fp32 parameters are their own master
    out["master"], out["optimizer"] = master, 8 * shard
    if offload:
        out["host (offloaded master, moments, fp32 grads)"] = master + 8 * shard + 4 * shard
        out["master"] = out["optimizer"] = 0
    return out


def model_states(cfg: Config, args, pp_rank: int) -> Dict[str, int]:
    """Model-state bytes of a rank of pipeline rank ``pp_rank``, by kind (as
    ``Trainer.memory()`` names them; ``gathered`` and ``buckets`` are ZeRO-3/2 transients)."""
    p, t = cfg.parallel, cfg.train
    e, g = DTYPE_BYTES[t.precision], DTYPE_BYTES[t.grad_dtype]
    shards = p.dp if p.zero_stage >= 1 else 1
    units = stage_units(cfg, args, pp_rank)
    groups = flat_groups(units, p.bucket_mb, 8 * g, args.tie_embeddings and p.pp > 1)
    padded = [-(-n // shards) * shards for _, n in groups]
    sharded_grads = p.zero_stage == 3 or (p.zero_stage == 2 and p.zero2_accumulate == "shard")
    out = state_bytes(sum(padded), shards, p.zero_stage, e, g, sharded_grads,
                      p.offload_optimizer)
    if sharded_grads:  # the bucket filling + at most two reductions in flight
        out["buckets"] = g * sum(sorted(padded)[-3:])
    if p.zero_stage == 3:
        per_unit = [0] * len(units)
        for (u, _), n in zip(groups, padded):
            per_unit[u] += e * n
        keep = {"auto": p.pp > 1, "true": False, "false": True}[
            str(p.zero3_reshard_after_forward).lower()]
        pairs = [a + b for a, b in zip(per_unit, per_unit[1:])] or per_unit
        out["gathered"] = sum(per_unit) if keep else max(pairs)
    return out


def in_flight(cfg: Config, pp_rank: int, chunk_bytes: int, deferred_bytes: int,
              first_bytes: int = 0, last_bytes: int = 0) -> Tuple[int, int, int, int]:
    """(chunks forwarded and not yet backwarded, chunks whose weight pass is deferred, live
    micro-batches of the rank's first and of its last virtual chunk) at the moment of the
    rank's real action list where their bytes peak (zb-h1: a B pass frees a chunk's
    activations but its W pass still needs the linear layers' inputs and output gradients;
    ``first_bytes``/``last_bytes``: what a micro-batch keeps besides its layers in the first
    chunk — bert's embedding norm — and in the last — the head and loss)."""
    p = cfg.parallel
    states = live_states(p.schedule, p.pp, cfg.train.grad_accum, pp_rank, p.virtual_stages)
    weights = (chunk_bytes, deferred_bytes, first_bytes, last_bytes)
    return max(states, key=lambda st: sum(n * w for n, w in zip(st, weights)))


_LIVE: Dict[Tuple, List[Tuple[int, int, int, int]]] = {}


def live_states(schedule: str, pp: int, ga: int, pp_rank: int, v: int
                ) -> List[Tuple[int, int, int, int]]:
    """The distinct (live chunks, deferred W passes, live chunks of virtual chunk 0, of
    virtual chunk v-1) the action list goes through: an F makes a chunk live, its B ends it
    (and, where the schedule splits W off — zb-h1 — defers its weight pass), a W ends a
    deferral. The planner's one in-flight count (``in_flight`` here,
    ``dry_run.peak_micro_batches``); its live counts agree with ``schedules.max_in_flight``,
    which the executor's tests hold the real step to. Cached."""
    key = (schedule, pp, ga, pp_rank, v)
    if key not in _LIVE:
        actions = schedules.build(schedule, pp, ga, pp_rank, v)
        split = any(a.kind == "W" for a in actions)
        live = [0] * v
        deferred = 0
        seen = {(0, 0, 0, 0)}
        for a in actions:
            if a.kind == "F":
                live[a.chunk] += 1
            elif a.kind == "B":
                live[a.chunk] -= 1
                deferred += split
            else:
                deferred -= 1
            seen.add((sum(live), deferred, live[0], live[-1]))
        _LIVE[key] = sorted(seen)
    return _LIVE[key]


def activation_terms(cfg: Config, args, pp_rank: int, cpu: bool = False) -> Dict[str, int]:
    """Activation and temporary bytes of pipeline rank ``pp_rank`` at its peak, named.
    ``cpu``: the attention path CPU's SDPA takes (its math path, fp32, with dropout) and CPU
    dropout masks; else flash/efficient attention and byte masks (CUDA)."""
    p, t = cfg.parallel, cfg.train
    e = DTYPE_BYTES[t.precision]
    s, b, tp = cfg.data.seq_len, t.micro_batch_size, p.tp
    sp = p.sequence_parallel and tp > 1
    # the compiled kernels run on CPU where built, on CUDA once the GPU check enabled them
    # (until then PyTorch's norms and SDPA: see attention_path)
    kernels_run = ops.model_uses_kernels(torch.device("cpu")) if cpu else \
        _backend.cuda_kernels_enabled()
    path = attention_path(args, cpu, kernels_run)
    per = {kind: layer_activation_terms(args, b, s, tp, sp, kind, e, **path)
           for kind in ("none", "selective", "full")}
    ranges = split_layers(args.num_layers, p.pp, p.virtual_stages, p.layers_per_stage)
    layers = max(len(ranges[c * p.pp + pp_rank]) for c in range(p.virtual_stages))
    k = cfg.model.recompute_layers if cfg.model.recompute == "full" and \
        cfg.model.recompute_layers else layers
    kinds = [cfg.model.recompute] * min(k, layers) + ["none"] * (layers - min(k, layers))
    chunk = sum(sum(per[kind].values()) for kind in kinds)
    linear = sum(v for n, v in per["none"].items() if any(x in n for x in LINEAR_INPUTS))
    hl, fl = args.hidden_size // tp, args.ffn_hidden_size // tp
    kvl = max(args.num_kv_heads // tp, 1) * args.head_dim
    out_grads = e * s * b * (hl + 2 * kvl + 2 * args.hidden_size + 2 * fl)
    chunk_sb = s * b // (tp if sp else 1)
    sbh = s * b * args.hidden_size
    vocab = _units(args, tp, sp, p.vocab_multiple)[3] // args.hidden_size
    embed: Dict[str, int] = {}
    if args.is_encoder and pp_rank == 0:  # its embedding's norm (on this rank's sequence chunk)
        mask = (1 if not cpu else e) if args.dropout > 0 else 0
        embed["activations: embedding norm input, statistics (fp32), dropout mask"] = (
            e * chunk_sb * args.hidden_size + 8 * chunk_sb + mask * chunk_sb * args.hidden_size)
    head: Dict[str, int] = {}
    if pp_rank == p.pp - 1:
        head = {"head: final norm input, output": e * sbh // (tp if sp else 1) + e * sbh}
        if args.is_encoder:  # the MLM transform on this rank's chunk, then the vocabulary
            head = {"head: MLM dense input, GELU input, norm input, statistics (fp32); norm "
                    "output": 3 * e * sbh // (tp if sp else 1) + 8 * chunk_sb + e * sbh}
        head["loss: fp32 softmax over the local vocabulary"] = 4 * s * b * vocab
    chunks, deferred, first, last = in_flight(cfg, pp_rank, chunk, layers * (linear + out_grads),
                                              sum(embed.values()), sum(head.values()))
    out = {f"activations: {layers} layers x {chunks} micro-batch chunks in flight "
           f"({cfg.model.recompute})": chunks * chunk}
    out.update({k: first * v for k, v in embed.items()})  # chunk 0's micro-batches only
    if deferred:
        out[f"activations: {deferred} zb-h1 deferred weight passes (linear inputs, output "
            "gradients)"] = deferred * layers * (linear + out_grads)
    layer_full = sum(per["none"].values())
    # a recomputed layer's forward, or the part selective recomputation did not keep
    work = {"none": 0, "full": layer_full,
            "selective": layer_full - sum(per["selective"].values())}[cfg.model.recompute]
    # its backward: the gradients flowing through it (dX in and out, the MLP's intermediate
    # ones) and its weight gradients before the engine takes them into its flat buffers
    block = sum(n for _, n in _units(args, tp, sp, p.vocab_multiple)[1])
    work += 2 * e * sbh + 3 * e * s * b * fl + e * block
    if head:
        out.update({k: last * v for k, v in head.items()})  # the last chunk's micro-batches
        work = max(work, (4 + e) * s * b * vocab)  # the logits' gradient, fp32 then cast
    out["temporaries: backward working set"] = work
    return out


def rank_memory(cfg: Config, args, pp_rank: int, gpu: bool = True) -> Dict[str, int]:
    """Every named term of a rank of pipeline rank ``pp_rank`` (bytes); ``total`` is the
    device peak predicted (host-offloaded bytes excluded)."""
    out = dict(model_states(cfg, args, pp_rank))
    out.update(activation_terms(cfg, args, pp_rank, cpu=not gpu))
    device = sum(v for k, v in out.items() if not k.startswith("host"))
    if gpu:
        out["allocator: CUDA context + 5% rounding/fragmentation"] = \
            CUDA_CONTEXT + int(FRAGMENTATION * device)
        device += out["allocator: CUDA context + 5% rounding/fragmentation"]
    out["total"] = device
    return out


def peak_rank(cfg: Config, args, gpu: bool = True) -> Tuple[int, Dict[str, int]]:
    """(pipeline rank, its terms) of the stage predicted to peak: the first (most micro-batches
    in flight) or the last (the logits)."""
    first = rank_memory(cfg, args, 0, gpu)
    if cfg.parallel.pp == 1:
        return 0, first
    last = rank_memory(cfg, args, cfg.parallel.pp - 1, gpu)
    return (0, first) if first["total"] >= last["total"] else (cfg.parallel.pp - 1, last)
