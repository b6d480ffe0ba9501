"""The learning-rate schedule: a function of the optimizer step (the trainer owns it).

Two styles of the same schedules:

* ``megalite``: optimizer step ``s`` (0-based) of a ``W``-step warm-up uses the fraction
  ``(s+1)/W`` of the way from ``warmup_min_lr`` to ``lr``, so the first step already trains and
  step ``W`` reaches the peak; the decay ends at ``min_lr`` on the last step.
* ``deepspeed``: exactly what ``DeepSpeedEngine`` uses at its (s+1)-th optimizer step with
  ``WarmupLR`` (constant), ``WarmupDecayLR`` (linear) or ``WarmupCosineLR`` (cosine). The engine
  builds the scheduler (iteration -1) and calls its ``step()`` after each applied optimizer step,
  so step ``s`` sees iteration ``i = s - 1``: two steps at the warm-up's start value (the cosine
  scheduler's first is 0), a warm-up fraction ``i/W`` (linear) or ``log(i+1)/log(W)`` (log) with
  ``W = max(2, warmup_steps)``, a linear decay factor ``(T-i)/(T-W)`` and a cosine progress
  ``(i-W+1)/(T-W)`` for ``T = steps``. A step skipped for an fp16 overflow advances neither
  (the trainer passes the count of applied updates).
"""
from __future__ import annotations

import math

from megalite.config.schema import TrainConfig

STYLES = ("megalite", "deepspeed")
WARMUP_TYPES = ("linear", "log")


def lr_at(step: int, steps: int, lr: float, min_lr: float, warmup: int, schedule: str,
          decay_fraction: float = 0.2, *, warmup_type: str = "linear",
          warmup_min_lr: float = 0.0, style: str = "megalite") -> float:
    """Learning rate for optimizer step ``step`` (0-based, applied updates only): warm-up from
    ``warmup_min_lr`` to ``lr`` over ``warmup`` steps, then ``schedule`` down to ``min_lr``."""
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"train.warmup_type={warmup_type!r}: use linear or log")
    if style == "deepspeed":
        return _deepspeed(step - 1, steps, lr, min_lr, warmup, schedule, warmup_type,
                          warmup_min_lr)
    if style != "megalite":
        raise ValueError(f"train.lr_schedule_style={style!r}: use megalite or deepspeed")
    if warmup > 0 and step < warmup:
        if warmup_type == "linear":  # (lr * (step + 1)) / warmup when starting from 0, bitwise
            return warmup_min_lr + (lr - warmup_min_lr) * (step + 1) / warmup
        return warmup_min_lr + (lr - warmup_min_lr) * math.log(step + 2) / math.log(warmup + 1)
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


def _deepspeed(i: int, total: int, lr: float, min_lr: float, warmup: int, schedule: str,
               warmup_type: str, warmup_min_lr: float) -> float:
    """DeepSpeed's scheduler value after ``i + 1`` calls of ``step()`` (``i = -1``: none yet)."""
    warmup = max(2, warmup)
    if i < 0:  # before the first step(): WarmupLR/WarmupDecayLR start at min, cosine at 0
        return 0.0 if schedule == "cosine" else warmup_min_lr
    if i < warmup:
        rise = i / warmup if warmup_type == "linear" else math.log(i + 1) / math.log(warmup)
        return warmup_min_lr + (lr - warmup_min_lr) * rise
    if schedule == "constant":  # WarmupLR
        return lr
    if schedule == "linear":  # WarmupDecayLR
        return min_lr + (lr - min_lr) * max(0.0, (total - i) / max(1.0, total - warmup))
    if schedule == "cosine":  # WarmupCosineLR
        progress = min(1.0, (i - warmup + 1) / max(1, total - warmup))
        return max(0.0, min_lr + (lr - min_lr) * (1.0 + math.cos(math.pi * progress)) / 2)
    raise ValueError(f"train.lr_schedule={schedule!r} with train.lr_schedule_style=deepspeed: "
                     "use constant, linear or cosine (DeepSpeed has no wsd), or style megalite")


def train_lr(train: TrainConfig, step: int) -> float:
    """``lr_at`` for a ``TrainConfig``: the learning rate of applied optimizer step ``step``
    (0-based)."""
    return lr_at(step, train.steps, train.lr, train.min_lr, train.warmup_steps,
                 train.lr_schedule, train.decay_fraction, warmup_type=train.warmup_type,
                 warmup_min_lr=train.warmup_min_lr, style=train.lr_schedule_style)
