"""Tensor parallelism on p gloo ranks (p = 2 and 4) through the layers a run trains with: the MLP
and the whole GPT block of a model built by the TP plan (``build_model`` + ``parallelize``), with
and without sequence parallelism, each with the bytes per collective kind against theory; and
that MLP timed against megatron-core's ColumnParallelLinear -> GELU -> RowParallelLinear on the
same weights (without SP: megatron-core's SP path needs CUDA, and its block needs CUDA kernels).

Theory per MLP and iteration (forward + backward), N = b*s*h*4 bytes (fp32):
  without SP: one all-reduce of N forward (the row exit, g) and one backward (the column entry,
  f, overlapped with the dW matmuls);
  with SP: an all-gather + a reduce-scatter of N in each direction (comm.py's meter counts the
  full gathered / reduced size for both kinds), so 2N all-gather + 2N reduce-scatter.
A block has two such regions (attention and MLP): 4N all-reduce, or 4N + 4N with SP.

Timing: forward+backward on rank 0, ranks in step (a barrier before each iteration), one torch
thread per rank. The ratio megalite / megatron-core is the median of per-block ratios over
``--blocks`` (>= 5) blocks of ``--iters`` (>= 20) iterations of each, interleaved iteration by
iteration (a block's time: the median of its iterations), measured in two runs. A run whose per-block ratios spread beyond +-10% of its median is repeated, not scored
(at most ``--tries`` attempts per run). The megalite-only rows (block, SP) are timed the same
way, without a ratio.

    python bench/tp.py [--tp 2 4 --b 2 --s 256 --h 512 --ffn 2048 --iters 20 --blocks 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

Step = Callable[[], None]
MAX_SPREAD = 0.10


def plan_block(a, p: int, rank: int, group, meter, sp: bool) -> nn.Module:
    """Layer 0 of a one-layer GPT built exactly as training builds it (meta device, the TP
    plan's module replacement, then this rank's slices of the seeded weights)."""
    from megalite.config.schema import ModelConfig
    from megalite.models import build_model, resolve_model_args
    from megalite.parallel.dims import ParallelDims
    from megalite.tensor_parallel.plan import parallelize

    dims = ParallelDims(dp=1, tp=p, pp=1, rank=rank, meter=meter, tp_group=group)
    args = resolve_model_args(ModelConfig(num_layers=1, hidden_size=a.h, num_heads=a.h // 64,
                                          ffn_hidden_size=a.ffn, max_seq_len=a.s), 128)
    return build_model(args, 0, plan=lambda m: (m, parallelize(m, dims, sp))).layers[0]


def make_step(module: nn.Module, a, p: int, rank: int, sp: bool) -> Tuple[Step, torch.Tensor]:
    """forward+backward of ``module`` on a fixed [b, s, h] input (with SP this rank's sequence
    chunk of it) and output gradient; also returns the full input."""
    x_full = torch.randn(a.b, a.s, a.h, generator=torch.Generator().manual_seed(1))
    dy_full = torch.randn(a.b, a.s, a.h, generator=torch.Generator().manual_seed(2))
    x = (x_full.chunk(p, 1)[rank] if sp else x_full).clone().requires_grad_()
    dy = dy_full.chunk(p, 1)[rank] if sp else dy_full

    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    return step, x_full


def megatron_mlp(a, p: int, mlp: nn.Module, x_full: torch.Tensor) -> Tuple[Optional[Step], str]:
    """megatron-core's column/row layers on CPU (sequence-first [s, b, h]) holding the plan's
    MLP shards; (None, why) when unusable."""
    try:
        from megatron.core import ModelParallelConfig, parallel_state
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    except ImportError:
        return None, "skipped: megatron-core not installed (pip install megatron-core)"
    try:
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=p)
        cfg = ModelParallelConfig(tensor_model_parallel_size=p, sequence_parallel=False,
                                  use_cpu_initialization=True, params_dtype=torch.float32)
        init = torch.nn.init.xavier_normal_
        col = ColumnParallelLinear(a.h, a.ffn, config=cfg, init_method=init, bias=True,
                                   gather_output=False)
        row = RowParallelLinear(a.ffn, a.h, config=cfg, init_method=init, bias=True,
                                input_is_parallel=True, skip_bias_add=False)
        with torch.no_grad():  # the same [out, in] shard convention as megalite's layers
            col.weight.copy_(mlp.fc_in.weight)
            col.bias.copy_(mlp.fc_in.bias)
            row.weight.copy_(mlp.fc_out.weight)
            row.bias.copy_(mlp.fc_out.bias)
        x = x_full.transpose(0, 1).contiguous().requires_grad_()
        dy = torch.randn(a.b, a.s, a.h, generator=torch.Generator().manual_seed(2))
        dy = dy.transpose(0, 1).contiguous()

        def forward(inp: torch.Tensor) -> torch.Tensor:
            h, _ = col(inp)
            return row(F.gelu(h, approximate="tanh"))[0]

        def step() -> None:
            x.grad = None
            col.zero_grad(set_to_none=True)
            row.zero_grad(set_to_none=True)
            forward(x).backward(dy)

        step()  # fail here, not in the timed loop
        with torch.no_grad():
            diff = (forward(x).transpose(0, 1) - mlp(x_full)).abs().max().item()
        return step, f"ok, max |y - y_megalite| = {diff:.1e}"
    except Exception as e:  # noqa: BLE001 - report why and go on
        return None, f"failed on CPU/gloo: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def block_times(steps: Dict[str, Step], iters: int) -> Dict[str, float]:
    """One block: ``iters`` iterations of each step, interleaved iteration by iteration (in an
    order that alternates, ABBA...), so both see the same machine load; each step's median."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            dist.barrier()
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def ratio_run(ours: Step, theirs: Step, a) -> Dict[str, object]:
    """One run: per-block ratios of medians, their median and spread."""
    ratios, mine, ref = [], [], []
    for _ in range(a.blocks):
        t = block_times({"ours": ours, "theirs": theirs}, a.iters)
        ratios.append(t["ours"] / t["theirs"])
        mine.append(t["ours"])
        ref.append(t["theirs"])
    med = statistics.median(ratios)
    spread = max(abs(r / med - 1) for r in ratios)
    return {"ratio": med, "spread": spread, "ratios": ratios,
            "ms": (statistics.median(mine) * 1e3, statistics.median(ref) * 1e3)}


def _rank0_accepts(run: Dict[str, object]) -> bool:
    """Rank 0's timings decide whether a run is scored; every rank follows, so all of them
    run the same number of steps (and collectives)."""
    keep = torch.tensor([float(run["spread"] <= MAX_SPREAD)])
    dist.broadcast(keep, src=0)
    return bool(keep.item())


def _rank(rank: int, world: int, port: int, a, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        from megalite.parallel.comm import CommMeter

        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.new_group(list(range(world)))
        meter = CommMeter()
        steps: Dict[str, Step] = {}
        measured: Dict[str, Dict[str, int]] = {}
        mlp_no_sp, x_full = None, None
        for sp in (False, True):
            block = plan_block(a, world, rank, group, meter, sp)
            suffix = " SP" if sp else ""
            for name, module in ((f"megalite MLP{suffix}", block.mlp),
                                 (f"megalite block{suffix}", block)):
                steps[name], x = make_step(module, a, world, rank, sp)
                for _ in range(a.warmup):
                    steps[name]()
                meter.take()
                steps[name]()
                measured[name] = meter.take()
            if not sp:
                mlp_no_sp, x_full = block.mlp, x
        theirs, note = megatron_mlp(a, world, mlp_no_sp, x_full)
        runs: List[Dict[str, object]] = []
        rejected: List[Dict[str, object]] = []
        if theirs is not None:
            for _ in range(a.warmup):
                theirs()
            while len(runs) < 2 and len(rejected) < a.tries:
                run = ratio_run(steps["megalite MLP"], theirs, a)
                (runs if _rank0_accepts(run) else rejected).append(run)
        others = {k: v for k, v in steps.items() if k != "megalite MLP"}
        per_block = [block_times(others, a.iters) for _ in range(a.blocks)]
        medians = {k: statistics.median(b[k] for b in per_block) * 1e3 for k in others}
        if rank == 0:
            out.put(("ok", measured, note, runs, rejected, medians))
    except BaseException:  # noqa: BLE001
        out.put(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(p: int, a) -> Optional[tuple]:
    from megalite.launcher.local import free_port

    ctx = tmp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, p, port, a, out), daemon=True) for r in range(p)]
    for proc in procs:
        proc.start()
    result = out.get(timeout=3600)
    for proc in procs:
        proc.join(timeout=30)
    if result[0] != "ok":
        print(result[1], file=sys.stderr)
        return None
    return result[1:]


def report(p: int, a, result: tuple) -> None:
    measured, note, runs, rejected, medians = result
    n = a.b * a.s * a.h * 4
    theory = {"megalite MLP": {"all_reduce": 2 * n},
              "megalite MLP SP": {"all_gather": 2 * n, "reduce_scatter": 2 * n},
              "megalite block": {"all_reduce": 4 * n},
              "megalite block SP": {"all_gather": 4 * n, "reduce_scatter": 4 * n}}
    print(f"\nTP={p} gloo, b={a.b} s={a.s} h={a.h} ffn={a.ffn} fp32, 1 thread/rank; "
          f"N = b*s*h*4 = {n} bytes")
    print("bytes per iteration (forward+backward), measured vs theory:")
    for name, got in measured.items():
        for kind in sorted(set(got) | set(theory[name])):
            ok = "ok" if got.get(kind, 0) == theory[name].get(kind, 0) else "DIFFERS"
            print(f"  {name:18s} {kind:15s} {got.get(kind, 0):>10d}   theory "
                  f"{theory[name].get(kind, 0):>10d}  {ok}")
    print(f"megatron-core MLP: {note}")
    for i, run in enumerate(runs, 1):
        ours, theirs = run["ms"]
        print(f"  run {i}: megalite MLP / megatron-core MLP = {run['ratio']:.3f} "
              f"(spread of {len(run['ratios'])} block ratios +-{run['spread'] * 100:.1f}%: "
              f"{', '.join(f'{r:.3f}' for r in run['ratios'])}); "
              f"medians {ours:.2f} vs {theirs:.2f} ms")
    for run in rejected:
        print(f"  rejected (spread +-{run['spread'] * 100:.1f}% > "
              f"{MAX_SPREAD * 100:.0f}%): ratio {run['ratio']:.3f}")
    if len(runs) < 2 and note.startswith("ok"):
        print(f"  fewer than 2 runs within +-{MAX_SPREAD * 100:.0f}% after {a.tries} tries: "
              f"not scored")
    print("megalite-only rows, forward+backward median of block medians:")
    for name, ms in medians.items():
        print(f"  {name:18s} {ms:8.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    for k, v in dict(b=2, s=256, h=512, ffn=2048, iters=20, blocks=5, warmup=3,
                     tries=4).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    a = ap.parse_args()
    if a.iters < 20 or a.blocks < 5:
        print("note: fewer than 5 blocks of 20 iterations: a smoke run, not a measurement")
    status = 0
    for p in a.tp:
        result = run_world(p, a)
        if result is None:
            status = 1
            continue
        report(p, a, result)
    return status


if __name__ == "__main__":
    sys.exit(main())
