"""Command-line faces of the planner: ``megalite train ... --dry_run`` and ``megalite plan``."""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

from megalite.cli import _pop_option

GIB = 2**30


def _int_option(argv: List[str], name: str) -> Optional[int]:
    value = _pop_option(argv, name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"{name}={value}: must be a non-negative integer")
    return number


def memory_table(columns: Dict[str, Dict[str, int]], unit: int = GIB) -> str:
    """Kinds as rows, one column per source (dry run, analytic, measured), in GiB."""
    names = list(columns)
    kinds: List[str] = []
    for col in columns.values():
        kinds += [k for k in col if k not in kinds and k != "total"]
    width = max(len(k) for k in kinds + ["total"]) + 2
    rows = [" " * width + "".join(f"{n:>14}" for n in names)]
    for k in kinds + ["total"]:
        cells = []
        for n in names:
            col = columns[n]
            v = col.get(k, sum(col.values()) if k == "total" else None)
            cells.append(f"{v / unit:>14.3f}" if v is not None else f"{'-':>14}")
        rows.append(f"{k:<{width}}" + "".join(cells))
    return "\n".join(rows)


def dry_run_main(argv: List[str]) -> int:
    """``megalite train --config F.yaml ... --dry_run [--rank R] [--world_size N]``."""
    from megalite.config import parse_or_exit
    from megalite.planner.dry_run import dry_run, layout_dims, missing_apis, unsupported
    from megalite.planner.memory import rank_memory

    argv = [a for a in argv if a != "--dry_run"]
    try:
        rank = _int_option(argv, "--rank")
        world = _int_option(argv, "--world_size")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if world == 0:
        print("error: --world_size=0: give the number of ranks of the job (dp*tp*pp)",
              file=sys.stderr)
        return 2
    problem = missing_apis()
    if problem:
        print(f"error: --dry_run: {problem}", file=sys.stderr)
        return 2
    cfg, _ = parse_or_exit(argv, world)
    world = cfg.world_size
    problem = unsupported(cfg) or _vocab_problem(cfg)
    if problem:
        print(f"error: --dry_run: {problem}", file=sys.stderr)
        return 2
    if rank is None:
        rank = default_rank(cfg)
    if rank >= world:
        print(f"error: --rank={rank}: the job has ranks 0..{world - 1} (dp*tp*pp = "
              f"{cfg.parallel.dp}*{cfg.parallel.tp}*{cfg.parallel.pp}); pick one of them",
              file=sys.stderr)
        return 2
    p = cfg.parallel
    print(f"dry run: rank {rank} of {world} (dp {p.dp} x tp {p.tp} x pp {p.pp}, ZeRO-{p.zero_stage}"
          f"{', optimizer offloaded' if p.offload_optimizer else ''}) on fake tensors; no data "
          "read, nothing written", flush=True)
    result = dry_run(cfg, rank)
    how = ("all of them (the schedule holds every one at its peak)"
           if result.micro_batches == result.of else "the fewest that reach the step's peak")
    print(f"ran {result.micro_batches} of the step's {result.of} micro-batches ({how}), the "
          f"reductions and the optimizer step in {result.seconds:.1f} s")
    columns = {"dry run": dict(result.kinds)}
    columns["dry run"]["total"] = result.peak
    pp_rank = layout_dims(cfg, rank).pp_rank
    args = dry_args(cfg)
    cpu_terms = rank_memory(cfg, args, pp_rank, gpu=False)
    columns["analytic"] = by_kind(cpu_terms)
    print(f"peak memory of rank {rank} by kind (GiB; the analytic model with the attention and "
          "dropout paths the CPU run takes):")
    print(memory_table(columns))
    ratio = result.peak / max(cpu_terms["total"], 1)
    print(f"dry run / analytic: {ratio:.3f}")
    gpu_terms = rank_memory(cfg, args, pp_rank, gpu=True)
    print(f"analytic terms on a GPU (flash attention, byte dropout masks, allocator allowance), "
          f"total {gpu_terms['total'] / GIB:.2f} GiB:")
    for name, value in gpu_terms.items():
        if name != "total" and value:
            print(f"  {name}: {value / GIB:.3f}")
    return 0


def _vocab_problem(cfg) -> Optional[str]:
    """The vocabulary size cannot be known without the data: the one-line reason, or None."""
    from megalite.data import DataError
    from megalite.planner.dry_run import dry_vocab

    try:
        dry_vocab(cfg)
    except DataError as e:
        return f"{e}; or set --model.vocab_size"
    return None


def dry_args(cfg):
    """The ModelArgs the dry run builds (PyTorch norms; vocabulary without reading data)."""
    import dataclasses

    from megalite.models import resolve_model_args
    from megalite.planner.dry_run import dry_vocab

    args = resolve_model_args(cfg.model, dry_vocab(cfg), cfg.data, None)
    return dataclasses.replace(args, kernels="torch")


def by_kind(terms: Dict[str, int]) -> Dict[str, int]:
    """The analytic model's named terms summed into the dry run's kinds."""
    from megalite.planner.memory import ACTIVATIONS, STATES, TEMPORARIES, term_bytes

    out = {k: terms.get(k, 0) for k in STATES}
    out["buffers"] = 0
    out["activations"] = term_bytes(terms, ACTIVATIONS)
    out["temporaries"] = term_bytes(terms, TEMPORARIES)
    out["gathered+buckets"] = terms.get("gathered", 0) + terms.get("buckets", 0)
    out["total"] = terms["total"]
    return out


def default_rank(cfg) -> int:
    """The first rank of the pipeline stage the analytic model predicts to peak (first or
    last)."""
    from megalite.planner.dry_run import layout_dims
    from megalite.planner.memory import peak_rank

    pp_rank, _ = peak_rank(cfg, dry_args(cfg), gpu=False)
    return layout_dims(cfg).rank_of(pp_rank, 0, 0)


PLAN_USAGE = """usage: megalite plan --config FILE.yaml --gpus N [--gpus-per-node 8] [--gpu h100-80gb]
       [--tokens 1e12] [--seq_len 4096] [--global_batch_tokens 4M] [--top 10] [--json]
       [--explain] [--layout dp=8,tp=8,...] [--confirm K] [--memory-fraction 0.9]
       [--gpu-memory-gib G --gpu-tflops T --gpu-hbm-gbs B --gpu-intra-gbs I --gpu-inter-gbs E]
       [--section.field=value ...]

Ranks every dp x tp x pp / schedule / ZeRO / offload / micro-batch / recompute layout of N GPUs
that the config validation accepts by predicted step time, among those whose predicted peak
memory per GPU fits in --memory-fraction of the GPU (megalite/planner/). GPU presets: {gpus}.
A custom GPU: all five --gpu-* numbers (--gpu-tflops: the dense peak at the config's
train.precision). An fp32 run is planned at the FP32 peak, as the trainer runs it (TF32 off).
--layout evaluates one layout (keys dp, tp, pp, v, schedule, mbs, zero, offload, recompute);
--explain prints every term of the best (or that) layout, each step-time term with its formula;
--confirm K runs the dry run (megalite train --dry_run) of the top K on fake tensors."""

PLAN_FLAGS = ("--gpus", "--gpus-per-node", "--gpu", "--tokens", "--seq_len",
              "--global_batch_tokens", "--top", "--layout", "--confirm", "--memory-fraction",
              "--gpu-memory-gib", "--gpu-tflops", "--gpu-hbm-gbs", "--gpu-intra-gbs",
              "--gpu-inter-gbs")


def _number(text: str, name: str, binary: bool = False) -> float:
    """1e12, 4M, 2.5B, 512K -> float (ValueError naming the flag); ``binary``: K, M, B are
    2^10, 2^20, 2^30 (a "4M-token batch" is 1024 x 4096 tokens)."""
    scale = {"K": 2.0**10, "M": 2.0**20, "B": 2.0**30, "G": 2.0**30, "T": 2.0**40} if binary \
        else {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    t = text.strip()
    try:
        if t and t[-1].upper() in scale:
            return float(t[:-1]) * scale[t[-1].upper()]
        return float(t)
    except ValueError:
        raise ValueError(f"{name}={text}: not a number (e.g. 64, 1e12, 4M)") from None


def plan_main(argv: List[str]) -> int:
    try:
        return _plan(list(argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _gpu_spec(opts: Dict[str, str]):
    from megalite.hardware import GIB, GPU_SPECS, GPUSpec

    custom = [k for k in ("--gpu-memory-gib", "--gpu-tflops", "--gpu-hbm-gbs",
                          "--gpu-intra-gbs", "--gpu-inter-gbs") if k in opts]
    if custom:
        if len(custom) != 5:
            raise ValueError(f"a custom GPU needs all five of --gpu-memory-gib, --gpu-tflops, "
                             f"--gpu-hbm-gbs, --gpu-intra-gbs, --gpu-inter-gbs (got "
                             f"{', '.join(custom)})")
        v = {k: _number(opts[k], k) for k in custom}
        peak = v["--gpu-tflops"]  # the dense peak at the run's precision, whichever it is
        return GPUSpec("custom", int(v["--gpu-memory-gib"] * GIB),
                       {"bf16": peak, "fp16": peak, "fp32": peak}, v["--gpu-hbm-gbs"],
                       v["--gpu-intra-gbs"], v["--gpu-inter-gbs"])
    name = opts.get("--gpu", "h100-80gb").lower()
    if name not in GPU_SPECS:
        raise ValueError(f"--gpu={name}: unknown; use one of {', '.join(GPU_SPECS)} or give a "
                         "custom GPU with the five --gpu-* numbers")
    return GPU_SPECS[name]


def _plan(argv: List[str]) -> int:
    from megalite.hardware import GPU_SPECS

    if not argv or "-h" in argv or "--help" in argv:
        print(PLAN_USAGE.format(gpus=", ".join(GPU_SPECS)))
        return 0 if argv else 2
    opts = {}
    for flag in PLAN_FLAGS:
        value = _pop_option(argv, flag)
        if value is not None:
            opts[flag] = value
    flags = {f for f in ("--json", "--explain") if f in argv}
    argv = [a for a in argv if a not in flags]
    if "--gpus" not in opts:
        raise ValueError("--gpus is required: the number of GPUs of the job")
    gpus = int(_number(opts["--gpus"], "--gpus"))
    per_node = int(_number(opts.get("--gpus-per-node", "8"), "--gpus-per-node"))
    if gpus < 1 or per_node < 1:
        raise ValueError(f"--gpus={gpus}, --gpus-per-node={per_node}: both must be >= 1")
    gpu = _gpu_spec(opts)
    from megalite.planner.report import run_plan

    return run_plan(argv, opts, flags, gpus, per_node, gpu)
