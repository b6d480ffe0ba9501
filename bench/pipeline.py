"""Pipeline-schedule bubble benchmark: the REAL ``PipelineExecutor`` on pp gloo ranks, per
schedule (gpipe, 1f1b, interleaved, zb-h1), pp in {2, 4} and several micro-batch counts m.

Table 1 (the result): every stage's chunks cost a fixed timed wait (time.sleep) per forward and
per backward, so ranks do not compete for this machine's 2 cores and the numbers do not depend on
CPU speed. Costs per micro-batch through a full stage: F, B (input gradient), W (weight
gradient); non-split schedules pay B+W in their backward, zb-h1 pays B in its B action and W in
its W action; interleaved chunks cost 1/v of each (see ``bench/_pipeline_stages.py``).

Idle fraction of a rank = 1 - busy / step time; busy = sum of its actions' compute intervals
(from the end of an action's receive wait to its end), step time = first compute start to last
compute end over all ranks (one barrier before each step; CLOCK_MONOTONIC is shared by the
processes). Printed beside theory: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v*m+p-1) for
interleaved, 1F1B's for zb-h1 (target: below it). ``sim`` is a zero-latency discrete-event run
of the very same action lists with the same costs, once with sends visible as soon as they are
made (ideal) and once with the executor's rule (a send is posted only with the rank's next
receive, or at the end-of-step flush), and ``+lat`` the latter plus the measured one-way latency
of a small gloo transfer.

Table 2: the same schedules on a real megalite GPT stage (build_model + model_plan), one thread
per rank; p ranks share 2 cores, so it is CPU-contended and only indicative.

    python bench/pipeline.py [--quick] [--pp 2 4] [--micro 4 8 16] [--f-ms 20 --b-ms 20 --w-ms 20]
"""
from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import sys
import time
import tempfile
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def theory(name: str, p: int, m: int, v: int) -> float:
    if name == "interleaved":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (m + p - 1)  # gpipe, 1f1b; zb-h1 is compared with 1F1B's


def zb_theory(p: int, m: int, f: float, b: float, w: float) -> float:
    """ZB-H1's bubble (Qi et al. 2023): (p-1)(F+B-W) of idle against m(F+B+W) of work."""
    idle = (p - 1) * max(f + b - w, 0.0)
    return idle / (m * (f + b + w) + idle)


def configs(a) -> List[dict]:
    """Every run, in order: each (schedule, p, m) repeated a.reps times, round-robin so that
    machine noise hits all alike."""
    out = []
    for rep in range(a.reps):
        for m in a.micro:
            for name in SCHEDULES:
                out.append(dict(table="fixed", name=name, m=m, rep=rep, eager=False))
        if a.what_if:
            for m in a.micro:
                for name in SCHEDULES:
                    out.append(dict(table="eager", name=name, m=m, rep=rep, eager=True))
    if a.real:
        for m in a.real_micro:
            for name in SCHEDULES:
                out.append(dict(table="real", name=name, m=m, rep=0, eager=False))
    return out


# ---- one rank ------------------------------------------------------------------------------
def worker(rank: int, p: int, port: int, a, runs: List[dict], out_path: str) -> None:
    """One pp rank; rank 0 pickles every run's records to ``out_path`` (a file, not a pipe: a
    pipe would block rank 0 on a large result while the parent waits to join it)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(p), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from _pipeline_stages import Recorder, SleepStage, TimedExecutor

    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.env import discover
    from megalite.pipeline import schedules

    dims = ParallelDims.initialize(1, 1, p, discover(), "gloo", timeout_s=a.timeout)
    act = (1, 4, 8)  # what the fake stage sends between ranks (tiny: the wait is the cost)

    def fake_run(name: str, m: int, v: int, eager: bool, f: float, b: float, w: float):
        rec = Recorder()
        stage = SleepStage(p, dims.pp_rank, v, f, b, w, rec)
        ex = TimedExecutor(stage, dims, lambda out, labels: out.mean(), act, torch.float32,
                           eager_sends=eager, on_action=lambda index: setattr(rec, "current",
                                                                              index))
        actions = schedules.build(name, p, m, dims.pp_rank, v)
        batches = [{"tokens": torch.zeros(act), "labels": torch.zeros(1)} for _ in range(m)]
        dist.barrier()
        ex.run(actions, batches)
        return actions, ex, rec.sleeps


    def real_run(name: str, m: int, v: int):
        from megalite.config.schema import ModelConfig, ParallelConfig
        from megalite.models import build_model, lm_loss, resolve_model_args
        from megalite.plan import model_plan

        mc = ModelConfig(family="gpt", num_layers=a.real_layers, hidden_size=a.real_hidden,
                         num_heads=4, max_seq_len=a.real_seq, vocab_size=256)
        args = resolve_model_args(mc)
        pc = ParallelConfig(pp=p, schedule=name, virtual_stages=v)
        model = build_model(args, 1234, "cpu", torch.float32, plan=model_plan(dims, pc))
        ex = TimedExecutor(model, dims, lambda o, y: lm_loss(o, y, reduction="sum"),
                           (a.real_mbs, a.real_seq, a.real_hidden), torch.float32)
        actions = schedules.build(name, p, m, dims.pp_rank, v)
        g = torch.Generator().manual_seed(0)
        data = [torch.randint(0, 256, (a.real_mbs, a.real_seq + 1), generator=g)
                for _ in range(m)]
        batches = [{"tokens": d[:, :-1], "labels": d[:, 1:]} for d in data]
        ex.run(actions, batches)  # warm-up step (allocations, first-call costs)
        model.zero_grad(set_to_none=True)
        ex.intervals.clear()
        ex.peak_in_flight = 0
        dist.barrier()
        ex.run(actions, batches)
        return actions, ex, []

    fake_run("1f1b", max(p, 2), 1, False, 0.002, 0.002, 0.0)  # warm-up: connections, imports
    lat = []  # one-way latency of a small transfer between pp ranks 0 and 1 (ping-pong / 2)
    buf = torch.zeros(act)
    for _ in range(30):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        lat.append((time.perf_counter() - t0) / 2)
    results = []
    for cfg in runs:
        v = a.v if cfg["name"] == "interleaved" else 1
        if cfg["table"] == "real":
            actions, ex, sleeps = real_run(cfg["name"], cfg["m"], v)
        else:
            actions, ex, sleeps = fake_run(cfg["name"], cfg["m"], v, cfg["eager"],
                                           a.f_ms / 1e3, a.b_ms / 1e3, a.w_ms / 1e3)
        mine = dict(actions=[tuple(x) for x in actions], intervals=ex.intervals, sleeps=sleeps,
                    peak=ex.peak_in_flight, sched_peak=schedules.max_in_flight(actions))
        gathered = [None] * p if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank == 0:
            results.append(dict(cfg, v=v, p=p, ranks=gathered))
    if rank == 0:
        with open(out_path, "wb") as f:
            pickle.dump((results, statistics.median(lat)), f)
    dist.barrier()
    dims.destroy()


# ---- analysis ------------------------------------------------------------------------------
def idle_fractions(ranks: List[dict]):
    start = min(r["intervals"][0][3] for r in ranks)
    end = max(r["intervals"][-1][4] for r in ranks)
    step = end - start
    idle = [1 - sum(t1 - t0 for *_, t0, t1 in r["intervals"]) / step for r in ranks]
    return idle, step


def check_split(run: dict) -> List[str]:
    """From the sleep timestamps: every action ran exactly the branches it should."""
    bad = []
    split = run["name"] == "zb-h1"
    for r, rk in enumerate(run["ranks"]):
        tags: Dict[int, List[str]] = {}
        for tag, index, *_ in rk["sleeps"]:
            tags.setdefault(index, []).append(tag)
        for index, (kind, chunk, micro) in enumerate(rk["actions"]):
            # B always runs the activation-gradient share (on the first stage its chain part);
            # the weight share runs in B, or under zb-h1 in the W pass
            want = {"F": ["F"], "W": ["Wp"], "B": ["Bx"] if split else ["Bx", "Wp"]}[kind]
            got = sorted(tags.get(index, []))
            if got != sorted(want):
                bad.append(f"rank {r} action {index} {kind}({chunk},{micro}): slept {got}, "
                           f"expected {sorted(want)}")
    return bad


def sim(name: str, p: int, m: int, v: int, a, eager: bool, lat: float = 0.0):
    from _pipeline_stages import simulate

    from megalite.pipeline import schedules

    f, b, w = a.f_ms, a.b_ms, a.w_ms
    split = name == "zb-h1"

    def cost(kind: str, s: int) -> float:
        if kind == "F":
            return f / v
        if kind == "B":  # split: the activation-gradient share only (the dW matmuls wait)
            return b / v if split else (b + w) / v
        return w / v

    acts = {r: schedules.build(name, p, m, r, v) for r in range(p)}
    idle, _ = simulate(acts, p, v, cost, eager, lat)
    return statistics.mean(idle)


def fmt_mib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


def report_fixed(runs: List[dict], a, title: str, check: bool) -> List[str]:
    groups: Dict[tuple, List[dict]] = {}
    for run in runs:
        groups.setdefault((run["p"], run["m"], run["name"]), []).append(run)
    per_stage = a.act_layers * 34 * a.act_b * a.act_s * a.act_h  # bytes, one micro x one stage
    print(f"\n{title}")
    print(f"{'schedule':<12}{'p':>2}{'m':>4}{'v':>3} | {'step ms':>8} {'measured':>9} "
          f"{'theory':>7} {'rel err':>8} | {'sim':>6} {'sim-exec':>8} {'+lat':>6} | {'rank idle':<24}| "
          f"{'in flight sched/meas (rank 0..p-1)':<36}{'peak bytes':>11}")
    flagged, measured = [], {}
    for (p, m, name), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                   SCHEDULES.index(kv[0][2]))):
        v = rs[0]["v"]
        fr = [idle_fractions(r["ranks"]) for r in rs]
        med = sorted(range(len(fr)), key=lambda i: statistics.mean(fr[i][0]))[len(fr) // 2]
        idle, step = fr[med]
        bubble = statistics.mean(idle)
        measured[(p, m, name)] = bubble
        th = theory(name, p, m, v)
        rel = (bubble - th) / th
        ideal = sim(name, p, m, v, a, eager=True)
        execsim = sim(name, p, m, v, a, eager=True)  # the executor posts sends at action end
        latsim = sim(name, p, m, v, a, eager=True, lat=rs[0]["lat"] * 1e3)
        sp = [r["sched_peak"] for r in rs[0]["ranks"]]
        mp = [r["peak"] for r in rs[0]["ranks"]]
        held = max(mp) / v * per_stage
        tag = "" if name != "zb-h1" else "(1F1B)"
        print(f"{name:<12}{p:>2}{m:>4}{v:>3} | {step * 1e3:>8.0f} {bubble:>9.3f} "
              f"{th:>7.3f}{tag[:0]} {rel:>+7.0%}{'!' if abs(rel) > 0.1 and name != 'zb-h1' else ' '}"
              f"| {ideal:>6.3f} {execsim:>8.3f} {latsim:>6.3f} | {' '.join(f'{x:.2f}' for x in idle):<24}| "
              f"{','.join(map(str, sp)) + ' / ' + ','.join(map(str, mp)):<36}{fmt_mib(held):>11}")
        if check and name != "zb-h1" and abs(rel) > 0.1:
            flagged.append(f"{name} p={p} m={m}: measured {bubble:.3f} vs theory {th:.3f} "
                           f"({rel:+.0%})")
    lats = sorted({(r["p"], r["lat"]) for r in runs})
    print("  sim: ideal sends, zero latency; sim-exec: the executor's send rule (post at the end "
          "of each action), zero latency; "
          "+lat: this table's send rule plus the measured one-way latency of a small gloo "
          "transfer (" + ", ".join(f"p={p}: {l * 1e3:.2f} ms" for p, l in lats) + ")")
    print("  (zb-h1 rows: 'theory' is 1F1B's (p-1)/(m+p-1); ZB-H1's own is "
          "(p-1)(F+B-W)/(m(F+B+W)+(p-1)(F+B-W)) = "
          + ", ".join(f"p={p},m={m}: {zb_theory(p, m, a.f_ms, a.b_ms, a.w_ms):.3f}"
                      for p, m, n in sorted(groups) if n == "zb-h1") + ")")
    print(f"  peak bytes: max over ranks of measured in-flight / v x one micro-batch's saved "
          f"activations of a full stage = {a.act_layers} layers x 34*b*s*h bytes (16-bit, flash "
          f"attention; Korthikanti et al. 2022) at b={a.act_b} s={a.act_s} h={a.act_h} = "
          f"{fmt_mib(per_stage)} (an interleaved chunk holds 1/v of a stage)")
    zb = []
    for (p, m, name), bub in sorted(measured.items()):
        if name == "zb-h1":
            ref = measured.get((p, m, "1f1b"))
            th = theory("1f1b", p, m, 1)
            ok = bub < th and (ref is None or bub < ref)
            zb.append(f"p={p} m={m}: {bub:.3f} vs 1F1B theory {th:.3f} / measured "
                      f"{ref if ref is None else round(ref, 3)} -> {'below' if ok else 'NOT below'}")
    print("  zb-h1 vs 1F1B: " + "; ".join(zb))
    il = []
    for (p, m, name), bub in sorted(measured.items()):
        if name == "interleaved" and (p, m, "1f1b") in measured:
            ok = bub < measured[(p, m, "1f1b")]
            il.append(f"p={p} m={m}: {'below' if ok else 'NOT below'}")
    print("  interleaved vs 1F1B (measured): " + "; ".join(il))
    return flagged


def report_real(runs: List[dict], a) -> None:
    print(f"\nTable 2 - real megalite GPT stage (CPU-CONTENDED: p ranks x 1 thread on this "
          f"machine's 2 shared cores; indicative only): {a.real_layers} layers, h={a.real_hidden}, "
          f"b={a.real_mbs}, s={a.real_seq}, fp32; one step after a warm-up step")
    print(f"{'schedule':<12}{'p':>2}{'m':>4}{'v':>3} | {'step ms':>8} {'measured':>9} "
          f"{'theory':>7} | {'mean compute ms per action F / B / W':<38}| "
          f"{'in flight sched/meas':<22}")
    for run in runs:
        p, m, v, name = run["p"], run["m"], run["v"], run["name"]
        idle, step = idle_fractions(run["ranks"])
        dur: Dict[str, List[float]] = {"F": [], "B": [], "W": []}
        for r in run["ranks"]:
            for kind, _, _, t0, t1 in r["intervals"]:
                dur[kind].append((t1 - t0) * 1e3)
        per = " / ".join(f"{statistics.mean(d):.1f}" if d else "-" for d in dur.values())
        sp = ",".join(str(r["sched_peak"]) for r in run["ranks"])
        mp = ",".join(str(r["peak"]) for r in run["ranks"])
        print(f"{name:<12}{p:>2}{m:>4}{v:>3} | {step * 1e3:>8.0f} {statistics.mean(idle):>9.3f} "
              f"{theory(name, p, m, v):>7.3f} | {per:<38}| {sp + ' / ' + mp:<22}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="pp 2 4, m 4 8, one repetition")
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--v", type=int, default=2, help="chunks per rank for interleaved")
    ap.add_argument("--f-ms", type=float, default=20.0)
    ap.add_argument("--b-ms", type=float, default=20.0)
    ap.add_argument("--w-ms", type=float, default=20.0)
    ap.add_argument("--reps", type=int, default=2, help="repetitions; the median row is shown")
    ap.add_argument("--what-if", action=argparse.BooleanOptionalAction, default=True,
                    help="also run table 1 with every send posted at once (not the shipped "
                         "executor: shows what the executor's send rule costs)")
    ap.add_argument("--real", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--real-micro", type=int, nargs="+", default=[8])
    ap.add_argument("--real-layers", type=int, default=8)
    ap.add_argument("--real-hidden", type=int, default=128)
    ap.add_argument("--real-seq", type=int, default=64)
    ap.add_argument("--real-mbs", type=int, default=4)
    ap.add_argument("--act-b", type=int, default=1)
    ap.add_argument("--act-s", type=int, default=2048)
    ap.add_argument("--act-h", type=int, default=4096)
    ap.add_argument("--act-layers", type=int, default=4, help="layers per full stage")
    ap.add_argument("--timeout", type=float, default=120.0, help="gloo timeout (deadlocks)")
    a = ap.parse_args()
    if a.quick:
        a.micro, a.reps = [4, 8], 1
    t_start = time.time()
    print(f"pipeline bubble benchmark: real PipelineExecutor, gloo, 1 thread per rank; "
          f"fixed waits F={a.f_ms:g} B={a.b_ms:g} W={a.w_ms:g} ms per micro-batch and full stage "
          f"(non-split backward = B+W; interleaved chunks 1/{a.v}); median of {a.reps} "
          f"repetition(s); load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    runs = configs(a)
    results: List[dict] = []
    for p in a.pp:
        mine = [r for r in runs if r["name"] != "interleaved" or r["m"] % p == 0]
        with tempfile.TemporaryDirectory() as tmpdir:
            path = os.path.join(tmpdir, "results.pkl")
            tmp.spawn(worker, args=(p, free_port(), a, mine, path), nprocs=p, join=True)
            with open(path, "rb") as f:
                got, lat = pickle.load(f)
        results += [dict(r, lat=lat) for r in got]
    flagged = report_fixed([r for r in results if r["table"] == "fixed"], a,
                           "Table 1 - fixed-wait stages, shipped executor "
                           "(! = more than 10% from theory)", check=True)
    bad = [msg for r in results if r["table"] in ("fixed", "eager") for msg in check_split(r)]
    print("  split check (sleep timestamps per action: F ran the x-branch forward only, a "
          "full B both backward branches, zb-h1's B only the x branch, W only the w branch): "
          + ("ok" if not bad else f"{len(bad)} FAILURES: " + "; ".join(bad[:5])))
    if flagged:
        print("  rows NOT within 10% of theory: " + "; ".join(flagged))
    else:
        print("  every gpipe/1f1b/interleaved row is within 10% of theory")
    if a.what_if:
        report_fixed([r for r in results if r["table"] == "eager"], a,
                     "Table 1b - WHAT-IF, not the shipped executor: same, but every send is "
                     "posted as soon as it is queued (monkey-patched in the bench processes)",
                     check=False)
    if a.real:
        report_real([r for r in results if r["table"] == "real"], a)
    print(f"\ntotal wall time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
