"""Dynamic loss scaling for fp16 (Micikevicius et al. 2018), with DeepSpeed's knobs.

The loss is multiplied by ``scale`` before backward so small fp16 gradients do not flush to
zero. A step whose gradients overflowed (a non-finite global norm, seen by every rank through the
norm's all-reduce) is skipped on every rank; then the scale halves once ``hysteresis``
overflows have been seen since it last grew (never below ``min_scale``). After ``window``
consecutive good steps the scale doubles and the hysteresis budget refills. A ``static`` scale
never changes (overflowed steps are still skipped). As in DeepSpeed and Megatron, a skipped step
consumes its data but does not advance the learning-rate schedule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LossScaler:
    scale: float = 2.0**16
    window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    static: bool = False
    good_steps: int = 0
    hysteresis_left: int = 0
    skipped: int = 0  # steps skipped so far (the learning-rate schedule does not advance on them)

    def __post_init__(self):
        self.hysteresis_left = self.hysteresis_left or self.hysteresis

    def update(self, overflow: bool) -> None:
        self.skipped += bool(overflow)
        if self.static:
            return
        if overflow:
            self.good_steps = 0
            self.hysteresis_left = max(self.hysteresis_left - 1, 0)
            if self.hysteresis_left == 0:
                self.scale = max(self.scale / 2, self.min_scale)
            return
        self.good_steps += 1
        if self.good_steps % self.window == 0:
            self.scale *= 2
            self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
