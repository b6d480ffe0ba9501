"""What ``megalite train`` says about memory: the planner's prediction for its own rank before
its first step, and what that step measured — on CUDA ``torch.cuda.max_memory_allocated``, on a
CPU the dry run's tracker (``MemTracker``) around the real step (RSS would count the allocator's
cache and the interpreter, not the step). Both go into the first step's metrics row
(``mem.predicted_peak``, ``mem.measured_peak``, bytes)."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional

import torch

MIB = 2**20


class MemoryCheck:
    """One per Trainer. ``step(train_step, first, say)`` runs a training step; for the run's
    first it says the prediction, measures the step's peak, says it and adds both to the
    step's record."""

    def __init__(self, trainer):
        self.trainer = trainer  # its optimizer is asked for only when a step is measured
        self.dims, self.engine, self.model = trainer.dims, trainer.engine, trainer.model
        self.cuda = self.dims.device.type == "cuda"
        self.terms: Optional[Dict[str, int]] = None
        from megalite.planner.dry_run import unsupported

        self.why = unsupported(trainer.cfg) or ""  # the planner models the language-model heads
        if not self.why:
            from megalite.planner.memory import rank_memory

            self.terms = rank_memory(trainer.cfg, trainer.args, self.dims.pp_rank,
                                     gpu=self.cuda)
        self.measured: Optional[int] = None

    def step(self, train_step: Callable[[], dict], first: bool,
             say: Callable[[str], None]) -> dict:
        """Run a training step; the first also counts micro-batch 0's saved activations
        (``trainer.activations``) and says both measurements beside their predictions."""
        if not first:
            return train_step()
        say(self.describe())
        activations, executor = self.trainer.activations, self.trainer.executor
        activations.arm(executor)
        with self.first_step():
            record = train_step()
        if self.measured is not None:
            record.update(self.record())
            say(self.line())
        counted = activations.measured(executor)
        if counted:
            record.update(counted)
            say(activations.line(counted))
        return record

    def describe(self) -> str:
        if self.terms is None:
            return f"memory: {self.why}"
        from megalite.planner.memory import ACTIVATIONS, TEMPORARIES, term_bytes

        act = term_bytes(self.terms, ACTIVATIONS + TEMPORARIES)
        where = "GPU (flash attention, allocator allowance)" if self.cuda else "CPU paths"
        return (f"memory predicted for this rank by megalite plan's model ({where}): peak "
                f"{self.terms['total'] / MIB:.1f} MiB, of which activations and temporaries "
                f"{act / MIB:.1f} MiB")

    @contextlib.contextmanager
    def first_step(self) -> Iterator[None]:
        """Measure the peak of the step run inside."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dims.device)
            yield
            self.measured = torch.cuda.max_memory_allocated(self.dims.device)
            return
        from megalite.planner.dry_run import missing_apis, track_step

        if missing_apis() is not None:  # the tracker needs torch >= 2.5
            yield
            return
        with track_step(self.engine, self.trainer.opt, self.model) as result:
            yield
        self.measured = result.peak

    def record(self) -> Dict[str, int]:
        out = {}
        if self.terms is not None:
            out["mem.predicted_peak"] = self.terms["total"]
        if self.measured is not None:
            out["mem.measured_peak"] = self.measured
        return out

    def line(self) -> str:
        text = f"memory measured in step 1: peak {self.measured / MIB:.1f} MiB"
        if self.terms is not None:
            text += f" (predicted {self.terms['total'] / MIB:.1f}, " \
                    f"{self.measured / max(self.terms['total'], 1):.2f}x)"
        return text
