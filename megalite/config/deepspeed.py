"""Translate a DeepSpeed ``ds_config.json`` into megalite overrides.

Users arrive with DeepSpeed configs; reading them keeps their batch/optimizer/schedule intent
without a manual rewrite. DeepSpeed's own semantics win (the scheduler's warmup_max_lr, not the
optimizer lr, is the peak lr; each step's lr is the one DeepSpeedEngine would use, see
``train.lr_schedule_style``; no scheduler block means a constant lr), features megalite lacks are
errors, and every key megalite does not read is named in one warning so nothing is ignored
silently. No torch import here.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

from .validate import ConfigError, fmt

_SCHEDULES = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


class _Reader:
    """Reads dotted keys from the ds dict and remembers which were consumed."""

    def __init__(self, ds: Dict[str, Any]) -> None:
        self.ds = ds
        self.used: Set[str] = set()
        self.errors: List[str] = []
        self.warnings: List[str] = []
        self.out: Dict[str, Dict[str, Any]] = {"train": {}, "parallel": {}, "run": {}}

    def get(self, dotted: str, default: Any = None) -> Any:
        """Value at ``dotted`` (``"auto"`` passes through so callers can skip it), else default."""
        node: Any = self.ds
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        self.used.add(dotted)
        return node

    def put(self, target: str, value: Any) -> None:
        """Record an override; None and DeepSpeed's ``auto`` mean "keep megalite's value"."""
        if value is None or value == "auto":
            return
        section, name = target.split(".")
        self.out[section][name] = value

    def error(self, key: str, value: Any, problem: str) -> None:
        self.errors.append(f"deepspeed {key}={fmt(value)}: {problem}")


def _leaves(node: Any, prefix: str = "") -> List[str]:
    """Dotted names of every non-dict value (empty dicts count as leaves)."""
    if isinstance(node, dict) and node:
        names: List[str] = []
        for key, value in node.items():
            names.extend(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return names
    return [prefix]


def _optimizer(r: _Reader) -> Optional[float]:
    """Map Adam/AdamW; return the optimizer lr (WarmupCosineLR scales min_lr by it)."""
    kind = r.get("optimizer.type")
    if kind is None:
        return None
    if str(kind).lower() not in ("adam", "adamw"):
        r.error("optimizer.type", kind, "megalite only has AdamW; use Adam or AdamW")
        return None
    if str(kind).lower() == "adam" and r.get("optimizer.params.adam_w_mode", True) is False:
        r.error("optimizer.params.adam_w_mode", False, "L2-regularised Adam is not "
                "available, megalite only has AdamW (decoupled weight decay); remove it")
    r.get("optimizer.params.torch_adam")  # implementation choice only; same maths
    if r.get("optimizer.params.bias_correction", True) is False:
        r.error("optimizer.params.bias_correction", False,
                "megalite's AdamW always corrects bias; remove it")
    lr = r.get("optimizer.params.lr")
    r.put("train.lr", lr)
    betas = r.get("optimizer.params.betas")
    if isinstance(betas, (list, tuple)) and len(betas) == 2:
        r.put("train.beta1", betas[0])
        r.put("train.beta2", betas[1])
    elif betas is not None and betas != "auto":
        r.error("optimizer.params.betas", betas, "must be a list of two numbers")
    r.put("train.eps", r.get("optimizer.params.eps"))
    r.put("train.weight_decay", r.get("optimizer.params.weight_decay"))
    missing = [p for p in ("lr", "betas", "eps", "weight_decay")
               if r.get(f"optimizer.params.{p}") is None]
    if missing:
        r.warnings.append(f"deepspeed optimizer.params omits {', '.join(missing)}: megalite's "
                          "values are kept (DeepSpeed would use its FusedAdam defaults)")
    return lr if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def _warmup(r: _Reader, kind: str) -> None:
    """Warm-up parameters shared by the three supported schedulers."""
    p = "scheduler.params."
    steps = r.get(p + "warmup_num_steps", 1000)
    if r.get(p + "warmup_num_steps") is None:
        r.warnings.append(f"deepspeed scheduler.params.warmup_num_steps unset: DeepSpeed's "
                          f"default 1000 is used by {kind}")
    if steps != "auto" and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        r.error(p + "warmup_num_steps", steps, "DeepSpeed needs a positive integer (it warms "
                "up over at least 2 steps)")
    r.put("train.warmup_steps", steps)
    wtype = r.get(p + "warmup_type", "log")  # DeepSpeed's default
    if wtype not in ("log", "linear", "auto"):
        r.error(p + "warmup_type", wtype, "must be log or linear")
    r.put("train.warmup_type", wtype)


def _scheduler(r: _Reader, opt_lr: Optional[float], base_lr: Optional[float]) -> None:
    """The scheduler block, step for step as DeepSpeedEngine runs it (lr_schedule_style
    deepspeed); without one DeepSpeed keeps the optimizer's lr constant."""
    kind = r.get("scheduler.type")
    if kind is None:
        if r.get("scheduler") is None:
            r.put("train.lr_schedule", "constant")
            r.put("train.warmup_steps", 0)
        else:
            r.error("scheduler.type", None, "a scheduler block needs a type; use "
                    + ", ".join(_SCHEDULES) + " (or drop the block for a constant lr)")
        return
    if kind not in _SCHEDULES:
        r.error("scheduler.type", kind, "not supported; use " + ", ".join(_SCHEDULES))
        return
    r.put("train.lr_schedule", _SCHEDULES[kind])
    r.put("train.lr_schedule_style", "deepspeed")
    _warmup(r, kind)
    p = "scheduler.params."
    if kind != "WarmupLR":
        total = r.get(p + "total_num_steps")
        if total is None:
            r.error(p + "total_num_steps", None, f"{kind} needs it")
        r.put("train.steps", total)
    if kind == "WarmupCosineLR":
        # The peak lr is the optimizer's; the warm-up start and the floor are ratios of it.
        lr = opt_lr if opt_lr is not None else base_lr
        for key, target, default in (("warmup_min_ratio", "train.warmup_min_lr", 0.0),
                                     ("cos_min_ratio", "train.min_lr", 0.0001)):
            ratio = r.get(p + key, default)
            if _number(ratio) and lr is not None:
                r.put(target, ratio * lr)
            elif ratio != "auto":
                r.error(p + key, ratio, "must be a number")
        return
    max_lr = r.get(p + "warmup_max_lr")
    if max_lr is None and kind == "WarmupDecayLR":
        max_lr = 0.001
        r.warnings.append("deepspeed scheduler.params.warmup_max_lr unset: WarmupDecayLR's "
                          "default 0.001 is the peak lr")
    if opt_lr is not None and max_lr not in (None, "auto") and max_lr != opt_lr:
        r.warnings.append(f"deepspeed optimizer.params.lr={fmt(opt_lr)} is replaced by "
                          f"scheduler.params.warmup_max_lr={fmt(max_lr)}, as in DeepSpeed")
    r.put("train.lr", max_lr)  # WarmupLR without it peaks at the optimizer's lr
    min_lr = r.get(p + "warmup_min_lr", 0.0)
    r.put("train.warmup_min_lr", min_lr)
    if kind == "WarmupDecayLR":
        r.put("train.min_lr", min_lr)  # DeepSpeed decays back down to warmup_min_lr


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fp16(r: _Reader) -> None:
    """The fp16 block: dynamic (loss_scale 0) or static loss scaling, DeepSpeed's defaults."""
    if r.get("fp16.enabled") is not True:
        for key in ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                    "min_loss_scale", "consecutive_hysteresis"):
            r.get(f"fp16.{key}")  # fp16 off: its knobs are moot, not unknown
        return
    r.put("train.precision", "fp16")
    r.put("train.loss_scale", r.get("fp16.loss_scale", 0))
    power = r.get("fp16.initial_scale_power", 16)
    if isinstance(power, int) and not isinstance(power, bool):
        r.put("train.initial_loss_scale", float(2 ** power))
    elif power != "auto":
        r.error("fp16.initial_scale_power", power, "must be an integer (the scale is 2**power)")
    r.put("train.loss_scale_window", r.get("fp16.loss_scale_window", 1000))
    r.put("train.loss_scale_hysteresis", r.get("fp16.hysteresis", 2))
    r.put("train.min_loss_scale", r.get("fp16.min_loss_scale", 1))
    if r.get("fp16.consecutive_hysteresis", False) is True:
        r.error("fp16.consecutive_hysteresis", True, "megalite refills the hysteresis only "
                "when the scale grows (DeepSpeed's default); remove it")


def _zero(r: _Reader) -> None:
    zero = r.get("zero_optimization")
    stage: Any = None
    if isinstance(zero, bool):
        stage = 1 if zero else 0
    elif isinstance(zero, dict):
        r.used.discard("zero_optimization")  # only the keys read below count as used
        stage = r.get("zero_optimization.stage", 0)
    if stage is None or stage == "auto":
        return
    if stage not in (0, 1, 2, 3):
        r.error("zero_optimization.stage", stage, "must be 0, 1, 2 or 3")
        return
    r.put("parallel.zero_stage", stage)
    z = "zero_optimization."
    # how megalite always works (overlapped, contiguous buckets): nothing to map
    for key in ("overlap_comm", "contiguous_gradients", "reduce_scatter",
                "allgather_partitions", "round_robin_gradients"):
        r.get(z + key)
    size = r.get(z + "reduce_bucket_size")
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        r.put("parallel.bucket_mb", size * 4 / 2**20)  # DeepSpeed counts elements
    device = r.get(z + "offload_optimizer.device")
    if device == "cpu":
        r.put("parallel.offload_optimizer", True)
        r.get(z + "offload_optimizer.pin_memory")  # megalite pins whenever the model is on a GPU
    elif device not in (None, "none"):
        r.error(z + "offload_optimizer.device", device, "megalite offloads to cpu only; use "
                "cpu or none")
    if r.get(z + "offload_param.device") not in (None, "none"):
        r.error(z + "offload_param.device", r.get(z + "offload_param.device"),
                "parameter offload is not supported; remove it (offload_optimizer is)")
    reshard = r.get(z + "stage3_param_persistence_threshold")
    if reshard is not None:
        r.warnings.append(f"deepspeed {z}stage3_param_persistence_threshold={fmt(reshard)}: "
                          "megalite shards every parameter; see "
                          "parallel.zero3_reshard_after_forward")


def _tensorboard(r: _Reader) -> None:
    """tensorboard.enabled -> run.tensorboard; the events always go to RUN_DIR/tensorboard."""
    enabled = r.get("tensorboard.enabled")
    if isinstance(enabled, bool):
        r.put("run.tensorboard", enabled)
    elif enabled is not None:
        r.error("tensorboard.enabled", enabled, "must be true or false")
    where = {k: r.get(f"tensorboard.{k}") for k in ("output_path", "job_name")}
    where = {k: v for k, v in where.items() if v not in (None, "")}
    if where and enabled is not False:
        given = ", ".join(f"tensorboard.{k}={fmt(v)}" for k, v in where.items())
        r.warnings.append(f"deepspeed {given}: megalite writes TensorBoard events to "
                          "RUN_DIR/tensorboard; choose the folder with --run.dir")


def _precision_and_zero(r: _Reader) -> None:
    for key in ("bf16", "bfloat16"):
        enabled = r.get(f"{key}.enabled")
        if enabled is True:
            r.put("train.precision", "bf16")
        elif enabled is False:
            r.put("train.precision", "fp32")
    _fp16(r)
    _zero(r)


def _activation_checkpointing(r: _Reader) -> None:
    """DeepSpeed's ``activation_checkpointing`` block configures its checkpoint function, which
    the model must call: the block alone turns nothing on in DeepSpeed, so it does not here
    (``model.recompute`` does). Partitioning or offloading checkpointed activations is not
    built: refused by name; every other field is warned about once."""
    block = r.ds.get("activation_checkpointing")
    if not isinstance(block, dict):
        return
    for key in block:
        value = r.get(f"activation_checkpointing.{key}")
        if key in ("partition_activations", "cpu_checkpointing") and value:
            r.error(f"activation_checkpointing.{key}", value,
                    "megalite does not partition or offload checkpointed activations; remove "
                    "it (recomputation itself: model.recompute=selective|full)")
        else:
            r.warnings.append(f"deepspeed activation_checkpointing.{key}={fmt(value)} is "
                              "ignored: the block does not turn recomputation on (in DeepSpeed "
                              "the model calls its checkpoint function); use "
                              "--model.recompute=selective|full")


def map_deepspeed(ds: Dict[str, Any],
                  lr: Optional[float] = None) -> Tuple[Dict[str, Dict[str, Any]], List[str]]:
    """Return ``({"train": {...}, "parallel": {...}, "run": {...}}, warnings)``.

    ``lr`` is megalite's lr before this file applies; WarmupCosineLR's cos_min_ratio is a
    fraction of the optimizer lr, so it is needed when the ds optimizer does not set one.
    Raises ConfigError listing every unsupported feature.
    """
    if not isinstance(ds, dict):
        raise ConfigError([f"deepspeed config must be a JSON object, got {type(ds).__name__}"])
    r = _Reader(ds)
    r.put("train.global_batch_size", r.get("train_batch_size"))
    r.put("train.micro_batch_size", r.get("train_micro_batch_size_per_gpu"))
    r.put("train.grad_accum", r.get("gradient_accumulation_steps"))
    r.put("train.grad_clip", r.get("gradient_clipping"))
    r.put("run.log_interval", r.get("steps_per_print"))
    opt_lr = _optimizer(r)
    _scheduler(r, opt_lr, lr)
    _precision_and_zero(r)
    _tensorboard(r)
    _activation_checkpointing(r)
    unused = [leaf for leaf in _leaves(ds)
              if leaf not in r.used and not any(leaf.startswith(u + ".") for u in r.used)]
    if unused:
        r.warnings.append("deepspeed config keys megalite does not use (ignored): "
                          + ", ".join(unused))
    if r.errors:
        raise ConfigError(r.errors)
    return r.out, r.warnings
