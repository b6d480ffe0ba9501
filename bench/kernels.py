"""Microbenchmarks of megalite's fused kernels (``megalite.ops``) against PyTorch.

For each op, pass (fwd / bwd), shape and dtype: time per call, achieved GB/s (bytes read + written
by the kernel: x and y, plus dy for the backward; weights, statistics and the broadcast mask are
negligible and not counted; causal rows count the whole row although only the lower triangle is
read), the speed-up over PyTorch eager (``F.layer_norm``,
``F.rms_norm``, and ``x*scale -> masked_fill -> softmax`` composed) and over ``torch.compile`` of
that same eager code where it works. The machine's copy bandwidth (``dst.copy_(src)``, measured in
this run) is printed first; on a GPU each row also shows the percentage of it.

    python bench/kernels.py [--device cpu|cuda] [--dtypes fp32,bf16] [--compile/--no-compile]
                            [--hidden 1024,4096,8192,12288,16384]
    megalite bench kernels ...

Targets (issue 6): CPU softmax >= 2x eager, norms >= 1.0x; GPU >= 85% of copy bandwidth at
hidden >= 4096 in bf16, faster than eager and torch.compile.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from megalite import ops
from megalite.ops import _backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Norm widths. On a GPU also 12288 and 16384, past the norm backward's widest register tile
# (12288 in 16-bit, 8192 in fp32; csrc/cuda/norm.cu), where the generic kernel takes over.
HIDDEN = {"cpu": (1024, 4096, 8192), "cuda": (1024, 4096, 8192, 12288, 16384)}


def timer(device: str, fn: Callable[[], object], min_time: float = 0.2) -> float:
    """Median seconds per call of ``fn`` over repeated batches (after a warm-up)."""
    fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < min_time / 4 or n < 3:
        fn()
        n += 1
    sync()
    per = (time.perf_counter() - start) / n
    reps = max(1, int(min_time / 5 / per))
    samples = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def copy_bandwidth(device: str) -> float:
    """GB/s of a plain device copy (bytes read + written), the roofline for these kernels."""
    n = (512 if device == "cuda" else 64) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / timer(device, lambda: dst.copy_(src)) / 1e9


def eager_softmax(x, mask, scale, causal):
    """What a model writes without the fused kernel."""
    s = x * scale
    if causal:
        sq, sk = x.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(1)
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1)


def cases(device: str, hidden: Optional[List[int]] = None):
    """(op name, shape label, make inputs(dtype) -> (ours, eager) callables on fresh tensors)."""
    big = device == "cuda"
    elems = 2**26 if big else 2**22  # 64M elements on a GPU, 4M on a CPU
    for h in hidden or HIDDEN[device]:
        rows = elems // h
        for op in ("layer_norm", "rms_norm"):
            yield op, f"{rows}x{h}", _norm_case(op, rows, h, device)
    for sk in (128, 1024, 4096, 16384):
        sq = min(sk, 1024)
        b_h = max(1, elems // (sq * sk))
        yield "masked_softmax", f"{b_h}x{sq}x{sk}", _softmax_case(False, b_h, sq, sk, device)
        yield "causal_softmax", f"{b_h}x{sk}x{sk}" if sk <= 2048 else f"{b_h}x{sq}x{sk}", \
            _softmax_case(True, b_h, min(sk, 2048), sk, device)


def _norm_case(op: str, rows: int, h: int, device: str):
    def make(dtype):
        x = torch.randn(rows, h, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(h, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(h, device=device, dtype=dtype, requires_grad=True)
        if op == "layer_norm":
            ours = lambda: ops.layer_norm(x, w, b, 1e-5)
            eager = lambda: F.layer_norm(x, (h,), w, b, 1e-5)
        else:
            ours = lambda: ops.rms_norm(x, w, 1e-5)
            eager = lambda: F.rms_norm(x, (h,), w, 1e-5)
        return x, ours, eager
    return make


def _softmax_case(causal: bool, batch_heads: int, sq: int, sk: int, device: str):
    def make(dtype):
        if causal:
            x = torch.randn(batch_heads, sq, sk, device=device, dtype=dtype, requires_grad=True)
            ours = lambda: ops.scaled_causal_softmax(x, 0.125)
            eager = lambda: eager_softmax(x, None, 0.125, True)
        else:  # 2 sequences, heads = batch_heads / 2, padding the last eighth of the keys
            b = 2 if batch_heads % 2 == 0 else 1
            x = torch.randn(b, batch_heads // b, sq, sk, device=device, dtype=dtype,
                            requires_grad=True)
            mask = torch.zeros(b, 1, 1, sk, dtype=torch.bool, device=device)
            mask[..., sk - sk // 8:] = True
            ours = lambda: ops.scaled_masked_softmax(x, mask, 0.125)
            eager = lambda: eager_softmax(x, mask, 0.125, False)
        return x, ours, eager
    return make


def backward_of(fn: Callable[[], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    """A callable running only the backward of ``fn`` (graph built once, kept)."""
    y = fn()
    dy = torch.randn_like(y)
    return lambda: torch.autograd.grad(y, x, dy, retain_graph=True)


def run(device: str, dtypes: List[str], use_compile: bool, passes: List[str],
        only: Optional[str] = None, hidden: Optional[List[int]] = None) -> None:
    copy_bw = copy_bandwidth(device)
    lib = _backend.cpu_lib if device == "cpu" else _backend.cuda_lib
    what = (f"CPU {lib.isa()}, {torch.get_num_threads()} threads" if device == "cpu" and lib
            else torch.cuda.get_device_name() if device == "cuda" else "no kernel library")
    print(f"device: {device} ({what}); torch {torch.__version__}; "
          f"measured copy bandwidth {copy_bw:.1f} GB/s")
    if lib is None:
        print("warning: the kernel library is not built: 'ours' is the PyTorch reference")
    head = f"{'op':<15}{'pass':<5}{'shape':>17} {'dtype':<5}{'time us':>10}{'GB/s':>9}" \
           f"{'vs eager':>10}{'vs compile':>11}"
    print(head + ("  % copy" if device == "cuda" else ""))
    print("-" * (len(head) + (8 if device == "cuda" else 0)))
    for name, shape, make in cases(device, hidden):
        if only and only not in name:
            continue
        for dname in dtypes:
            dtype = DTYPES[dname]
            x, ours, eager = make(dtype)
            for p in passes:
                bytes_moved = x.numel() * x.element_size() * (2 if p == "fwd" else 3)
                with torch.no_grad() if p == "fwd" else torch.enable_grad():
                    t_ours = timer(device, ours if p == "fwd" else backward_of(ours, x))
                    t_eager = timer(device, eager if p == "fwd" else backward_of(eager, x))
                    t_comp = None
                    if use_compile and p == "fwd":  # compiled per shape, as a model sees it
                        try:
                            t_comp = timer(device, torch.compile(eager, dynamic=False))
                        except Exception as e:  # noqa: BLE001 - report it and print "-"
                            print(f"  (torch.compile failed: {type(e).__name__}: {e})",
                                  file=sys.stderr)
                gbs = bytes_moved / t_ours / 1e9
                comp = f"{t_comp / t_ours:>10.2f}x" if t_comp else f"{'-':>11}"
                row = (f"{name:<15}{p:<5}{shape:>17} {dname:<5}{t_ours * 1e6:>10.1f}{gbs:>9.1f}"
                       f"{t_eager / t_ours:>9.2f}x{comp}")
                if device == "cuda":
                    row += f"{100 * gbs / copy_bw:>7.0f}%"
                print(row, flush=True)
            del x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalite bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None,
                   help="comma list of fp32,bf16,fp16 (default: fp32,bf16 on CPU, bf16,fp32 on GPU)")
    p.add_argument("--passes", default="fwd,bwd", help="fwd, bwd or both")
    p.add_argument("--compile", dest="use_compile", action=argparse.BooleanOptionalAction,
                   default=None, help="also time torch.compile of the eager code (forward; default "
                                      "on for cuda, off for cpu where inductor compiles slowly)")
    p.add_argument("--op", default=None, help="only ops whose name contains this")
    p.add_argument("--hidden", default=None,
                   help="comma list of norm widths (default: "
                        + "; ".join(f"{','.join(map(str, v))} on {k}" for k, v in HIDDEN.items())
                        + ")")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both PyTorch and the kernels (default: torch's)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    dtypes = (a.dtypes or ("bf16,fp32" if a.device == "cuda" else "fp32,bf16")).split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        print(f"error: unknown dtype(s) {bad}; choose from {sorted(DTYPES)}", file=sys.stderr)
        return 2
    try:
        hidden = [int(h) for h in a.hidden.split(",")] if a.hidden else None
    except ValueError:
        hidden = [0]
    if hidden is not None and min(hidden) < 1:
        print(f"error: --hidden {a.hidden!r}: give a comma list of positive integers, e.g. "
              "--hidden 4096,12288", file=sys.stderr)
        return 2
    use_compile = a.device == "cuda" if a.use_compile is None else a.use_compile
    if a.device == "cuda" and not _backend.model_uses_kernels(torch.device("cuda")):
        print("note: benchmarking the CUDA kernels directly (models use them only once "
              "verified, see megalite/ops/_backend.py)")
    run(a.device, dtypes, use_compile, a.passes.split(","), a.op, hidden)
    return 0


if __name__ == "__main__":
    sys.exit(main())
