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
    print(f"peak memory of rank {rank} by kind (GiB):")
    print(memory_table(columns))
    return 0


def default_rank(cfg) -> int:
    """Rank 0: the first stage holds the most micro-batches in flight."""
    return 0
