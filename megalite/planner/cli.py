"""Command-line faces of the planner: ``megalite train ... --dry_run`` and ``megalite plan``."""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

GIB = 2**30


def _pop(argv: List[str], name: str) -> Optional[str]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from argv and return VALUE."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if a.startswith(name + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def _int_option(argv: List[str], name: str) -> Optional[int]:
    value = _pop(argv, name)
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
    from megalite.planner.dry_run import dry_run, missing_apis
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
    pp_rank = rank // (p.dp * p.tp)
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


def dry_args(cfg):
    """The ModelArgs the dry run builds (PyTorch norms; vocabulary without reading data)."""
    import dataclasses

    from megalite.models import resolve_model_args
    from megalite.planner.dry_run import dry_vocab

    args = resolve_model_args(cfg.model, dry_vocab(cfg), cfg.data, None)
    return dataclasses.replace(args, kernels="torch")


def by_kind(terms: Dict[str, int]) -> Dict[str, int]:
    """The analytic model's named terms summed into the dry run's kinds."""
    out = {k: terms.get(k, 0) for k in ("params", "grads", "master", "optimizer")}
    out["buffers"] = 0
    out["activations"] = sum(v for k, v in terms.items()
                             if k.startswith(("activations", "head", "loss")))
    out["temporaries"] = sum(v for k, v in terms.items() if k.startswith("temporaries"))
    out["gathered+buckets"] = terms.get("gathered", 0) + terms.get("buckets", 0)
    out["total"] = terms["total"]
    return out


def default_rank(cfg) -> int:
    """The first rank of the pipeline stage the analytic model predicts to peak (first or
    last)."""
    from megalite.planner.memory import peak_rank

    pp_rank, _ = peak_rank(cfg, dry_args(cfg), gpu=False)
    return pp_rank * cfg.parallel.dp * cfg.parallel.tp
