"""``megalite plan``'s search: every layout of N GPUs that ``validate()`` accepts, its predicted
peak memory per GPU (``memory.py``) and step time (``time.py``), ranked by time; the others
with the reason they do not fit.

Enumerated: tp (dividing the GPUs of a node), pp (dividing what is left), dp = rest; the
schedule for pp > 1 — 1F1B, interleaved with 2 chunks per rank, zb-h1 (GPipe has 1F1B's
bubble with more micro-batches in flight, so it is never better and is left out); ZeRO stage
0-3, optimizer offload for stages >= 1; micro-batch 1, 2, 4, 8 (the global batch fixed, so
grad_accum follows); recompute none / selective / full. Sequence parallelism is on whenever
tp > 1 (less activation memory, the same bytes on the wire).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

from megalite.config.schema import Config
from megalite.config.validate import ConfigError, validate
from megalite.hardware import GPUSpec
from megalite.planner.memory import STATES, peak_rank, term_bytes
from megalite.planner.time import step_time

MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")


@dataclass
class Candidate:
    """One layout: its validated config, or why it was rejected; its predictions."""
    layout: Dict[str, object]
    cfg: Optional[Config] = None
    reason: str = ""
    pp_rank: int = 0  # the pipeline rank predicted to peak
    memory: Dict[str, int] = field(default_factory=dict)
    time: Dict[str, float] = field(default_factory=dict)
    dry_run: Optional[int] = None  # --confirm: the dry run's peak (bytes)

    @property
    def fits(self) -> bool:
        return not self.reason

    def name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.layout.items())


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _with(cfg: Config, **sections) -> Config:
    """A copy of ``cfg`` with fields replaced per section (shallow: cheap)."""
    out = copy.copy(cfg)
    for section, values in sections.items():
        setattr(out, section, dataclasses.replace(getattr(cfg, section), **values))
    return out


def layouts(gpus: int, gpus_per_node: int, layers: int) -> Iterator[Dict[str, object]]:
    """Parallel shapes (validity is ``validate``'s to decide)."""
    for tp in divisors(min(gpus, gpus_per_node)):
        if gpus % tp:
            continue
        for pp in divisors(gpus // tp):
            if pp > layers:
                continue
            schedules = [("1f1b", 1)] if pp == 1 else [("1f1b", 1), ("interleaved", 2),
                                                       ("zb-h1", 1)]
            for schedule, v in schedules:
                for mbs in MICRO_BATCHES:
                    yield {"dp": gpus // (tp * pp), "tp": tp, "pp": pp, "v": v,
                           "schedule": schedule, "mbs": mbs}


def configure(base: Config, shape: Dict[str, object], global_batch: int) -> Config:
    """``base`` at this parallel shape and micro-batch, validated (ConfigError if not)."""
    dp, tp, pp, mbs = (int(shape[k]) for k in ("dp", "tp", "pp", "mbs"))  # type: ignore
    cfg = _with(base, parallel={"dp": dp, "tp": tp, "pp": pp, "schedule": shape["schedule"],
                                "virtual_stages": shape["v"], "layers_per_stage": [],
                                "sequence_parallel": tp > 1},
                train={"micro_batch_size": mbs, "grad_accum": None,
                       "global_batch_size": global_batch})
    return validate(cfg, dp * tp * pp)


def variant(cfg: Config, shape: Dict[str, object], zero: int, offload: bool, recompute: str
            ) -> Tuple[Config, Dict[str, object]]:
    """``cfg`` (``configure``'s for ``shape``) with this ZeRO stage, offload and recompute, and
    the layout row naming them."""
    keep = cfg.model.recompute_layers if recompute == "full" else 0  # validate(): full only
    out = _with(cfg, parallel={"zero_stage": zero, "offload_optimizer": offload},
                model={"recompute": recompute, "recompute_layers": keep})
    return out, {**shape, "zero": zero, "offload": int(offload), "recompute": recompute,
                 "ga": cfg.train.grad_accum}


def evaluate(cfg: Config, args, gpu: GPUSpec, gpus_per_node: int, budget: int,
             layout: Dict[str, object]) -> Candidate:
    """Predictions for one validated config; ``reason`` set when its peak exceeds ``budget``."""
    c = Candidate(dict(layout), cfg)
    c.pp_rank, c.memory = peak_rank(cfg, args, gpu=True)
    c.time = step_time(cfg, args, gpu, gpus_per_node)
    if c.memory["total"] > budget:
        states = term_bytes(c.memory, STATES)
        what = "model states alone" if states > budget else "peak"
        shown = states if states > budget else c.memory["total"]
        c.reason = f"{what} {shown / 2**30:.2f} GiB > {budget / 2**30:.2f} GiB"
    return c


def search(base: Config, args, gpus: int, gpus_per_node: int, gpu: GPUSpec, global_batch: int,
           memory_fraction: float = 0.9) -> Tuple[List[Candidate], List[Candidate]]:
    """(feasible candidates fastest first, rejected ones with their reasons)."""
    budget = int(gpu.memory * memory_fraction)
    ok: List[Candidate] = []
    rejected: List[Candidate] = []
    for shape in layouts(gpus, gpus_per_node, args.num_layers):
        try:
            cfg = configure(base, shape, global_batch)
        except ConfigError as e:
            rejected.append(Candidate(dict(shape), reason=f"invalid: {e.lines[0]}"))
            continue
        for zero in range(4 if shape["dp"] > 1 else 1):  # ZeRO shards over dp
            for offload in ((False, True) if zero >= 1 else (False,)):
                for recompute in RECOMPUTE:
                    c, layout = variant(cfg, shape, zero, offload, recompute)
                    cand = evaluate(c, args, gpu, gpus_per_node, budget, layout)
                    (ok if cand.fits else rejected).append(cand)
    ok.sort(key=lambda c: (round(c.time["total"], 6), c.memory["total"]))
    return ok, rejected


def parse_layout(text: str) -> Dict[str, str]:
    """``dp=8,tp=8,zero=1`` -> {"dp": "8", ...} (ValueError naming the bad item)."""
    keys = {"dp", "tp", "pp", "v", "schedule", "mbs", "zero", "offload", "recompute"}
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise ValueError(f"--layout: {item!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(keys))}")
        out[key] = value
    return out
