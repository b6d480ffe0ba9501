"""Semantic checks of a fully-built ``Config``, and DeepSpeed-style batch-size resolution.

Every problem is collected (not just the first) so one failed launch shows the user everything
to fix; each is one line, ``field=value: what is wrong; fix``. This module must not import torch:
the CLI validates before the heavy imports so bad input fails in milliseconds.
"""
from __future__ import annotations

import copy
import re
from typing import Any, List, Optional

from .errors import ConfigError, fmt  # noqa: F401 (re-exported)
from .schema import Config, parse_rope_scaling


_TOKENIZER_RE = re.compile(r"^(bytes|bpe:(\d+)|wordpiece:(\d+)|.+\.json)$")
MIN_WORDPIECE_VOCAB = 64
"""The smallest ``wordpiece:N``: 5 specials + the alphabet + pieces (data.tokenizer trains it)."""
MIN_BPE_VOCAB = 258
"""The smallest ``bpe:N``: 256 bytes + <|endoftext|> + at least one merge."""


class _Errors:
    """Accumulates ``field=value: problem; fix`` lines."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def add(self, name: str, value: Any, problem: str) -> None:
        self.lines.append(f"{name}={fmt(value)}: {problem}")

    def check(self, ok: bool, name: str, value: Any, problem: str) -> None:
        if not ok:
            self.add(name, value, problem)


def _choice(err: _Errors, name: str, value: str, allowed: List[str]) -> None:
    err.check(value in allowed, name, value, f"must be one of {', '.join(allowed)}")


def _check_pipeline(cfg: Config, err: _Errors) -> None:
    """Layer split, schedule and micro-batch count of pipeline parallelism, numbers named."""
    p, L = cfg.parallel, cfg.model.num_layers
    _choice(err, "parallel.schedule", p.schedule, ["gpipe", "1f1b", "interleaved", "zb-h1"])
    err.check(p.virtual_stages >= 1, "parallel.virtual_stages", p.virtual_stages,
              "must be >= 1")
    if p.virtual_stages > 1 and p.schedule != "interleaved":
        err.add("parallel.virtual_stages", p.virtual_stages,
                f"needs parallel.schedule=interleaved (got {p.schedule}); or set it to 1")
    if p.schedule == "interleaved" and p.pp > 1 and p.virtual_stages < 2:
        err.add("parallel.schedule", p.schedule, "interleaved needs parallel.virtual_stages >= 2")
    stages = p.pp * max(p.virtual_stages, 1)
    if p.layers_per_stage:
        if len(p.layers_per_stage) != stages or sum(p.layers_per_stage) != L or \
                min(p.layers_per_stage) < 1:
            err.add("parallel.layers_per_stage", p.layers_per_stage,
                    f"needs pp*virtual_stages = {stages} positive numbers summing to "
                    f"model.num_layers = {L}")
    elif L > 0 and L % stages:
        err.add("parallel.pp", p.pp, f"pp*virtual_stages = {stages} must divide "
                f"model.num_layers = {L}; change them or give parallel.layers_per_stage")


def _check_pipeline_batch(cfg: Config, err: _Errors, given: Config) -> None:
    """Pipeline checks of the *resolved* batch (run after ``resolve_batch``, which may derive
    grad_accum from global_batch_size): interleaved 1F1B runs micro-batches in groups of pp.

    ``given`` holds the batch fields as the user set them, to word the fix in their terms."""
    p, t = cfg.parallel, cfg.train
    ga = t.grad_accum
    if p.pp <= 1 or p.schedule != "interleaved" or ga is None or ga % p.pp == 0:
        return
    per = t.micro_batch_size * p.dp  # samples per step for each micro-batch
    options = sorted({k for k in (ga // p.pp * p.pp, -(-ga // p.pp) * p.pp) if k > 0})
    m, a, g = (given.train.micro_batch_size, given.train.grad_accum,
               given.train.global_batch_size)
    how = ""
    if a is None and m is None and g is not None:  # global alone: grad_accum defaults to 1
        how = " (grad_accum is 1 when only global_batch_size is set)"
        fix = "set " + " or ".join(f"train.micro_batch_size={t.micro_batch_size} with "
                                   f"train.global_batch_size={k * per}" for k in options)
    elif a is None and g is not None:  # derived: the user thinks in global batch sizes
        how = (f" (global_batch_size {g} / (micro_batch_size {t.micro_batch_size} x dp "
               f"{p.dp}))")
        fix = "set train.global_batch_size=" + " or ".join(str(k * per) for k in options)
    elif g is not None:  # both given: both must change
        fix = "set " + " or ".join(f"train.grad_accum={k} with train.global_batch_size="
                                   f"{k * per}" for k in options)
    else:
        fix = "set train.grad_accum=" + " or ".join(str(k) for k in options)
    err.add("train.grad_accum", ga, f"micro-batches per step {ga}{how} must be a multiple of "
            f"parallel.pp={p.pp} for the interleaved schedule; {fix}, or use another "
            "parallel.schedule")


def _tp_problems(m, tp: int) -> List[str]:
    """The model shapes a tensor-parallel degree ``tp`` fails to split, as ``field=value``."""
    kv = m.num_kv_heads or m.num_heads
    ffn = m.ffn_hidden_size
    if ffn is None and m.family != "llama":
        ffn = 4 * m.hidden_size
    out = []
    if m.num_heads > 0 and m.num_heads % tp:
        out.append(f"model.num_heads={m.num_heads}")
    if kv != m.num_heads and kv > 0 and kv % tp and tp % kv:
        out.append(f"model.num_kv_heads={kv} (or be a multiple of it: kv heads are replicated)")
    if ffn is not None and ffn > 0 and ffn % tp:
        out.append(f"model.ffn_hidden_size={ffn}")
    return out


def _check_tensor_parallel(cfg: Config, err: _Errors) -> None:
    """Shapes a tensor-parallel degree must divide: one line naming every number it misses
    and the degrees that would do."""
    m, tp = cfg.model, cfg.parallel.tp
    err.check(cfg.parallel.vocab_multiple > 0, "parallel.vocab_multiple",
              cfg.parallel.vocab_multiple, "must be positive")
    if tp <= 1:
        return
    problems = _tp_problems(m, tp)
    if problems:
        valid = [d for d in range(1, max(m.num_heads, 1) + 1) if not _tp_problems(m, d)]
        err.add("parallel.tp", tp, f"must divide {', '.join(problems)} (split over the "
                f"tensor-parallel ranks); valid: {', '.join(map(str, valid))}")
    if cfg.parallel.sequence_parallel and cfg.data.seq_len % tp:
        err.add("parallel.sequence_parallel", True, f"data.seq_len={cfg.data.seq_len} must "
                f"divide by parallel.tp={tp}; change one or turn sequence parallelism off")


def resolve_batch(cfg: Config, err: _Errors) -> None:
    """Fill the missing one of micro/grad_accum/global from global = micro * grad_accum * dp.

    Mirrors DeepSpeed's rules so a ds_config's batch fields mean the same here.
    """
    t, dp = cfg.train, cfg.parallel.dp
    m, a, g = t.micro_batch_size, t.grad_accum, t.global_batch_size
    bad = False
    for name, value in (("micro_batch_size", m), ("grad_accum", a), ("global_batch_size", g)):
        if value is not None and value <= 0:
            err.add(f"train.{name}", value, "must be a positive integer; fix or leave it unset")
            bad = True
    if bad or dp <= 0:
        return
    if m is not None and a is not None and g is not None:
        err.check(m * a * dp == g, "train.global_batch_size", g,
                  f"must equal micro_batch_size {m} x grad_accum {a} x dp {dp} = {m * a * dp}; "
                  "change one of them or leave one unset")
    elif m is not None and a is not None:
        t.global_batch_size = m * a * dp
    elif m is not None and g is not None:
        if g % (m * dp):
            err.add("train.global_batch_size", g,
                    f"not divisible by micro_batch_size {m} x dp {dp} = {m * dp}, so grad_accum "
                    "is not a whole number; choose sizes where global = micro x grad_accum x dp")
        else:
            t.grad_accum = g // (m * dp)
    elif a is not None and g is not None:
        if g % (a * dp):
            err.add("train.global_batch_size", g,
                    f"not divisible by grad_accum {a} x dp {dp} = {a * dp}, so micro_batch_size "
                    "is not a whole number; choose sizes where global = micro x grad_accum x dp")
        else:
            t.micro_batch_size = g // (a * dp)
    elif m is not None:
        t.grad_accum, t.global_batch_size = 1, m * dp
    elif g is not None:
        if g % dp:
            err.add("train.global_batch_size", g,
                    f"not divisible by dp {dp}; choose a multiple of dp or set micro_batch_size")
        else:
            t.grad_accum, t.micro_batch_size = 1, g // dp
    else:
        err.add("train.micro_batch_size", m, "set train.micro_batch_size or "
                "train.global_batch_size (grad_accum alone does not fix the batch size)")


def _check_model(cfg: Config, err: _Errors) -> None:
    m = cfg.model
    _choice(err, "model.family", m.family, ["gpt", "llama", "bert"])
    _choice(err, "model.kernels", m.kernels, ["fused", "torch"])
    err.check(m.num_labels == 0 or (m.family == "bert" and m.num_labels >= 2),
              "model.num_labels", m.num_labels, "needs model.family=bert and 2+ classes")
    _choice(err, "model.recompute", m.recompute, ["none", "selective", "full"])
    err.check(m.recompute_layers >= 0, "model.recompute_layers", m.recompute_layers,
              "must be >= 0 (0: every block)")
    err.check(m.recompute_layers == 0 or m.recompute == "full", "model.recompute_layers",
              m.recompute_layers, f"applies to model.recompute=full only (it is "
              f"{m.recompute}); set model.recompute=full or drop it")
    for name in ("num_layers", "hidden_size", "num_heads", "max_seq_len"):
        value = getattr(m, name)
        err.check(value > 0, f"model.{name}", value, "must be positive")
    if m.hidden_size > 0 and m.num_heads > 0:
        err.check(m.hidden_size % m.num_heads == 0, "model.num_heads", m.num_heads,
                  f"must divide model.hidden_size={m.hidden_size}; pick a divisor")
    if m.num_kv_heads is not None:
        if m.num_kv_heads <= 0:
            err.add("model.num_kv_heads", m.num_kv_heads, "must be positive or none")
        elif m.family == "gpt" and m.num_kv_heads != m.num_heads:
            err.add("model.num_kv_heads", m.num_kv_heads,
                    "grouped-query attention is llama-only; unset it or use model.family=llama")
        elif m.num_heads > 0 and m.num_heads % m.num_kv_heads:
            err.add("model.num_kv_heads", m.num_kv_heads,
                    f"must divide model.num_heads={m.num_heads}; pick a divisor")
    for name in ("ffn_hidden_size", "vocab_size"):
        value = getattr(m, name)
        err.check(value is None or value > 0, f"model.{name}", value, "must be positive or none")
    err.check(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    for name in ("norm_eps", "rope_theta", "init_std"):
        value = getattr(m, name)
        err.check(value > 0, f"model.{name}", value, "must be positive")
    if m.rope_scaling is not None:
        try:
            parse_rope_scaling(m.rope_scaling)
        except ValueError as e:
            err.add("model.rope_scaling", m.rope_scaling, str(e).split(": ", 1)[-1])


def resolve_dp(cfg: Config, err: _Errors, world_size: Optional[int]) -> None:
    """``parallel.dp=auto`` -> world_size / (tp * pp) under a launcher (Megatron), 1 bare; a
    number must agree with the launcher's world size."""
    p = cfg.parallel
    for name in ("tp", "pp"):
        err.check(getattr(p, name) >= 1, f"parallel.{name}", getattr(p, name),
                  "must be at least 1")
    if p.dp == "auto":
        if world_size is None:
            p.dp = 1
        elif p.tp >= 1 and p.pp >= 1:
            if world_size % (p.tp * p.pp):
                err.add("parallel.dp", p.dp, f"the launcher started {world_size} ranks, not a "
                        f"multiple of tp*pp = {p.tp}*{p.pp} = {p.tp * p.pp}; start a multiple "
                        "of it or change parallel.tp/pp")
            else:
                p.dp = world_size // (p.tp * p.pp)
        return
    if p.dp < 1:
        err.add("parallel.dp", p.dp, "must be at least 1 (or auto)")
    elif world_size is not None and p.tp >= 1 and p.pp >= 1 and \
            world_size != p.dp * p.tp * p.pp:
        err.add("parallel.dp", p.dp, f"world size {world_size} != dp*pp*tp = "
                f"{p.dp}*{p.pp}*{p.tp} = {p.dp * p.pp * p.tp}: start {p.dp * p.pp * p.tp} "
                "ranks, or leave parallel.dp unset (auto) to take it from the launcher")


def _check_parallel(cfg: Config, err: _Errors) -> None:
    p = cfg.parallel
    if p.tp >= 1 and p.pp >= 1:  # else resolve_dp named them
        _check_pipeline(cfg, err)
        _check_tensor_parallel(cfg, err)
    _choice(err, "parallel.backend", p.backend, ["auto", "gloo", "nccl"])
    err.check(p.bucket_mb > 0, "parallel.bucket_mb", p.bucket_mb, "must be positive")
    err.check(p.timeout_s > 0, "parallel.timeout_s", p.timeout_s, "must be positive")
    _check_zero(cfg, err)


def _check_zero(cfg: Config, err: _Errors) -> None:
    p = cfg.parallel
    if p.zero_stage not in (0, 1, 2, 3):
        err.add("parallel.zero_stage", p.zero_stage, "must be 0, 1, 2 or 3")
    _choice(err, "parallel.zero2_accumulate", p.zero2_accumulate, ["shard", "full"])
    _choice(err, "parallel.zero3_reshard_after_forward", p.zero3_reshard_after_forward,
            ["auto", "true", "false"])


def _check_train(cfg: Config, err: _Errors) -> None:
    t = cfg.train
    err.check(t.steps > 0, "train.steps", t.steps, "must be positive")
    err.check(t.lr > 0, "train.lr", t.lr, "must be positive")
    if t.min_lr < 0 or (t.lr > 0 and t.min_lr > t.lr):
        err.add("train.min_lr", t.min_lr, f"must be in [0, train.lr={fmt(t.lr)}]")
    _choice(err, "train.lr_schedule", t.lr_schedule, ["cosine", "linear", "constant", "wsd"])
    _choice(err, "train.warmup_type", t.warmup_type, ["linear", "log"])
    _choice(err, "train.lr_schedule_style", t.lr_schedule_style, ["megalite", "deepspeed"])
    err.check(t.warmup_min_lr >= 0, "train.warmup_min_lr", t.warmup_min_lr, "must be >= 0")
    if t.lr_schedule_style == "deepspeed" and t.lr_schedule == "wsd":
        err.add("train.lr_schedule", t.lr_schedule, "DeepSpeed has no wsd schedule: use "
                "constant, linear or cosine, or train.lr_schedule_style=megalite")
    # DeepSpeed's schedulers may warm up for longer than the run (they warn)
    longer = t.lr_schedule_style == "megalite" and t.steps > 0 and t.warmup_steps > t.steps
    if t.warmup_steps < 0 or longer:
        err.add("train.warmup_steps", t.warmup_steps, f"must be in [0, train.steps={t.steps}]")
    err.check(0 < t.decay_fraction <= 1, "train.decay_fraction", t.decay_fraction,
              "must be in (0, 1]")
    err.check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    for name in ("beta1", "beta2"):
        value = getattr(t, name)
        err.check(0 <= value < 1, f"train.{name}", value, "must be in [0, 1)")
    err.check(t.eps > 0, "train.eps", t.eps, "must be positive")
    err.check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables)")
    _choice(err, "train.precision", t.precision, ["fp32", "bf16", "fp16"])
    err.check(t.loss_scale >= 0, "train.loss_scale", t.loss_scale,
              "must be >= 0 (0: dynamic scaling)")
    err.check(t.initial_loss_scale > 0, "train.initial_loss_scale", t.initial_loss_scale,
              "must be positive")
    err.check(t.loss_scale_window >= 1, "train.loss_scale_window", t.loss_scale_window,
              "must be at least 1")
    err.check(t.loss_scale_hysteresis >= 1, "train.loss_scale_hysteresis",
              t.loss_scale_hysteresis, "must be at least 1")
    err.check(0 < t.min_loss_scale <= t.initial_loss_scale, "train.min_loss_scale",
              t.min_loss_scale, f"must be in (0, train.initial_loss_scale="
              f"{fmt(t.initial_loss_scale)}]")
    _choice(err, "train.grad_dtype", t.grad_dtype, ["fp32", "bf16", "fp16"])
    err.check(t.seed >= 0, "train.seed", t.seed, "must be >= 0")
    err.check(t.peak_tflops >= 0, "train.peak_tflops", t.peak_tflops,
              "must be >= 0 (0 looks the device up)")
    err.check(t.eval_interval >= 0, "train.eval_interval", t.eval_interval, "must be >= 0")
    err.check(t.eval_iters > 0, "train.eval_iters", t.eval_iters, "must be positive")


def _check_split(split: str, err: _Errors) -> None:
    parts = split.split(",")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        nums = []
    ok = len(nums) == 2 and all(n >= 0 for n in nums) and nums[0] > 0
    err.check(ok, "data.split", split,
              "must be two non-negative numbers `train,val` with train > 0, e.g. 98,2")


def _check_data(cfg: Config, err: _Errors) -> None:
    d = cfg.data
    _choice(err, "data.source", d.source, ["stdlib", "synthetic", "prepared"])
    if d.source == "prepared" and not d.paths:
        err.add("data.paths", d.paths,
                "data.source=prepared needs dataset prefixes; set --data.paths=PREFIX[,PREFIX]")
    if d.weights:
        if len(d.weights) != len(d.paths):
            err.add("data.weights", d.weights,
                    f"has {len(d.weights)} entries but data.paths has {len(d.paths)}; "
                    "give one weight per path")
        elif any(w <= 0 for w in d.weights):
            err.add("data.weights", d.weights, "every weight must be positive")
    match = _TOKENIZER_RE.match(d.tokenizer)
    if not match or (match.group(2) is not None and int(match.group(2)) < MIN_BPE_VOCAB) or (
            match.group(3) is not None and int(match.group(3)) < MIN_WORDPIECE_VOCAB):
        err.add("data.tokenizer", d.tokenizer,
                f"must be `bytes`, `bpe:N` with N >= {MIN_BPE_VOCAB}, `wordpiece:N` with N >= "
                f"{MIN_WORDPIECE_VOCAB}, or a tokenizer .json path")
    err.check(d.stdlib_max_bytes > 0, "data.stdlib_max_bytes", d.stdlib_max_bytes,
              "must be positive")
    if d.seq_len <= 0:
        err.add("data.seq_len", d.seq_len, "must be positive")
    elif cfg.model.max_seq_len > 0 and d.seq_len > cfg.model.max_seq_len:
        err.add("data.seq_len", d.seq_len,
                f"exceeds model.max_seq_len={cfg.model.max_seq_len}; lower it or raise that")
    _check_split(d.split, err)
    err.check(d.num_workers >= 1, "data.num_workers", d.num_workers, "must be at least 1")
    for name in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss"):
        err.check(cfg.model.family != "bert" or not getattr(d, name), f"data.{name}", True,
                  "separates packed documents; bert samples are never packed: drop it")


def _check_rest(cfg: Config, err: _Errors) -> None:
    c, r = cfg.checkpoint, cfg.run
    err.check(c.interval >= 0, "checkpoint.interval", c.interval, "must be >= 0 (0: at end)")
    err.check(c.keep >= 0, "checkpoint.keep", c.keep, "must be >= 0 (0 keeps all)")
    _choice(err, "checkpoint.verify", c.verify, ["sizes", "full"])
    err.check(r.log_interval > 0, "run.log_interval", r.log_interval, "must be positive")
    err.check(r.sample_tokens >= 0, "run.sample_tokens", r.sample_tokens, "must be >= 0")


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Return a copy with parallel.dp and the batch sizes resolved; raise ConfigError listing
    every problem. ``world_size``: the launcher's process count, None for a bare run."""
    given, cfg = cfg, copy.deepcopy(cfg)
    err = _Errors()
    _check_model(cfg, err)
    resolve_dp(cfg, err, world_size)
    _check_parallel(cfg, err)
    if isinstance(cfg.parallel.dp, int):  # else auto could not be resolved (error added)
        before = len(err.lines)
        resolve_batch(cfg, err)
        # checks of the resolved batch sizes go after resolve_batch (grad_accum may be derived
        # there), and only when it succeeded: with conflicting sizes the final values are
        # unknown
        if len(err.lines) == before and cfg.parallel.dp >= 1:
            _check_pipeline_batch(cfg, err, given)
    _check_train(cfg, err)
    _check_data(cfg, err)
    _check_rest(cfg, err)
    if err.lines:
        raise ConfigError(err.lines)
    return cfg
