"""Tensor parallelism on 2 gloo ranks: megalite's Column -> GELU -> Row MLP and one whole GPT
transformer block through the TP plan, with and without sequence parallelism; the bytes each
collective kind moved against the theory, and (when megatron-core imports) megatron-core's
ColumnParallelLinear/RowParallelLinear on the same MLP shapes.

Theory per MLP and iteration (forward + backward), N = b*s*h*4 bytes (fp32):
  without SP: one all-reduce of N forward (g) and one backward (f);
  with SP: an all-gather + a reduce-scatter of N in each direction (comm.py's meter counts the
  full gathered / reduced size for both kinds), so 2N all-gather + 2N reduce-scatter.
A block has two such regions (attention and MLP): 4N all-reduce, or 4N + 4N with SP.

Timing: median over iterations of forward+backward on rank 0, after warm-up; the variants run in
interleaved blocks so machine noise hits all alike; one torch thread per rank.

    python bench/tp.py [--b 4 --s 256 --h 512 --ffn 2048 --iters 12 --blocks 3]
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
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

Step = Callable[[], None]


def reference(a) -> Tuple[torch.nn.Linear, torch.nn.Linear, torch.Tensor]:
    """The full MLP weights and input [b, s, h], identical on every rank."""
    torch.manual_seed(0)
    return torch.nn.Linear(a.h, a.ffn), torch.nn.Linear(a.ffn, a.h), torch.randn(a.b, a.s, a.h)


def megalite_mlp(a, group, sp: bool, meter) -> Tuple[Step, torch.Tensor]:
    from megalite.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    p, r = dist.get_world_size(group), dist.get_rank(group)
    fc1, fc2, x = reference(a)
    col = ColumnParallelLinear.from_linear(fc1, group, meter, sequence_parallel=sp)
    row = RowParallelLinear.from_linear(fc2, group, meter, sequence_parallel=sp)
    x = (x.chunk(p, 1)[r] if sp else x).contiguous().requires_grad_()
    g = torch.randn(a.b, a.s // p if sp else a.s, a.h)

    def step() -> None:
        x.grad = None
        for m in (col, row):
            m.zero_grad(set_to_none=True)
        row(F.gelu(col(x))).backward(g)

    with torch.no_grad():
        y = row(F.gelu(col(x)))
    return step, y


def megatron_mlp(a, sp: bool, y_megalite: torch.Tensor) -> Tuple[Optional[Step], str]:
    """megatron-core's column/row layers on CPU (seq-first [s, b, h]); (None, why) if unusable."""
    try:
        from megatron.core import ModelParallelConfig, parallel_state
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    except ImportError:
        return None, "skipped: megatron-core not installed"
    try:
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        cfg = ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sp,
                                  use_cpu_initialization=True, params_dtype=torch.float32)
        init = torch.nn.init.xavier_normal_
        col = ColumnParallelLinear(a.h, a.ffn, config=cfg, init_method=init, bias=True,
                                   gather_output=False)
        row = RowParallelLinear(a.ffn, a.h, config=cfg, init_method=init, bias=True,
                                input_is_parallel=True, skip_bias_add=False)
        fc1, fc2, x = reference(a)
        r = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():  # same weights as megalite (same [out, in] shard convention)
            col.weight.copy_(fc1.weight.chunk(2, 0)[r])
            col.bias.copy_(fc1.bias.chunk(2, 0)[r])
            row.weight.copy_(fc2.weight.chunk(2, 1)[r])
            row.bias.copy_(fc2.bias)
        x = x.transpose(0, 1)  # megatron-core is sequence-first: [s, b, h]
        x = (x.chunk(2, 0)[r] if sp else x).contiguous().requires_grad_()
        g = torch.randn(x.shape)

        def step() -> None:
            x.grad = None
            for m in (col, row):
                m.zero_grad(set_to_none=True)
            h, _ = col(x)
            y, _ = row(F.gelu(h))
            y.backward(g)

        step()  # fail here, not in the timed loop
        with torch.no_grad():
            diff = (row(F.gelu(col(x)[0]))[0].transpose(0, 1) - y_megalite).abs().max()
        return step, f"ok (max |y - y_megalite| = {diff.item():.2e})"
    except Exception as e:  # noqa: BLE001 - report why and go on
        return None, f"failed on CPU/gloo: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def megalite_block(a, group, sp: bool, meter, rank: int) -> Step:
    """One GPT transformer block (LayerNorm, attention, LayerNorm, MLP) through megalite's TP
    plan: the region entry collective on each norm's output, row-parallel exits."""
    from megalite.config.schema import ModelConfig
    from megalite.models import build_model, resolve_model_args
    from megalite.parallel.dims import ParallelDims
    from megalite.tensor_parallel.plan import parallelize

    dims = ParallelDims(dp=1, tp=2, pp=1, rank=rank, meter=meter, tp_group=group)
    args = resolve_model_args(ModelConfig(num_layers=1, hidden_size=a.h, num_heads=a.h // 64,
                                          ffn_hidden_size=a.ffn, max_seq_len=a.s), 128)
    block = build_model(args, 0, plan=lambda m: (m, parallelize(m, dims, sp))).layers[0]
    s_local = a.s // 2 if sp else a.s
    x = torch.randn(a.b, s_local, a.h, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    dy = torch.randn(a.b, s_local, a.h, generator=torch.Generator().manual_seed(2))

    def step() -> None:
        block(x).backward(dy)

    return step


def time_interleaved(steps: Dict[str, Step], a) -> Dict[str, List[float]]:
    for step in steps.values():
        for _ in range(a.warmup):
            step()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    per_block = max(1, -(-a.iters // a.blocks))
    for _ in range(a.blocks):
        for name, step in steps.items():
            for _ in range(per_block):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return times


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
        outputs: Dict[bool, torch.Tensor] = {}
        for sp in (False, True):
            name = f"megalite{' SP' if sp else ''}"
            steps[name], outputs[sp] = megalite_mlp(a, group, sp, meter)
            meter.take()
            steps[name]()
            measured[name] = meter.take()
        for sp in (False, True):
            name = f"megalite block{' SP' if sp else ''}"
            steps[name] = megalite_block(a, group, sp, meter, rank)
            meter.take()
            steps[name]()
            measured[name] = meter.take()
        notes = {}
        for sp in (False, True):
            step, why = megatron_mlp(a, sp, outputs[sp])
            notes[f"megatron-core{' SP' if sp else ''}"] = why
            if step is not None:
                steps[f"megatron-core{' SP' if sp else ''}"] = step
        times = time_interleaved(steps, a)
        if rank == 0:
            out.put(("ok", {k: statistics.median(v) for k, v in times.items()}, measured,
                     notes, {k: len(v) for k, v in times.items()}))
    except BaseException:  # noqa: BLE001
        out.put(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in dict(b=4, s=256, h=512, ffn=2048, iters=12, blocks=3, warmup=3).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    a = ap.parse_args()
    from megalite.launcher.local import free_port

    ctx = tmp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, a, out), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=900)
    for p in procs:
        p.join(timeout=30)
    if result[0] != "ok":
        print(result[1], file=sys.stderr)
        return 1
    _, med, measured, notes, counts = result
    n = a.b * a.s * a.h * 4
    # MLP: one exit all-reduce forward, one entry all-reduce backward. A block has two regions
    # (attention, MLP): twice that. With SP each all-reduce becomes an all-gather + a
    # reduce-scatter of the same full size (the meter counts full sizes; ring traffic is equal).
    # The SP input gathered by the entry is kept for backward, not re-gathered: no extra gather.
    theory = {"megalite": {"all_reduce": 2 * n},
              "megalite SP": {"all_gather": 2 * n, "reduce_scatter": 2 * n},
              "megalite block": {"all_reduce": 4 * n},
              "megalite block SP": {"all_gather": 4 * n, "reduce_scatter": 4 * n}}
    print(f"TP=2 gloo, MLP b={a.b} s={a.s} h={a.h} ffn={a.ffn} fp32, 1 thread/rank; "
          f"N = b*s*h*4 = {n} bytes")
    print("bytes per iteration (forward+backward), measured vs theory:")
    for name, got in measured.items():
        for kind in sorted(set(got) | set(theory[name])):
            print(f"  {name:18s} {kind:15s} {got.get(kind, 0):>10d}   theory "
                  f"{theory[name].get(kind, 0):>10d}")
    print("forward+backward time, median (iterations):")
    for name, t in med.items():
        print(f"  {name:16s} {t * 1e3:8.2f} ms  ({counts[name]})")
    for name, why in notes.items():
        print(f"  {name:16s} {why}")
    for sp in ("", " SP"):
        if f"megatron-core{sp}" in med:
            ratio = med[f"megalite{sp}"] / med[f"megatron-core{sp}"]
            print(f"ratio megalite{sp} / megatron-core{sp}: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
