"""Activation recomputation: memory saved and time paid, per mode, measured side by side.

    python bench/recompute.py [--quick] [--repeats N] [--dropout P]

For a tiny and a ~19M-parameter GPT (fp32, CPU, one thread), per mode — none, selective, full,
full on half the layers — one micro-batch's forward + backward:
- activation bytes per layer, measured (``models.activation_memory.SavedActivationCounter``)
  and re-derived (``layer_activation_terms``);
- the peak memory of the step (torch's ``MemTracker``: parameters + gradients + activations +
  temporaries; needs torch >= 2.5, else "n/a");
- the step time, median of ``--repeats`` runs with the modes interleaved (this machine is noisy).
It prints each mode's memory saved and time overhead against ``none``. The paper (Korthikanti et
al. 2022) puts full at about one extra forward (~+33% of a step) and selective at a few percent;
with dropout > 0 on CPU, SDPA takes its math path and the s² terms that selective drops exist.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megalite.config.schema import ModelConfig  # noqa: E402
from megalite.models import build_model, lm_loss, resolve_model_args  # noqa: E402
from megalite.models.activation_memory import (SavedActivationCounter,  # noqa: E402
                                               layer_activation_bytes, units_of)
from megalite.models.recompute import apply_recompute  # noqa: E402

MiB = 2**20


def _peak_bytes(model, tokens) -> Optional[int]:
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # torch < 2.5
        return None
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        lm_loss(model(tokens), tokens).backward()
    model.zero_grad(set_to_none=True)
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def _models(quick: bool, dropout: float):
    sizes = [("tiny", dict(num_layers=4, hidden_size=64, num_heads=4), 2, 64)]
    if not quick:
        sizes.append(("19M", dict(num_layers=6, hidden_size=512, num_heads=8), 2, 256))
    for name, shape, b, s in sizes:
        args = resolve_model_args(ModelConfig(family="gpt", max_seq_len=s, dropout=dropout,
                                              **shape), 128)
        yield name, args, b, s


def run(quick: bool = False, repeats: int = 5, dropout: float = 0.1) -> List[Dict]:
    torch.set_num_threads(1)
    rows = []
    for name, args, b, s in _models(quick, dropout):
        half = max(1, args.num_layers // 2)
        modes = [("none", 0), ("selective", 0), ("full", 0), ("full", half)]
        tokens = torch.randint(0, args.vocab_size, (b, s), generator=torch.Generator()
                               .manual_seed(0))
        models, out = {}, {}
        for mode, k in modes:
            model = build_model(args, seed=1)
            model.train()
            apply_recompute(model, mode, k)
            counter = SavedActivationCounter(units_of(model), model.parameters(), [tokens])
            with counter:
                loss = lm_loss(model(tokens), tokens)
            loss.backward()
            model.zero_grad(set_to_none=True)
            layers = [counter.bytes[f"layers.{i}"] for i in range(args.num_layers)]
            formula = sum(layer_activation_bytes(args, b, s, recompute=mode if i < (k or 99)
                                                 else "none", dtype_bytes=4,
                                                 dropout_mask_bytes=None)
                          for i in range(args.num_layers))
            label = f"{mode}" + (f" (first {k})" if k else "")
            models[label] = model
            out[label] = dict(model=name, mode=label, act_layer=sum(layers) / len(layers),
                              act_formula=formula / args.num_layers,
                              peak=_peak_bytes(model, tokens), times=[])
        for _ in range(repeats):  # interleaved: drift hits every mode alike
            for label, model in models.items():
                start = time.perf_counter()
                lm_loss(model(tokens), tokens).backward()
                out[label]["times"].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
        base = out["none"]
        for r in out.values():
            r["time"] = statistics.median(r["times"])
            r["time_x"] = r["time"] / statistics.median(base["times"])
            r["act_saved"] = 1 - r["act_layer"] / base["act_layer"]
            r["peak_saved"] = (1 - r["peak"] / base["peak"]) if r["peak"] and base["peak"] \
                else None
            rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, 2 repeats")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dropout", type=float, default=0.1)
    a = ap.parse_args(argv)
    rows = run(a.quick, 2 if a.quick else a.repeats, a.dropout)
    print(f"{'model':6} {'mode':18} {'act/layer MiB':>13} {'re-derived':>10} {'saved':>6} "
          f"{'peak MiB':>9} {'saved':>6} {'step ms':>8} {'time x':>7}")
    for r in rows:
        peak = f"{r['peak'] / MiB:9.2f}" if r["peak"] else f"{'n/a':>9}"
        psaved = f"{r['peak_saved']:6.0%}" if r["peak_saved"] is not None else f"{'n/a':>6}"
        print(f"{r['model']:6} {r['mode']:18} {r['act_layer'] / MiB:13.3f} "
              f"{r['act_formula'] / MiB:10.3f} {r['act_saved']:6.0%} {peak} {psaved} "
              f"{r['time'] * 1e3:8.1f} {r['time_x']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
