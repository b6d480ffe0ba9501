"""The step loop: micro-batches -> executor (the schedule's forwards and backwards) -> engine
(finished gradients) -> optimizer (clip, AdamW); with metrics, evaluation, checkpoints and
preemption handling around it."""
from __future__ import annotations

import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megalite.checkpoint.async_save import AsyncSaver
from megalite.config import save_yaml
from megalite.config.schema import Config
from megalite.hardware import device_peak_tflops
from megalite.models import (DTYPES, CausalLM, build_model, flops_per_token, num_params,
                             resolve_model_args)
from megalite.parallel import comm
from megalite.parallel.dims import ParallelDims
from megalite.pipeline import schedules
from megalite.pipeline.executor import PipelineExecutor, StepLoss
from megalite.pipeline.inference import inference_view
from megalite.planner.startup import MemoryCheck
from megalite.models.recompute import apply_recompute
from megalite.plan import model_plan
from megalite.tensor_parallel.plan import loss_fn
from megalite.tensor_parallel.random import SplitRegionRNG, cover_split_regions
from megalite.trainer import checkpoint, objective, resume
from megalite.trainer.activations import ActivationReport
from megalite.trainer.lr import train_lr
from megalite.trainer.metrics import MetricsLogger, Timers
from megalite.trainer.resume import ResumeError, resume_off_problem  # noqa: F401 (API)
from megalite.zero import LossScaler, ShardedAdamW, ZeroEngine


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    losses: List[float] = field(default_factory=list)  # one per step run by this call
    val_loss: Optional[float] = None
    step: int = 0  # optimizer steps completed in total
    checkpoint: Optional[str] = None
    preempted: bool = False


def step_seed(seed: int, step: int, dims: ParallelDims) -> int:
    """Dropout seed of one step: a function of the step (so a resumed run draws the same masks)
    and of the data-parallel and pipeline rank (different data, different masks)."""
    return (seed * 7_919 + step * 104_729 + dims.dp_rank * 1_299_709 + dims.pp_rank * 15_485_863
            ) % (2**63)


class Trainer:
    """Builds one rank of the job (data, model through the plan, ZeRO engine, executor,
    optimizer) and runs the step loop. Every layout takes the same path: the executor runs the
    schedule's actions (pp = 1 is a one-stage schedule), the engine finishes the gradients, the
    optimizer clips and steps — whatever differs between layouts lives in those three.

    ``read_only`` (eval): no optimizer is built unless it trains; nothing is written into the
    run directory — no config.yaml, no metrics.jsonl, no TensorBoard events; only ``fit``
    (train) writes there."""

    def __init__(self, cfg: Config, dims: ParallelDims, read_only: bool = False,
                 prefixes: Optional[List[str]] = None):
        self.cfg, self.dims = cfg, dims
        t, p = cfg.train, cfg.parallel
        self.mbs, self.ga, self.gbs = t.micro_batch_size, t.grad_accum, t.global_batch_size
        # ``prefixes``: objective.prepare's (the CLI prepares before the process group). None:
        # every rank prepares here; the cache's file lock lets one per cache directory prepare
        # while the others wait on it, not in a collective whose timeout a corpus outlasts.
        self.prefixes = objective.prepare(cfg) if prefixes is None else prefixes
        self.train_ds, self.val_ds, self.tokenizer = objective.datasets(
            cfg, t.steps * self.gbs, t.eval_iters * self.gbs)
        self.tokenizer_file = objective.tokenizer_path(cfg, self.prefixes)
        self.args = resolve_model_args(cfg.model, self.tokenizer.vocab_size, cfg.data,
                                       self.tokenizer.eod_id)  # eod: packed-document masks
        dtype = DTYPES[t.precision]
        self.timers = Timers()  # seconds per phase of a step: forward, backward, comm, optimizer
        self.engine = ZeroEngine(p.zero_stage, dims, dtype, DTYPES[t.grad_dtype], p.bucket_mb,
                                 p.zero2_accumulate, p.zero3_reshard_after_forward,
                                 tied_across_stages=self.args.tie_embeddings and dims.pp > 1)
        self.model = build_model(self.args, t.seed, dims.device, dtype,
                                 plan=model_plan(dims, p), materialize=self.engine.materialize,
                                 values=self._init_from(read_only))
        self.rank_params = sum(q.numel() for q in self.model.parameters())  # before ZeRO-3
        self.engine.attach(self.model)
        seq = cfg.data.seq_len // (dims.tp if p.sequence_parallel else 1)
        self.executor = PipelineExecutor(self.model, dims,
                                         loss_fn(self.args, dims, p.vocab_multiple, "sum"),
                                         (self.mbs, seq, self.args.hidden_size), dtype,
                                         grads=self.engine, timers=self.timers)
        chunks = len(self.model.chunks)
        self.actions = schedules.build(p.schedule, dims.pp, self.ga, dims.pp_rank, chunks)
        self.eval_actions = schedules.forward_only(dims.pp, self.ga, dims.pp_rank, chunks)
        self.split_rng = None  # per-TP-rank dropout stream where activations are split
        if dims.tp > 1 and self.args.dropout > 0:
            self.split_rng = SplitRegionRNG(dims.device)
            cover_split_regions(self.model, self.split_rng, p.sequence_parallel)
        # recomputation replays the split stream too (its hooks re-run inside the block)
        self.recompute = apply_recompute(self.model, cfg.model.recompute,
                                         cfg.model.recompute_layers, self.split_rng)
        self.activations = ActivationReport(self.model, self.args, self.recompute, self.mbs,
                                            cfg.data.seq_len, dims.tp, p.sequence_parallel,
                                            dtype, dims.device)
        self._opt: Optional[ShardedAdamW] = None  # eval (read_only) loads weights only
        if not read_only:
            self.opt  # noqa: B018 - the property builds it
        self.memory_check = None if read_only else MemoryCheck(self)  # predicted, then measured
        self.scaler = None  # fp16 only
        if t.precision == "fp16":
            self.scaler = LossScaler(t.loss_scale or t.initial_loss_scale, t.loss_scale_window,
                                     t.loss_scale_hysteresis, t.min_loss_scale,
                                     static=t.loss_scale > 0)
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")
        self.step = 0
        # samples consumed before step 0 of this run's global batch: consumed samples at a step
        # = step x global batch + shift (not 0 only when resumed with another global batch)
        self.sample_shift = 0
        # checkpoint.keep prunes only checkpoints carrying this id (rank 0's is the one written;
        # a resumed run takes its checkpoint's)
        self.run_id = uuid.uuid4().hex
        self.bytes_read = 0  # of the checkpoint resumed from, by this rank
        self.saver = AsyncSaver(dims.world_size) if cfg.checkpoint.async_save else None
        self.read_only = read_only
        self.log = MetricsLogger(cfg.run.dir, t.steps, dims.rank == 0, cfg.run.tensorboard,
                                 cfg.run.log_interval, write=not read_only)
        if dims.rank == 0 and not read_only:
            save_yaml(cfg, os.path.join(cfg.run.dir, "config.yaml"))
        with torch.device("meta"):  # the whole model's size, whatever this rank holds of it
            self.n_params = num_params(CausalLM(self.args))
        self.flops_per_token = flops_per_token(self.args, cfg.data.seq_len, self.n_params)
        self.peak = self.peak_tflops()
        self._stop_signal: Optional[int] = None

    # ---- start-up ---------------------------------------------------------------------------
    @property
    def opt(self) -> ShardedAdamW:
        """Built at start-up, or by a read-only Trainer (eval) only if it trains after all."""
        if self._opt is None:
            t = self.cfg.train
            self._opt = ShardedAdamW(self.engine, t.lr, (t.beta1, t.beta2), t.eps,
                                     t.weight_decay, offload=self.cfg.parallel.offload_optimizer)
        return self._opt

    def _init_from(self, read_only: bool):
        """checkpoint.init_from's full values for build_model (None: the seeded init), unless
        this run resumes its own checkpoint or only evaluates."""
        c = self.cfg.checkpoint
        ckpt_dir = c.dir or os.path.join(self.cfg.run.dir, "checkpoints")
        if not c.init_from or read_only or (c.resume and checkpoint.latest(ckpt_dir)):
            return None
        from megalite.interop.init_from import initial_values

        try:
            return initial_values(c.init_from, self.args, resume.fingerprint(self),
                                  self.cfg.train.seed, verbose=self.dims.rank == 0)
        except ValueError as e:
            raise ResumeError(str(e)) from None

    def describe(self) -> str:
        t, a, p = self.cfg.train, self.args, self.cfg.parallel
        mem = self.memory()
        mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
        offload = ", optimizer offloaded" if p.offload_optimizer else ""
        return "\n".join([
            f"layout: {self.dims.describe()}",
            f"model: {a.family} {self.n_params / 1e6:.2f}M params, {a.num_layers} layers, "
            f"hidden {a.hidden_size}, heads {a.num_heads}/{a.num_kv_heads} kv, ffn "
            f"{a.ffn_hidden_size}, vocab {a.vocab_size}, precision {t.precision}",
            f"model states on this rank (ZeRO-{p.zero_stage}{offload}, "
            f"{self.rank_params / 1e6:.2f}M params here): "
            + ", ".join(f"{k} {mib(v)} MiB" for k, v in mem.items() if k != "total")
            + f"; total {mib(mem['total'])} MiB",
            f"batch: global {self.gbs} = micro {self.mbs} x grad_accum {self.ga} x dp "
            f"{self.dims.dp}; {self.gbs * self.cfg.data.seq_len:,} tokens/step",
            f"data: {len(self.train_ds):,} train samples, "
            f"{len(self.val_ds) if self.val_ds is not None else 0:,} validation samples of "
            f"{self.cfg.data.seq_len} tokens", self.activations.describe()])

    def memory(self) -> dict:
        """Model-state bytes on this rank by kind (AdamW moments counted before they exist)."""
        report = {**self.engine.memory(), **(self._opt.memory() if self._opt else {})}
        report["total"] = sum(report.values())
        return report

    def _warn(self, text: str) -> None:
        if self.dims.rank == 0:
            print(text, file=sys.stderr, flush=True)

    # ---- checkpoints: megalite/trainer/resume.py ------------------------------------------
    def maybe_resume(self) -> None:
        resume.maybe_resume(self)

    def load_weights(self, path: str) -> None:
        resume.load_weights(self, path)

    def save_checkpoint(self) -> str:
        return resume.save_checkpoint(self)

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        from megalite.trainer.inference import sample_text

        text = sample_text(inference_view(self.model, self.dims), self.tokenizer, prompt,
                           max_new_tokens, seed=seed)
        self.model.train()
        return text

    # ---- one step ---------------------------------------------------------------------------
    def micro_batches(self, step: int, data=None) -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches of global batch ``step``, one batch dict each."""
        out = []
        start = step * self.gbs + self.sample_shift if data is None else None
        for micro in range(self.ga):
            out.append(objective.batch(self.cfg, self.train_ds if data is None else data, step,
                                       micro, self.dims.dp_rank, self.mbs, self.ga,
                                       self.dims.dp, start, self.dims.device))
        return out

    def train_step(self) -> dict:
        start = time.perf_counter()
        self._seed_dropout()
        scale = 1.0 if self.scaler is None else self.scaler.scale
        loss = self.executor.run(self.actions, self.micro_batches(self.step), scale)
        with self.timers.phase("comm"):  # what backward left unfinished
            self.engine.finalize_grads()
        with self.timers.phase("optimizer"):
            grad_norm = self.opt.clip_grad_norm(self.cfg.train.grad_clip, scale)
        summary = self._summary(loss, grad_norm)  # loss, stop flag, norm: one all-reduce
        # fp16 needs the norm on the host before the update (a non-finite one, the same on
        # every rank, skips the step); otherwise the one host sync comes after the update
        values = summary.tolist() if self.scaler is not None else None
        skipped = values is not None and not math.isfinite(values[2])
        lr = self.lr()
        if self.scaler is not None:
            self.scaler.update(skipped)
        with self.timers.phase("optimizer"):
            self.engine.skip_step() if skipped else self.opt.step(lr)
        loss_value, stop, norm = values if values is not None else summary.tolist()
        self.step += 1
        return self._record(start, loss_value, lr, float("nan") if skipped else norm,
                            stop > 0, scale, skipped)

    def _seed_dropout(self) -> None:
        seed = step_seed(self.cfg.train.seed, self.step, self.dims)
        torch.manual_seed(seed)  # the same on the TP ranks of a replica
        if self.split_rng is not None:
            self.split_rng.reseed(seed + 1 + self.dims.tp_rank)

    def lr(self) -> float:
        """This step's learning rate; fp16 steps skipped on overflow do not advance the
        schedule (DeepSpeed, Megatron)."""
        t = self.cfg.train
        updates = self.step - (self.scaler.skipped if self.scaler is not None else 0)
        return train_lr(t, updates)

    def _summary(self, loss: StepLoss, grad_norm: torch.Tensor) -> torch.Tensor:
        """[mean token loss, stop flag, grad norm]: one small all-reduce over every rank."""
        stop = torch.full((), float(self._stop_signal is not None), device=self.dims.device)
        stats = torch.stack([loss.total * self.dims.reports_loss, stop])
        with self.timers.phase("comm"):
            comm.all_reduce(stats, self.dims.world_group, self.dims.meter)
        mean = stats[0] / loss.tokens.clamp(min=1)
        return torch.stack([mean, stats[1], grad_norm.reshape(()).float()])

    def _record(self, start: float, loss: float, lr: float, grad_norm: float, stop: bool,
                scale: float, skipped: bool) -> dict:
        elapsed = time.perf_counter() - start
        tokens = self.gbs * self.cfg.data.seq_len
        tflops = self.flops_per_token * tokens / elapsed / 1e12 / self.dims.world_size
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / elapsed, "tflops": tflops, "step_time": elapsed,
                  **{f"time.{k}": v for k, v in self.timers.take().items()},
                  **{f"comm_bytes.{k}": v for k, v in self.dims.meter.take(wire=True).items()},
                  **{f"mem.{k}": v for k, v in self.memory().items()}, **self.engine.metrics()}
        if self.peak is not None:  # no MFU without a known peak (a CPU, an unlisted GPU)
            record["mfu"] = tflops / self.peak
        if self.scaler is not None:
            record.update(loss_scale=scale, skipped=skipped)
        if not math.isfinite(loss):
            self.wait_for_save()
            raise TrainingDiverged(f"loss is {loss} at step {self.step}; stopping. The last "
                                   f"checkpoint ({self._latest_or_none()}) is kept.")
        record["stop"] = stop
        return record

    def _latest_or_none(self) -> Optional[str]:
        try:
            return checkpoint.latest(self.ckpt_dir)
        except checkpoint.CheckpointError:
            return None

    def peak_tflops(self) -> Optional[float]:
        """Peak dense TFLOP/s of this rank's device for the MFU figure: train.peak_tflops, else
        megalite.hardware's table (None: unknown, no MFU)."""
        if self.cfg.train.peak_tflops > 0:
            return self.cfg.train.peak_tflops
        return device_peak_tflops(self.dims.device, self.cfg.train.precision)

    # ---- evaluation, checkpoints ------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean validation loss per token, or None when the split leaves no validation
        documents. Global batches split like training, through the same executor
        (forward-only actions): layout-independent."""
        if self.val_ds is None:
            return None
        self.model.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.dims.device)
        tokens = torch.zeros_like(total)
        for it in range(self.cfg.train.eval_iters):
            loss = self.executor.run(self.eval_actions, self.micro_batches(it, self.val_ds))
            total += loss.total
            tokens += loss.tokens
        self.model.train()
        total *= self.dims.reports_loss
        comm.all_reduce(total, self.dims.world_group, self.dims.meter)
        return (total / tokens.clamp(min=1)).item()

    def wait_for_save(self) -> None:
        """The in-flight asynchronous save is complete (its error raised here)."""
        if self.saver is not None:
            self.saver.wait()

    # ---- the loop ---------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self._stop_signal = signum

    def fit(self) -> TrainResult:
        """Train to train.steps (resuming from the run's latest checkpoint). SIGTERM, SIGUSR1
        and SIGINT (Ctrl-C; a second one aborts) save a checkpoint after the current step and
        return ``preempted``. metrics.jsonl rows past the resumed step are dropped (the
        resumed run writes them again); validation losses go into their step's row."""
        cfg = self.cfg
        assert not self.read_only, "a read-only Trainer (eval) cannot train"
        self.maybe_resume()
        dropped = self.log.keep_until(self.step)
        if dropped:
            self.log.print(f"metrics.jsonl: dropped {dropped} rows past step {self.step}")
        result = TrainResult()
        if self.step == cfg.train.steps:
            self.log.print(f"already trained to train.steps={self.step}: nothing to train")
            result.checkpoint = self._latest_or_none()  # not saved again
        self.log.print(self.describe())
        signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        previous = {s: signal.signal(s, self._on_signal) for s in signals}
        evaluated = False
        try:
            while self.step < cfg.train.steps:
                # the run's first step is measured: peak memory, micro-batch 0's activations
                record = self.memory_check.step(self.train_step, not result.losses,
                                                self.log.print)
                result.losses.append(record["loss"])
                last = self.step == cfg.train.steps and not record["stop"]
                if last or (cfg.train.eval_interval and
                            self.step % cfg.train.eval_interval == 0):
                    val_loss = self.evaluate()
                    if val_loss is not None:  # None: the split left no validation documents
                        record["val_loss"] = val_loss
                    if last:
                        result.val_loss, evaluated = val_loss, True
                self.log.log(record)
                if record["stop"]:
                    result.checkpoint = self.save_checkpoint()
                    self.wait_for_save()
                    result.preempted = True
                    self.log.print(f"signal received: saved {result.checkpoint} at step "
                                   f"{self.step}; exiting")
                    break
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    result.checkpoint = self.save_checkpoint()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if not result.preempted:
            if not evaluated:  # nothing trained here (already at train.steps)
                result.val_loss = self.evaluate()
            if result.val_loss is not None:
                self.log.print(f"validation loss {result.val_loss:.4f} "
                               f"(perplexity {math.exp(min(result.val_loss, 50)):.2f})")
            if result.checkpoint is None or not result.checkpoint.endswith(f"{self.step:08d}"):
                result.checkpoint = self.save_checkpoint()
            self.wait_for_save()
            self.log.print(f"checkpoint: {result.checkpoint}")
        if self.saver is not None:  # saved and waited for: its writer thread ends with fit
            self.saver.close()
        result.step = self.step
        self.log.close()
        return result
