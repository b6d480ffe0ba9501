"""Checkpoint I/O: megalite's sharded DCP save and load with 1, 2 and 4 ranks against one
``torch.save`` / ``torch.load`` of the same state; the fraction of save time that
``checkpoint.async_save`` hides; peak extra host memory at save and during
``megalite convert --to hf``.

Every world is freshly spawned (gloo, one torch thread per rank) and trains megalite's GPT with
``parallel.dp=N``, ``parallel.zero_stage=1`` (each rank owns 1/N of the fp32 masters and AdamW
moments: what it writes), fp32, on the synthetic corpus. After one training step (the moments
exist) each repetition times, on every rank between barriers:
  save   ``Trainer.save_checkpoint()`` (``checkpoint.save``: DCP write, fsync, meta.json with
         CRCs, rename, ``latest``), a new step each time (``checkpoint.keep=2``);
  load   ``Trainer.maybe_resume()`` of that checkpoint (size and CRC checks, DCP read of the
         boxes this layout needs, ``ShardedAdamW.load_state_dict``).
MB/s = the checkpoint's bytes (all files) / the slowest rank's time. The reference, in the
1-rank world, interleaved with its repetitions: ``torch.save`` of the whole state ({masters,
exp_avg, exp_avg_sq} as full tensors, the same bytes) into one file, fsynced like DCP's, and
``torch.load(weights_only=True)`` of it. Files were just written, so loads read the page cache:
this measures the save/load code paths and the copy, not the disk.

Peak extra host memory at save, per rank: a thread samples /proc/self/status VmRSS every
millisecond during the save; printed is the peak minus the RSS just before (``glibc`` heap
trimming is off, as in bench/zero.py, so freed memory does not hide a later peak), next to the
bytes the rank owns.

Async save (in the ``--async-world`` world, after its save/load repetitions): rounds of
``--async-steps`` training steps followed by a save, in three modes run in alternating
blocks: no save, ``async_save=false`` and ``async_save=true`` (the same Trainer built with
async save on; the synchronous mode runs ``checkpoint.save`` inline: ``save_checkpoint`` with
the Trainer's saver detached). A block's time
includes waiting for its last async save. Hidden fraction = 1 - (async - none) / (sync - none).
On a machine whose cores are all busy training, the writer thread competes with the step for
CPU, so less is hidden than with a spare core (or a GPU).

HF conversion: ``python -m megalite.cli convert --to hf CKPT OUT`` of the 1-rank world's
checkpoint in a fresh process, its peak RSS (ru_maxrss of a wrapper's only child) minus the peak
of a process that only imports what the conversion imports, against the model's fp32 size and
the largest safetensors shard (``--max_shard_mb``).

Ratios are medians over ``--reps`` repetitions; the spread (min-max) is printed as the noise.

    python bench/checkpoint.py [--worlds 1,2,4 --reps 3 --layers 4 --hidden 1024 --heads 16
                                --vocab 16384 --seq 32 --async-steps 2 --max-shard-mb 100]
    python bench/checkpoint.py --quick     # tiny sizes, one repetition: every row, seconds
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from _host import pin_malloc, table
from _worlds import collect

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MB = 1e6
MiB = 2**20


# ---- host memory ---------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The highest VmRSS sampled every ``period`` s while the block runs."""

    def __init__(self, period: float = 0.001):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def __enter__(self) -> "PeakRSS":
        self.before = rss_bytes()
        self.peak = self.before
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.before


# ---- one rank ------------------------------------------------------------------------------------
def megalite_argv(a, world: int, run_dir: str, async_save: bool) -> List[str]:
    return ["--config", os.path.join(REPO, "configs", "tiny.yaml"), f"--run.dir={run_dir}",
            "--run.tensorboard=false", "--run.sample_tokens=0", "--train.eval_interval=0",
            f"--data.cache_dir={a.data_cache}", "--data.source=synthetic",
            f"--data.seq_len={a.seq}", "--model.family=gpt", f"--model.num_layers={a.layers}",
            f"--model.hidden_size={a.hidden}", f"--model.num_heads={a.heads}",
            f"--model.max_seq_len={a.seq}", "--model.dropout=0",
            f"--parallel.dp={world}", "--parallel.tp=1", "--parallel.pp=1",
            "--parallel.zero_stage=1", "--train.micro_batch_size=1", "--train.grad_accum=1",
            "--train.steps=1000000", "--train.warmup_steps=0", "--train.lr_schedule=constant",
            "--train.precision=fp32", "--checkpoint.keep=2",
            f"--checkpoint.async_save={'true' if async_save else 'false'}"] + \
        ([f"--model.vocab_size={a.vocab}"] if a.vocab else [])  # 0: the tokenizer's


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _timed(fn) -> float:
    _barrier()
    t0 = time.perf_counter()
    fn()
    _barrier()
    return time.perf_counter() - t0


def _ckpt_bytes(path: str) -> Tuple[int, Dict[int, int]]:
    """(all files' bytes, {rank: bytes of the shard files it wrote})."""
    total, per_rank = 0, {}
    for name in os.listdir(path):
        size = os.path.getsize(os.path.join(path, name))
        total += size
        if name.startswith("__") and name.endswith(".distcp"):
            r = int(name[2:].split("_")[0])
            per_rank[r] = per_rank.get(r, 0) + size
    return total, per_rank


def _full_state(trainer) -> Dict[str, torch.Tensor]:
    """The whole state as full tensors (1-rank world: each entry is one box)."""
    from megalite.trainer import checkpoint

    out = {}
    for key, e in checkpoint.state_entries(trainer.engine.table,
                                           trainer.opt.state_dict()).items():
        if not e.replica:
            assert len(e.tensors) == 1 and tuple(e.tensors[0].shape) == tuple(e.global_shape), key
            out[key] = e.tensors[0]
    return out


def _torch_save(state, path: str) -> None:
    torch.save(state, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def io_world(a, world: int, rank: int, run_dir: str) -> dict:
    """Save/load repetitions (and the reference in a 1-rank world); in the world of
    ``--async-world`` ranks also the async-save blocks (one spawned world for both)."""
    from megalite.config import parse_args
    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.env import discover
    from megalite.trainer import checkpoint
    from megalite.trainer.loop import Trainer

    do_async = world == a.async_world
    cfg, _ = parse_args(megalite_argv(a, world, run_dir, do_async), verbose=False)
    dims = ParallelDims.initialize(world, 1, 1, discover(), "gloo")
    trainer = Trainer(cfg, dims)
    saver, trainer.saver = trainer.saver, None  # None: save_checkpoint runs checkpoint.save inline
    trainer.train_step()  # AdamW moments exist
    owned = sum(t.numel() * t.element_size()
                for e in checkpoint.state_entries(trainer.engine.table,
                                                  trainer.opt.state_dict()).values()
                if not e.replica for t in e.tensors)
    res = dict(save_s=[], load_s=[], save_extra=[], ref_save_s=[], ref_load_s=[],
               owned=owned, n_params=trainer.n_params, vocab=trainer.args.vocab_size)
    ref_path = os.path.join(run_dir, "reference.pt")
    for rep in range(a.reps):
        ref_first = rep % 2 == 1  # interleaved: alternate which side goes first
        if world == 1 and ref_first:
            _reference(trainer, ref_path, res)
        trainer.step = 100 + rep  # a new checkpoint each time
        with PeakRSS() as peak:
            res["save_s"].append(_timed(trainer.save_checkpoint))
        res["save_extra"].append(peak.extra)
        path = checkpoint.step_dir(trainer.ckpt_dir, trainer.step)
        trainer.step = 0
        res["load_s"].append(_timed(trainer.maybe_resume))
        assert trainer.step == 100 + rep, trainer.step
        res["bytes_read"] = trainer.bytes_read
        if world == 1 and not ref_first:
            _reference(trainer, ref_path, res)
    _barrier()
    res["ckpt_bytes"], per_rank = _ckpt_bytes(path)
    res["written"] = per_rank.get(rank, 0)
    res["ckpt"] = os.path.dirname(path)
    if do_async:
        res["async"] = _async_blocks(a, trainer, saver)
    return res


def _reference(trainer, path: str, res: dict) -> None:
    state = _full_state(trainer)
    t0 = time.perf_counter()
    _torch_save(state, path)
    res["ref_save_s"].append(time.perf_counter() - t0)
    del state
    t0 = time.perf_counter()
    loaded = torch.load(path, weights_only=True)
    res["ref_load_s"].append(time.perf_counter() - t0)
    res["ref_bytes"] = os.path.getsize(path)
    del loaded
    os.remove(path)


def _async_blocks(a, trainer, saver) -> Dict[str, List[float]]:
    """Seconds per round (``--async-steps`` steps + a save) with no save, a synchronous save
    and an asynchronous one, in alternating blocks."""
    def block(mode: str) -> float:
        trainer.saver = saver if mode == "async" else None

        def run() -> None:
            for _ in range(a.async_rounds):
                for _ in range(a.async_steps):
                    trainer.train_step()
                if mode != "none":
                    trainer.save_checkpoint()
            trainer.saver = saver
            trainer.wait_for_save()

        return _timed(run) / a.async_rounds

    modes = ["none", "sync", "async"]
    times: Dict[str, List[float]] = {m: [] for m in modes}
    for rep in range(a.reps):
        for m in (modes if rep % 2 == 0 else modes[::-1]):
            times[m].append(block(m))
    return times


def _rank(kind: str, rank: int, world: int, port: int, a, run_dir: str, log: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)  # megalite's own lines go to the log, not the table
    os.dup2(fd, 2)
    os.close(fd)
    torch.set_num_threads(1)
    pin_malloc(1 << 30)  # RSS before a save is not lowered by a trim the save faults back in
    try:
        out.put((rank, "ok", io_world(a, world, rank, run_dir)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(kind: str, world: int, a, run_dir: str) -> List[dict]:
    from megalite.launcher.local import free_port

    os.makedirs(run_dir, exist_ok=True)
    mp = tmp.get_context("spawn")
    out = mp.Queue()
    port = free_port()
    logs = [os.path.join(run_dir, f"{kind}.rank{r}.log") for r in range(world)]
    procs = [mp.Process(target=_rank, args=(kind, r, world, port, a, run_dir, logs[r], out),
                        daemon=True) for r in range(world)]
    results, failure = collect(procs, out, a.timeout)
    if failure is not None:
        rank, value = failure
        if rank is None:
            raise RuntimeError(f"{kind} world of {world}: no result within {a.timeout:.0f} s "
                               f"(logs: {run_dir})")
        raise RuntimeError(f"{kind} world of {world}, rank {rank}:\n{value}")
    return [results[r] for r in range(world)]


# ---- HF conversion -------------------------------------------------------------------------------
_PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")


def child_peak_rss(cmd: List[str]) -> int:
    """Peak RSS in bytes of ``cmd`` run as the only child of a fresh wrapper process."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", _PEAK, *cmd], env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}): {r.stderr.strip()}")
    return int(r.stdout.strip().splitlines()[-1])


def hf_convert(ckpt: str, out_root: str, max_shard_mb: float) -> dict:
    imports = ("import torch, torch.distributed.checkpoint, safetensors.torch, transformers, "
               "megalite.cli, megalite.interop.hf_files, megalite.trainer.inference; "
               "transformers.GPT2Config, transformers.LlamaConfig")
    base = child_peak_rss([sys.executable, "-c", imports])
    out = os.path.join(out_root, "hf")
    t0 = time.perf_counter()
    peak = child_peak_rss([sys.executable, "-m", "megalite.cli", "convert", "--to", "hf", ckpt,
                           out, f"--max_shard_mb={max_shard_mb}"])
    seconds = time.perf_counter() - t0
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    sizes = [os.path.getsize(os.path.join(out, f)) for f in shards]
    return dict(base=base, peak=peak, seconds=seconds, shards=len(shards),
                largest=max(sizes), total=sum(sizes))


# ---- report --------------------------------------------------------------------------------------
def med(xs: List[float]) -> float:
    return statistics.median(xs)


def noise(xs: List[float]) -> str:
    """The spread of the repetitions around their median."""
    m = med(xs)
    return f"+-{100 * max(abs(x / m - 1) for x in xs):.0f}%" if m > 0 else "-"


def slowest(per_rank: List[dict], key: str) -> List[float]:
    """Per repetition, the slowest rank's seconds (barriers make them nearly equal)."""
    return [max(r[key][i] for r in per_rank) for i in range(len(per_rank[0][key]))]


def report(io: Dict[int, List[dict]], asy: Optional[Tuple[int, List[dict]]],
           hf: Optional[dict], a) -> None:
    first = next(iter(io.values()))[0]
    print(f"model: gpt {a.layers} layers, hidden {a.hidden}, vocab {first['vocab']}: "
          f"{first['n_params'] / 1e6:.1f}M parameters; checkpoint = fp32 masters + AdamW moments "
          f"= {first['ckpt_bytes'] / MB:.0f} MB; {a.reps} repetitions, medians, noise = largest "
          f"distance of a repetition from the median; {os.cpu_count()} CPUs on this machine")
    rows = []
    ref = io.get(1, [None])[0]
    ref_save = ref_load = None
    if ref is not None and ref["ref_save_s"]:
        ref_save, ref_load = med(ref["ref_save_s"]), med(ref["ref_load_s"])
        b = ref["ref_bytes"]
        rows.append(["torch.save/load, 1 process", f"{b / MB:.0f}", f"{b / MB / ref_save:.0f}",
                     noise(ref["ref_save_s"]), f"{b / MB / ref_load:.0f}", noise(ref["ref_load_s"]),
                     "1.00", "1.00", "-", "-", "-"])
    for world, per_rank in io.items():
        save, load = slowest(per_rank, "save_s"), slowest(per_rank, "load_s")
        b = per_rank[0]["ckpt_bytes"]
        extra = max(med(r["save_extra"]) for r in per_rank)
        owned = max(r["owned"] for r in per_rank)
        written = max(r["written"] for r in per_rank)
        rows.append([f"megalite DCP, {world} rank{'s' if world > 1 else ''}", f"{b / MB:.0f}",
                     f"{b / MB / med(save):.0f}", noise(save), f"{b / MB / med(load):.0f}",
                     noise(load),
                     f"{ref_save / med(save):.2f}" if ref_save else "-",
                     f"{ref_load / med(load):.2f}" if ref_load else "-",
                     f"{owned / MiB:.1f}", f"{written / MiB:.1f}", f"{extra / MiB:.1f}"])
    print()
    print(table(rows, ["save / load", "MB", "save MB/s", "noise", "load MB/s", "noise",
                       "save x ref", "load x ref", "owned MiB/rank", "written MiB/rank",
                       "save peak extra MiB/rank"]))
    print("x ref: throughput over torch.save/load of the same state in one process (>1: faster); "
          "owned/written/peak extra: the largest over ranks; peak extra = VmRSS high-water during "
          "the save minus VmRSS before it")
    if asy is not None:
        world, per_rank = asy
        t = {m: med([max(r[m][i] for r in per_rank) for i in range(len(per_rank[0][m]))])
             for m in ("none", "sync", "async")}
        ns = {m: noise([max(r[m][i] for r in per_rank) for i in range(len(per_rank[0][m]))])
              for m in t}
        cost_sync, cost_async = t["sync"] - t["none"], t["async"] - t["none"]
        hidden = 1 - cost_async / cost_sync if cost_sync > 0 else float("nan")
        print()
        label = {"none": "no save", "sync": "sync save", "async": "async save"}
        print(table([[label[m], f"{1e3 * t[m]:.0f}", ns[m], f"{1e3 * (t[m] - t['none']):.0f}"]
                     for m in t],
                    [f"round = {a.async_steps} steps + 1 save, {world} rank(s)", "ms per round",
                     "noise", "save cost ms"]))
        print(f"save time hidden by checkpoint.async_save: {100 * hidden:.0f}% "
              f"(1 - async cost / sync cost; a round's time includes waiting for its save)")
    if hf is not None:
        extra = hf["peak"] - hf["base"]
        print()
        print(table([["megalite convert --to hf", f"{hf['seconds']:.1f}",
                      f"{hf['total'] / MiB:.1f}",
                      f"{hf['shards']}", f"{hf['largest'] / MiB:.1f}", f"{hf['peak'] / MiB:.0f}",
                      f"{extra / MiB:.0f}", f"{extra / hf['largest']:.2f}",
                      f"{extra / hf['total']:.2f}"]],
                    ["HF export (fp32)", "s", "model MiB", "shards", "largest MiB", "peak RSS MiB",
                     "peak extra MiB", "extra / shard", "extra / model"]))
        print("peak extra = the conversion's peak RSS minus that of a process importing the same "
              "modules (torch, DCP, safetensors, transformers' config classes, megalite)")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default=None, help="rank counts of the save/load worlds "
                    "(default 1,2,4; --quick: 1,2)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=16384, help="0: the tokenizer's")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--async-steps", type=int, default=2, help="training steps per save")
    ap.add_argument("--async-rounds", type=int, default=2, help="rounds per timed block")
    ap.add_argument("--async-world", type=int, default=None,
                    help="the world (one of --worlds) that also times async save (default 2); "
                    "0: none")
    ap.add_argument("--max-shard-mb", type=float, default=100.0)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF conversion")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per world")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, one repetition, worlds 1,2: every row in seconds")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.layers, a.hidden, a.heads, a.vocab, a.seq = 1, 1, 64, 4, 0, 16
        a.async_steps, a.async_rounds, a.max_shard_mb = 1, 1, 0.1
        a.worlds = a.worlds or "1,2"
    a.worlds = a.worlds or "1,2,4"
    a.async_world = 2 if a.async_world is None else a.async_world
    worlds = [int(w) for w in a.worlds.split(",") if w]
    root = tempfile.mkdtemp(prefix="megalite-bench-ckpt-", dir=a.dir)
    a.data_cache = os.path.join(REPO, ".cache", "megalite") if not a.quick else \
        os.path.join(root, "data-cache")
    torch.set_num_threads(1)
    try:
        io: Dict[int, List[dict]] = {}
        for w in worlds:
            io[w] = run_world("io", w, a, os.path.join(root, f"io{w}"))
        asy = None
        if a.async_world in io:
            asy = (a.async_world, [r["async"] for r in io[a.async_world]])
        hf = None
        if not a.no_hf:
            src = next(iter(io.values()))[0]["ckpt"]
            hf = hf_convert(src, root, a.max_shard_mb)
        report(io, asy, hf, a)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
