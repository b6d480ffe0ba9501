"""The learning-rate schedule: a function of the optimizer step (the trainer owns it)."""
from __future__ import annotations

import math


def lr_at(step: int, steps: int, lr: float, min_lr: float, warmup: int, schedule: str,
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up to ``lr`` over
    ``warmup`` steps, then ``schedule`` down to ``min_lr`` at the last step."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "wsd":  # warm-up, stable, then linear decay over the last decay_fraction
        decay_steps = max(1, int(round(steps * decay_fraction)))
        start = steps - decay_steps
        if step < start:
            return lr
        return lr - (lr - min_lr) * min(1.0, (step - start + 1) / decay_steps)
    progress = min(1.0, (step - warmup + 1) / max(1, steps - warmup))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.lr_schedule={schedule!r}: use cosine, linear, constant or wsd")
