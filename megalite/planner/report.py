"""``megalite plan``'s output: the ranked table, the reasons for the rest, ``--explain``,
``--json`` and ``--confirm`` (dry runs of the top layouts)."""
from __future__ import annotations

import json
import sys
import time
from typing import Dict, List, Set

import torch

from megalite.config.load import parse_args
from megalite.config.validate import ConfigError
from megalite.planner.memory import ACTIVATIONS, STATES, TEMPORARIES, term_bytes
from megalite.planner.search import (Candidate, configure, evaluate, parse_layout, search,
                                     variant)
from megalite.planner.time import step_time

GIB = 2**30


def _fail(lines: List[str]) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return 2


def run_plan(argv: List[str], opts: Dict[str, str], flags: Set[str], gpus: int, per_node: int,
             gpu) -> int:
    from megalite.models import CausalLM, flops_per_token, num_params
    from megalite.planner.cli import _number, dry_args

    start = time.perf_counter()
    extra = []
    if "--seq_len" in opts:
        seq = int(_number(opts["--seq_len"], "--seq_len"))
        extra += [f"--data.seq_len={seq}", f"--model.max_seq_len={seq}"]
    try:
        base, _ = parse_args(argv + extra, verbose=False)
    except ConfigError as e:
        return _fail(e.lines)
    from megalite.planner.cli import _vocab_problem
    from megalite.planner.dry_run import unsupported

    problem = unsupported(base) or _vocab_problem(base)
    if problem:
        return _fail([problem])
    gpu.peak_tflops(base.train.precision)  # no peak known: one line now, not mid-search
    seq = base.data.seq_len
    global_batch = base.train.global_batch_size
    if "--global_batch_tokens" in opts:
        tokens = int(_number(opts["--global_batch_tokens"], "--global_batch_tokens",
                             binary=True))
        global_batch = max(1, round(tokens / seq))
    args = dry_args(base)
    with torch.device("meta"):
        n_params = num_params(CausalLM(args))
    fpt = flops_per_token(args, seq, n_params)
    budget_fraction = _number(opts.get("--memory-fraction", "0.9"), "--memory-fraction")
    step_tokens = global_batch * seq

    def rate(c: Candidate) -> Dict[str, float]:
        tps = step_tokens / c.time["total"]
        out = {"tokens_per_s": tps, "mfu": fpt * tps / gpus /
               (gpu.peak_tflops(base.train.precision) * 1e12)}
        if "--tokens" in opts:
            out["days"] = _number(opts["--tokens"], "--tokens") / tps / 86400
        return out

    if "--layout" in opts:
        chosen = parse_layout(opts["--layout"])
        p = base.parallel
        shape = {"dp": int(chosen.get("dp", gpus // (p.tp * p.pp))),
                 "tp": int(chosen.get("tp", p.tp)), "pp": int(chosen.get("pp", p.pp)),
                 "v": int(chosen.get("v", p.virtual_stages)),
                 "schedule": chosen.get("schedule", p.schedule),
                 "mbs": int(chosen.get("mbs", base.train.micro_batch_size))}
        if shape["dp"] * shape["tp"] * shape["pp"] != gpus:
            return _fail([f"--layout: dp*tp*pp = {shape['dp']}*{shape['tp']}*{shape['pp']} "
                          f"!= --gpus={gpus}"])
        try:
            cfg = configure(base, shape, global_batch)
        except ConfigError as e:
            return _fail([f"--layout {opts['--layout']}: {line}" for line in e.lines])
        zero = int(chosen.get("zero", p.zero_stage))
        offload = chosen.get("offload", str(p.offload_optimizer)).lower() in ("1", "true")
        cfg, layout = variant(cfg, shape, zero, offload,
                              chosen.get("recompute", base.model.recompute))
        ok = [evaluate(cfg, args, gpu, per_node, int(gpu.memory * budget_fraction), layout)]
        rejected = []  # one layout: shown even when it does not fit, with the reason
    else:
        ok, rejected = search(base, args, gpus, per_node, gpu, global_batch, budget_fraction)
    took = time.perf_counter() - start
    top = int(_number(opts.get("--top", "10"), "--top"))
    confirm = int(_number(opts.get("--confirm", "0"), "--confirm"))
    for c in ok[:confirm]:
        _confirm(c)
    if "--json" in flags:
        rows = [{"layout": c.layout, "fits": c.fits, "reason": c.reason,
                 "peak_pp_rank": c.pp_rank, "memory": c.memory, "time": c.time,
                 "dry_run_peak": c.dry_run, **(rate(c) if c.time else {})}
                for c in ok + rejected]
        print(json.dumps({"gpus": gpus, "gpu": gpu.name, "params": n_params,
                          "flops_per_token": fpt, "global_batch": global_batch,
                          "seq_len": seq, "seconds": took, "layouts": rows}, indent=1))
        return 0
    print(f"megalite plan: {args.family} {n_params / 1e9:.2f}B params, seq {seq}, global batch "
          f"{global_batch} x {seq} = {step_tokens / 1e6:.2f}M tokens, {gpus} x {gpu.name} "
          f"({per_node} per node); memory budget {budget_fraction:.0%} of "
          f"{gpu.memory / GIB:.0f} GiB; {len(ok) + len(rejected)} layout(s) in {took:.1f} s")
    print(_table(ok[:top], rate, confirm > 0))
    if not ok:
        print("no layout fits")
    elif not ok[0].fits:
        print(f"does not fit: {ok[0].reason}")
    _reasons(rejected)
    if "--explain" in flags and ok:
        _explain(ok[0], rate(ok[0]), fpt, args, gpu, per_node)
    return 0


def _confirm(c: Candidate) -> None:
    from megalite.planner.dry_run import dry_run, layout_dims

    c.dry_run = dry_run(c.cfg, layout_dims(c.cfg).rank_of(c.pp_rank, 0, 0)).peak


def _table(rows: List[Candidate], rate, confirmed: bool) -> str:
    head = (f"{'#':>3} {'dp':>4} {'tp':>3} {'pp':>3} {'v':>2} {'schedule':<11} {'zero':>4} "
            f"{'off':>3} {'mbs':>3} {'ga':>4} {'recompute':<9} | {'states':>7} {'act+tmp':>7} "
            f"{'peak':>7} GiB" + (f" {'dry run':>7}" if confirmed else "") +
            f" | {'step s':>7} {'tokens/s':>10} {'MFU':>5} {'days':>6}")
    out = [head]
    for i, c in enumerate(rows, 1):
        L, m, r = c.layout, c.memory, rate(c)
        states, act = term_bytes(m, STATES), term_bytes(m, ACTIVATIONS + TEMPORARIES)
        dry = f" {c.dry_run / GIB:>7.2f}" if confirmed and c.dry_run is not None else \
            (f" {'-':>7}" if confirmed else "")
        out.append(f"{i:>3} {L['dp']:>4} {L['tp']:>3} {L['pp']:>3} {L['v']:>2} "
                   f"{L['schedule']:<11} {L['zero']:>4} {L['offload']:>3} {L['mbs']:>3} "
                   f"{L['ga']:>4} {L['recompute']:<9} | {states / GIB:>7.2f} {act / GIB:>7.2f} "
                   f"{m['total'] / GIB:>7.2f}    {dry} | {c.time['total']:>7.2f} "
                   f"{r['tokens_per_s']:>10,.0f} {r['mfu']:>5.1%} "
                   + (f"{r['days']:>6.1f}" if "days" in r else f"{'-':>6}"))  # no --tokens
    return "\n".join(out)


def _reasons(rejected: List[Candidate]) -> None:
    if not rejected:
        return
    kinds: Dict[str, List[Candidate]] = {}
    for c in rejected:
        kinds.setdefault(c.reason.split(":")[0].split(" ")[0], []).append(c)
    print(f"not listed: {len(rejected)} layouts")
    for kind, cs in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        examples = "; ".join(f"{c.name()}: {c.reason}" for c in cs[:2])
        print(f"  {len(cs)} {kind}: e.g. {examples}")


def _explain(c: Candidate, r: Dict[str, float], fpt: float, args, gpu, per_node: int) -> None:
    print(f"\nexplain {c.name()} (pipeline rank {c.pp_rank} peaks):")
    print("  memory per GPU (GiB):")
    for k, v in c.memory.items():
        if v and k != "total":
            print(f"    {k}: {v / GIB:.3f}")
    print(f"    = {c.memory['total'] / GIB:.3f} GiB")
    print("  step time (s):")
    how: Dict[str, str] = {}
    step_time(c.cfg, args, gpu, per_node, how)
    for k, v in c.time.items():
        if k != "total":
            print(f"    {k}: {v:.4f}" + (f"  = {how[k]}" if k in how else ""))
    print(f"    = {c.time['total']:.4f} s; {fpt / 1e9:.1f} GFLOP/token (6 x params + 12 x layers "
          f"x hidden x seq) -> {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}")
