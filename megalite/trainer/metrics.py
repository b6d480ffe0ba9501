"""Per-step metrics: ``metrics.jsonl``, TensorBoard events when installed, a progress line."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Dict, Iterator, List, Optional

from megalite.checkpoint.files import write_atomic


class Timers:
    """Wall-clock seconds per phase, accumulated over one step."""

    def __init__(self):
        self.totals: Dict[str, float] = {}
        self._start: Dict[str, float] = {}

    def start(self, name: str) -> None:
        self._start[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - self._start.pop(name)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def take(self) -> Dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Written by one rank only (``enabled``); the others construct it disabled. With
    ``write=False`` (eval) it only prints: nothing is created in the run directory."""

    def __init__(self, run_dir: str, total_steps: int, enabled: bool, tensorboard: bool,
                 log_interval: int, write: bool = True):
        self.enabled, self.total, self.log_interval = enabled, total_steps, log_interval
        self.tty = sys.stdout.isatty()
        self.file = None
        self.tb = None
        self.tb_dir: Optional[str] = None  # the writer starts at the first row (see log)
        self._purge_step: Optional[int] = None
        self.t0 = time.perf_counter()
        self.first_step: Optional[int] = None
        self._window: List[float] = []
        self.skipped = 0  # fp16 steps skipped on overflow
        if not enabled or not write:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if tensorboard:
            self.tb_dir = os.path.join(run_dir, "tensorboard")

    def keep_until(self, step: int) -> int:
        """Drop the rows of steps after ``step`` (a run resumed there writes them again; a
        fresh run, step 0, drops all), and a line cut by a crash; the number of rows dropped.
        The file is replaced atomically: a crash here leaves the old one whole."""
        if self.file is None:
            return 0
        self._purge_step = step + 1  # TensorBoard hides the old events of those steps too
        path = self.file.name
        self.file.close()
        kept: List[str] = []
        dropped = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    keep = line.endswith("\n") and int(row["step"]) <= step
                except (ValueError, TypeError, KeyError):
                    keep = False
                if keep:
                    kept.append(line)
                elif line.strip():
                    dropped += 1
        if dropped:
            write_atomic(path, "".join(kept))
        self.file = open(path, "a", encoding="utf-8")
        return dropped

    def log(self, record: Dict) -> None:
        if not self.enabled or self.file is None:
            return
        step = record["step"]
        if self.first_step is None:
            self.first_step, self.t0 = step, time.perf_counter()
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is None and self.tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(self.tb_dir, purge_step=self._purge_step)
            except ImportError:
                self.tb_dir = None  # tensorboard is an optional extra
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key.replace(".", "/"), value, step)
        self._progress(record)

    def _progress(self, r: Dict) -> None:
        step = r["step"]
        done = step - self.first_step + 1
        eta = (time.perf_counter() - self.t0) / done * (self.total - step)
        self._window.append(r["loss"])
        loss = sum(self._window) / len(self._window)  # mean since the last printed line
        mfu = f"mfu {r['mfu']:.1%}" if "mfu" in r else "mfu n/a"  # n/a: no known peak
        line = (f"step {step}/{self.total} | loss {loss:.4f} | "
                f"{r['tokens_per_s']:,.0f} tok/s | {mfu} | lr {r['lr']:.2e} | "
                f"ETA {_fmt_duration(eta)}")
        if "loss_scale" in r:  # fp16: the scale and the overflowed (skipped) steps so far
            self.skipped += bool(r["skipped"])
            line += f" | loss scale {r['loss_scale']:g}, {self.skipped} skipped"
        if self.tty:
            width = 20
            filled = int(width * step / self.total)
            bar = "#" * filled + "." * (width - filled)
            end = "\n" if step == self.total else ""
            print(f"\r[{bar}] {line}", end=end, flush=True)
        elif step % self.log_interval == 0 or step == self.total or step == 1:
            print(line, flush=True)
        else:
            return
        self._window = []

    def print(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                print()
            print(text, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
