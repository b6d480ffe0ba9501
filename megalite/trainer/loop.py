"""The step loop: data -> schedule (forward/backward per micro-batch) -> grad sync -> clip ->
AdamW; with metrics, evaluation, checkpoints and preemption handling around it."""
from __future__ import annotations

import functools
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from megalite.config import save_yaml
from megalite.config.schema import Config
from megalite.data import build_datasets, ensure_dataset, micro_batch
from megalite.models import (CausalLM, build_model, flops_per_token, num_params,
                             resolve_model_args)
from megalite.parallel import comm
from megalite.parallel.dims import ParallelDims
from megalite.pipeline import schedules
from megalite.pipeline.executor import PipelineExecutor
from megalite.pipeline.stage import mark_tied_copy, sync_tied_grads
from megalite.plan import model_plan
from megalite.pipeline.inference import inference_view
from megalite.tensor_parallel.plan import loss_fn
from megalite.tensor_parallel.random import SplitRegionRNG, cover_split_regions
from megalite.trainer import checkpoint
from megalite.trainer.metrics import MetricsLogger, Timers
from megalite.trainer.schedule import accumulate
from megalite.zero import LossScaler, ShardedAdamW, ZeroEngine
from megalite.zero.optimizer import lr_at

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    def __init__(self, cfg: Config, dims: ParallelDims):
        self.cfg, self.dims = cfg, dims
        t = cfg.train
        self.mbs, self.ga, self.gbs = t.micro_batch_size, t.grad_accum, t.global_batch_size
        if dims.rank == 0:
            ensure_dataset(cfg.data)  # prepares it (once, on one rank) when not cached yet
        comm.barrier()
        self.prefixes = ensure_dataset(cfg.data)  # cached now: only returns the paths
        num_val = t.eval_iters * self.gbs
        self.train_ds, self.val_ds, self.tokenizer = build_datasets(
            cfg.data, t.seed, t.steps * self.gbs, num_val)
        self.tokenizer_file = self.prefixes[0] + ".tokenizer.json"
        self.args = resolve_model_args(cfg.model, self.tokenizer.vocab_size)
        p = cfg.parallel
        tied = self.args.tie_embeddings and dims.pp > 1  # tied copies: alone in their group
        self.engine = ZeroEngine(p.zero_stage, dims, DTYPES[t.precision], DTYPES[t.grad_dtype],
                                 p.bucket_mb, p.zero2_accumulate, p.zero3_reshard_after_forward,
                                 solo=("embed.tok.weight", "head.output.weight") if tied else ())
        self.model = build_model(self.args, t.seed, dims.device, DTYPES[t.precision],
                                 plan=model_plan(dims, p), materialize=self.engine.materialize)
        self.loss_fn = loss_fn(self.args, dims, p.vocab_multiple)
        self.executor = None  # pipeline parallelism: runs the schedule's actions
        if dims.pp > 1:
            seq = cfg.data.seq_len // (dims.tp if p.sequence_parallel else 1)
            self.executor = PipelineExecutor(self.model, dims, self.loss_fn,
                                             (self.mbs, seq, self.args.hidden_size),
                                             DTYPES[t.precision])
            self.actions = schedules.build(p.schedule, dims.pp, self.ga, dims.pp_rank,
                                           p.virtual_stages)
            self._last_grad_action = max(i for i, a in enumerate(self.actions)
                                         if a.kind == ("W" if p.schedule == "zb-h1" else "B"))
            mark_tied_copy(self.model, self.args.tie_embeddings, dims.pp)
        self.split_rng = None  # per-TP-rank dropout stream where activations are split
        if dims.tp > 1 and self.args.dropout > 0:
            self.split_rng = SplitRegionRNG(dims.device)
            cover_split_regions(self.model, self.split_rng, p.sequence_parallel)
        params = list(self.model.parameters())
        self.engine.attach(self.model)
        self.opt = ShardedAdamW(self.engine, t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay,
                                offload=p.offload_optimizer)
        self.scaler = None  # fp16 only
        if t.precision == "fp16":
            self.scaler = LossScaler(t.loss_scale or t.initial_loss_scale, t.loss_scale_window,
                                     t.loss_scale_hysteresis, t.min_loss_scale,
                                     static=t.loss_scale > 0)
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")
        self.step = 0
        self.log = MetricsLogger(cfg.run.dir, t.steps, dims.rank == 0, cfg.run.tensorboard,
                                 cfg.run.log_interval)
        if dims.rank == 0:
            save_yaml(cfg, os.path.join(cfg.run.dir, "config.yaml"))
        self.timers = Timers()
        with torch.device("meta"):  # the whole model's size, whatever this rank holds of it
            self.n_params = num_params(CausalLM(self.args))
        self.rank_params = sum(p.numel() for p in params)  # before ZeRO-3 sharding
        self.flops_per_token = flops_per_token(self.args, cfg.data.seq_len, self.n_params)
        self._stop_signal: Optional[int] = None

    # ---- start-up ---------------------------------------------------------------------------
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
            f"{self.cfg.data.seq_len} tokens"])

    def memory(self) -> dict:
        """Model-state bytes on this rank by kind (AdamW moments counted before they exist)."""
        return self.engine.memory_report(self.opt)

    def maybe_resume(self) -> None:
        path = checkpoint.latest(self.ckpt_dir) if self.cfg.checkpoint.resume else None
        if path is None:
            return
        shard = checkpoint.load_shard(path, self.dims)
        saved = checkpoint.read_meta(path).get("zero")
        if saved != self.engine.layout():
            raise ValueError(
                f"checkpoint {path} holds optimizer state sharded as {saved}; this run shards it "
                f"as {self.engine.layout()}: resume with the same parallel.dp (with ZeRO >= 1), "
                f"parallel.bucket_mb and train.grad_dtype")
        state = shard if self.engine.shards == 1 else checkpoint.load_dp_shard(path, self.dims)
        self.opt.load(shard["model"], state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = shard["step"]
        self.log.print(f"resumed from {path} at step {self.step}")

    def load_weights(self, path: str) -> None:
        """Model weights only (for eval): the master values, cast to the parameter dtype."""
        self.opt.load(checkpoint.load_shard(path, self.dims)["model"], None)

    def sample(self, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        from megalite.trainer.inference import sample_text

        text = sample_text(inference_view(self.model, self.dims), self.tokenizer, prompt,
                           max_new_tokens, seed=seed)
        self.model.train()
        return text

    # ---- one step ---------------------------------------------------------------------------
    def forward_backward(self, micro: int) -> torch.Tensor:
        x, y = self.batch(micro)
        self.timers.start("forward")
        loss = self.loss_fn(self.model(x), y)
        self.timers.stop("forward")
        self.timers.start("backward")
        scaled = loss if self.scaler is None else loss * self.scaler.scale
        (scaled / self.ga).backward()
        self.timers.stop("backward")
        return loss.detach()

    def batch(self, micro: int, step: Optional[int] = None, data=None):
        x, y = micro_batch(self.train_ds if data is None else data,
                           self.step if step is None else step, micro, self.dims.dp_rank,
                           self.mbs, self.ga, self.dims.dp)
        return x.to(self.dims.device), y.to(self.dims.device)

    def run_schedule(self) -> List[torch.Tensor]:
        """One step's forwards and backwards: gradient accumulation, or a pipeline schedule."""
        if self.executor is None:
            return accumulate(self.forward_backward, self.ga, self.engine.sync_next_backward)
        v = len(self.model.chunks)

        def before(index: int, action) -> None:
            # one chunk per rank: reduce gradients during its last gradient pass (overlap);
            # with several chunks they finish at different times: reduce after the schedule
            if v == 1 and index == self._last_grad_action:
                self.engine.sync_next_backward(True)

        self.executor.loss_scale = 1.0 if self.scaler is None else self.scaler.scale
        self.timers.start("pipeline")
        losses = self.executor.run(self.actions, self.ga, self.batch, before)
        self.timers.stop("pipeline")
        return losses

    def train_step(self) -> dict:
        t = self.cfg.train
        start = time.perf_counter()
        seed = step_seed(t.seed, self.step, self.dims)
        torch.manual_seed(seed)  # the same on the TP ranks of a replica
        if self.split_rng is not None:
            self.split_rng.reseed(seed + 1 + self.dims.tp_rank)
        self.engine.zero_grad()
        scale = 1.0 if self.scaler is None else self.scaler.scale
        losses = self.run_schedule()
        self.timers.start("comm")
        self.engine.finish()
        self.engine.reduce_partial(self.dims.tp_group)
        if self.executor is not None:
            sync_tied_grads(self.model, self.args.tie_embeddings, self.dims.pp,
                            self.dims.embed_group, self.dims.meter, self.engine.grad_of)
        self.timers.stop("comm")
        self.timers.start("optimizer")
        # the norm sums each rank's owned gradients: over dp too once ZeRO shards them
        norm_group = self.dims.world_group if self.engine.shards > 1 else self.dims.mp_group
        grad_norm = self.opt.clip_grad_norm(t.grad_clip, norm_group, self.dims.tp_rank,
                                            self.dims.meter, scale)
        # fp16: steps skipped on overflow do not advance the schedule (DeepSpeed, Megatron)
        updates = self.step - (self.scaler.skipped if self.scaler is not None else 0)
        lr = lr_at(updates, t.steps, t.lr, t.min_lr, t.warmup_steps, t.lr_schedule,
                   t.decay_fraction)
        self.timers.stop("optimizer")
        # One small all-reduce per step: the mean loss and whether any rank was told to stop.
        stop_flag = torch.full((), float(self._stop_signal is not None), device=self.dims.device)
        mean = torch.stack(losses).mean().float() if losses else torch.zeros_like(stop_flag)
        stats = torch.stack([mean * self.dims.reports_loss, stop_flag])
        self.timers.start("comm")
        comm.all_reduce(stats, self.dims.world_group, self.dims.meter)
        self.timers.stop("comm")
        summary = torch.cat([stats, grad_norm.reshape(1).float()])
        # the step's one host sync: loss, stop flag and gradient norm together; fp16 needs the
        # norm before the update (a non-finite one, the same on every rank, skips the step)
        values, skipped = None, False
        if self.scaler is not None:
            values = summary.tolist()
            skipped = not math.isfinite(values[2])
            self.scaler.update(skipped)
        self.timers.start("optimizer")
        if skipped:
            self.engine.release()
        else:
            self.opt.step(lr)
        self.timers.stop("optimizer")
        loss_sum, stop, grad_norm = values if values is not None else summary.tolist()
        grad_norm = float("nan") if skipped else grad_norm
        loss = loss_sum / self.dims.dp
        self.step += 1
        elapsed = time.perf_counter() - start
        tokens = self.gbs * self.cfg.data.seq_len
        tflops = self.flops_per_token * tokens / elapsed / 1e12 / self.dims.world_size
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / elapsed, "tflops": tflops,
                  "mfu": tflops / self.peak_tflops(), "step_time": elapsed,
                  **{f"time.{k}": v for k, v in self.timers.take().items()},
                  **{f"comm_bytes.{k}": v for k, v in self.dims.meter.take(wire=True).items()},
                  **{f"mem.{k}": v for k, v in self.memory().items()}}
        if self.engine.stage == 3:
            record["mem.peak_gathered_params"] = self.engine.peak_param_bytes
        if self.engine.grad_mode == "shard":
            record["mem.peak_grad_buckets"] = self.engine.peak_temp_bytes
        if self.scaler is not None:
            record.update(loss_scale=scale, skipped=skipped)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss} at step {self.step}; stopping. The last "
                                   f"checkpoint ({checkpoint.latest(self.ckpt_dir)}) is kept.")
        record["stop"] = stop > 0
        return record

    def peak_tflops(self) -> float:
        if self.cfg.train.peak_tflops > 0:
            return self.cfg.train.peak_tflops
        return 312.0 if self.dims.device.type == "cuda" else 1.0

    # ---- evaluation, checkpoints ------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean validation loss, or None when the split leaves no validation documents."""
        if self.val_ds is None:
            return None
        self.model.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.dims.device)
        iters, dims = self.cfg.train.eval_iters, self.dims
        for it in range(iters):  # global batches, split like training: layout-independent
            batch = functools.partial(self.batch, step=it, data=self.val_ds)
            if self.executor is None:
                losses = [self.loss_fn(self.model(x), y) for x, y in map(batch, range(self.ga))]
            else:
                actions = schedules.forward_only(dims.pp, self.ga, dims.pp_rank,
                                                 len(self.model.chunks))
                losses = self.executor.run(actions, self.ga, batch)
            total += sum(loss.float() for loss in losses)
        self.model.train()
        total *= dims.reports_loss / (iters * self.ga * dims.dp)
        comm.all_reduce(total, dims.world_group, dims.meter)
        return total.item()

    def save_checkpoint(self) -> str:
        shard = {"model": self.engine.full_values(self.opt.masters), "step": self.step}
        state = {"optimizer": self.opt.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        if self.engine.shards == 1:
            shard.update(state)
        layout = self.model.shard_layout
        meta = {"config": asdict(self.cfg), "model_args": asdict(self.args),
                "tp_shard_dims": layout.shard_dim, "zero": self.engine.layout()}
        return checkpoint.save(self.ckpt_dir, self.step, self.dims, shard, meta,
                               self.tokenizer_file, self.cfg.checkpoint.keep,
                               dp_shard=state if self.engine.shards > 1 else None)

    # ---- the loop ---------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.maybe_resume()
        self.log.print(self.describe())
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        result = TrainResult()
        try:
            while self.step < cfg.train.steps:
                record = self.train_step()
                result.losses.append(record["loss"])
                if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                    record["val_loss"] = self.evaluate()
                self.log.log(record)
                if record["stop"]:
                    result.checkpoint = self.save_checkpoint()
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
            result.val_loss = self.evaluate()
            if result.val_loss is not None:
                self.log.print(f"validation loss {result.val_loss:.4f} "
                               f"(perplexity {math.exp(min(result.val_loss, 50)):.2f})")
            if result.checkpoint is None or not result.checkpoint.endswith(f"{self.step:08d}"):
                result.checkpoint = self.save_checkpoint()
            self.log.print(f"checkpoint: {result.checkpoint}")
        result.step = self.step
        self.log.close()
        return result
