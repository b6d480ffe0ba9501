"""The trainer's activation-memory report: the re-derived bytes per layer at start-up, and what
the first training step's micro-batch 0 measured (``models.activation_memory``) beside them."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megalite import ops
from megalite.models.activation_memory import (SavedActivationCounter, attention_path,
                                               layer_activation_terms, units_of)

MiB = 2**20


class ActivationReport:
    """One per run: ``formula`` per block of this rank (by its recompute kind), ``arm`` the
    executor's probe for the first step, ``measured`` after it."""

    def __init__(self, model, args, kinds: List[str], micro_batch: int, seq_len: int, tp: int,
                 sequence_parallel: bool, dtype: torch.dtype, device: torch.device):
        self.model = model
        e = torch.tensor([], dtype=dtype).element_size()
        path = attention_path(args, device.type == "cpu", ops.model_uses_kernels(device))
        terms = {kind: layer_activation_terms(args, micro_batch, seq_len, tp, sequence_parallel,
                                              kind, e, **path)
                 for kind in set(kinds)}
        self.formula = [sum(terms[kind].values()) for kind in kinds]
        self.terms = terms
        self.kinds = kinds
        self.counter: Optional[SavedActivationCounter] = None

    def describe(self) -> str:
        kinds = sorted(set(self.kinds))
        per = sorted(set(self.formula))
        span = f"{per[0] / MiB:.2f}" + (f"-{per[-1] / MiB:.2f}" if len(per) > 1 else "")
        return (f"activations per layer (re-derived, micro-batch 0, recompute "
                f"{'/'.join(kinds)}): {span} MiB x {len(self.formula)} layers here = "
                f"{sum(self.formula) / MiB:.2f} MiB" + "".join(
                    f"\n  {kind} layer terms (MiB): " + ", ".join(
                        f"{name} {value / MiB:.3f}" for name, value in terms.items())
                    for kind, terms in sorted(self.terms.items())))

    def arm(self, executor) -> None:
        """Count micro-batch 0's saved activations in the executor's next run."""
        self.counter = SavedActivationCounter(units_of(self.model), self.model.parameters())
        executor.probe = self.counter

    def measured(self, executor) -> Dict[str, float]:
        """After the armed step: per-layer MiB measured and re-derived (means over this
        rank's blocks), and a line saying so."""
        executor.probe = None
        counted = self.counter.bytes
        layers = [v for k, v in counted.items() if k.startswith("layers.")]
        self.counter = None
        if not layers:
            return {}
        return {"act_mib_per_layer": sum(layers) / len(layers) / MiB,
                "act_mib_per_layer_formula": sum(self.formula) / len(self.formula) / MiB,
                "act_mib_embed_head": (counted.get("embed", 0) + counted.get("head", 0)) / MiB}

    @staticmethod
    def line(m: Dict[str, float]) -> str:
        ratio = m["act_mib_per_layer"] / max(m["act_mib_per_layer_formula"], 1e-12)
        return (f"activations per layer measured (step 1, micro-batch 0): "
                f"{m['act_mib_per_layer']:.2f} MiB, re-derived {m['act_mib_per_layer_formula']:.2f}"
                f" MiB ({ratio:.2f}x); embedding + head {m['act_mib_embed_head']:.2f} MiB")
