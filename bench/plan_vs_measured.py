"""Predicted vs dry-run vs measured peak memory per layout, and how long the full-scale dry runs
take.

Per layout (4 CPU ranks, gloo, one torch thread each): the analytic model's peak of the rank
(``megalite.planner.memory``, with the attention and dropout paths CPU takes, no GPU allocator
allowance), the dry run's (``megalite train --dry_run``: the real code on fake tensors, fake
process group), and the real step's measured by the same tracker (``MemTracker`` on the real
tensors; CPU RSS would count the allocator and the interpreter, not the step). Ratios to the
measured peak side by side. Step *time* is not predicted for CPUs (the planner's roofline
needs a GPU's peak and bandwidth), so the measured CPU step time is shown alone.

Then the full-scale dry runs (``FULL_SCALE``) with their wall time, peak and the analytic
figure, first and last pipeline stage: LLaMA-7B at 64 ranks as dp8 x tp8, with pp 2 (1F1B),
pp 4 (zb-h1) and pp 8 (interleaved, v=2), and the 70B at 512 and 1024 ranks.

    python bench/plan_vs_measured.py [--quick]   (--quick: the first four layouts)
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

SMALL = ["--model.family=llama", "--model.num_layers=4", "--model.hidden_size=256",
         "--model.num_heads=8", "--model.num_kv_heads=4", "--model.max_seq_len=256",
         "--model.vocab_size=4096", "--data.seq_len=256"]
FULL_SCALE = [  # (config, world size, overrides)
    ("configs/llama-7b.yaml", 64, []),
    ("configs/llama-7b.yaml", 64, ["--parallel.dp=4", "--parallel.tp=8", "--parallel.pp=2"]),
    ("configs/llama-7b.yaml", 64, ["--parallel.dp=4", "--parallel.tp=4", "--parallel.pp=4",
                                   "--parallel.schedule=zb-h1"]),
    ("configs/llama-7b.yaml", 64, ["--parallel.dp=2", "--parallel.tp=4", "--parallel.pp=8",
                                   "--parallel.schedule=interleaved",
                                   "--parallel.virtual_stages=2"]),
    ("configs/llama-70b.yaml", 512, []),
    ("configs/llama-70b.yaml", 1024, ["--parallel.dp=16"]),
]
LAYOUTS = [
    ("dp4 zero0", ["--parallel.dp=4", "--train.micro_batch_size=4"]),
    ("dp2 tp2 sp zero1 bf16", ["--parallel.dp=2", "--parallel.tp=2",
                               "--parallel.sequence_parallel=true", "--parallel.zero_stage=1",
                               "--train.precision=bf16", "--train.micro_batch_size=4"]),
    ("dp4 zero3 selective", ["--parallel.dp=4", "--parallel.zero_stage=3",
                             "--model.recompute=selective", "--train.micro_batch_size=4"]),
    ("dp2 pp2 1f1b zero2", ["--parallel.dp=2", "--parallel.pp=2", "--parallel.zero_stage=2",
                            "--train.micro_batch_size=2", "--train.grad_accum=8"]),
    ("tp2 pp2 zb-h1", ["--parallel.dp=1", "--parallel.tp=2", "--parallel.pp=2",
                       "--parallel.schedule=zb-h1", "--train.micro_batch_size=2",
                       "--train.grad_accum=8"]),
    ("pp4 interleaved full", ["--parallel.dp=1", "--parallel.pp=4",
                              "--parallel.schedule=interleaved", "--parallel.virtual_stages=2",
                              "--model.num_layers=8",
                              "--model.recompute=full", "--train.micro_batch_size=2",
                              "--train.grad_accum=8"]),
]


def config(overrides, world):
    from megalite.config.load import parse_args

    cfg, _ = parse_args(["--config", os.path.join(REPO, "configs/tiny.yaml"), *SMALL,
                         *overrides], verbose=False, world_size=world)
    return cfg


def _rank(rank, port, layouts, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="4", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        import torch
        import torch.distributed as dist

        from megalite.planner.dry_run import build_rank, gloo_dims, tracked_step

        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        result = {}
        for name, overrides in layouts:
            cfg = config(overrides, 4)
            dims = gloo_dims(cfg, rank)
            parts = build_rank(cfg, dims, cfg.model.vocab_size)
            tracked_step(parts, cfg, cfg.train.grad_accum)  # warm-up (moments, caches)
            step = tracked_step(parts, cfg, cfg.train.grad_accum)
            result[name] = (step.peak, step.seconds)
        dist.destroy_process_group()
        out.put((rank, "ok", result))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        out.put((rank, "error", repr(e)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the first four layouts only")
    a = ap.parse_args(argv)
    from _worlds import collect

    from megalite.launcher.local import free_port
    from megalite.planner.cli import dry_args
    from megalite.planner.dry_run import dry_run, layout_dims
    from megalite.planner.memory import rank_memory

    layouts = LAYOUTS[:4] if a.quick else LAYOUTS
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, layouts, out)) for r in range(4)]
    real, failure = collect(procs, out, timeout_s=900)
    if failure:
        print(f"world failed: {failure}")
        return 1
    mib = 2**20
    print(f"{'layout':<24} {'rank':>4} | {'measured':>9} {'dry run':>9} {'analytic':>9} MiB | "
          f"{'dry/meas':>8} {'anal/meas':>9} | {'CPU step s':>10}")
    for name, overrides in layouts:
        cfg = config(overrides, 4)
        p = cfg.parallel
        for rank in ((0, 3) if p.pp > 1 else (0,)):
            peak, seconds = real[rank][name]
            fake = dry_run(cfg, rank).peak
            analytic = rank_memory(cfg, dry_args(cfg), layout_dims(cfg, rank).pp_rank,
                                   gpu=False)
            print(f"{name:<24} {rank:>4} | {peak / mib:>9.2f} {fake / mib:>9.2f} "
                  f"{analytic['total'] / mib:>9.2f}     | {fake / peak:>8.3f} "
                  f"{analytic['total'] / peak:>9.3f} | {seconds:>10.3f}")
    from megalite.config.load import parse_args

    print("\nfull-scale dry runs (one rank, fake tensors):")
    for path, world, overrides in FULL_SCALE:
        cfg, _ = parse_args(["--config", os.path.join(REPO, path), *overrides], verbose=False,
                            world_size=world)
        for rank in ((0, world - 1) if cfg.parallel.pp > 1 else (0,)):
            start = time.perf_counter()
            fake = dry_run(cfg, rank)
            took = time.perf_counter() - start
            analytic = rank_memory(cfg, dry_args(cfg), layout_dims(cfg, rank).pp_rank,
                                   gpu=False)["total"]
            p = cfg.parallel
            shape = f"dp{p.dp} tp{p.tp} pp{p.pp} {p.schedule}" + (
                f" v{p.virtual_stages}" if p.virtual_stages > 1 else "")
            print(f"  {os.path.basename(path)} {shape} at {world} ranks, rank {rank}: "
                  f"{took:.1f} s, {fake.micro_batches} of {fake.of} micro-batches; peak "
                  f"{fake.peak / 2**30:.2f} GiB, analytic {analytic / 2**30:.2f} GiB "
                  f"({fake.peak / analytic:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
