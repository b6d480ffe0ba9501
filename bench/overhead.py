"""megalite's single-process training step against the same model and AdamW in a plain PyTorch
loop (forward, loss, backward, clip, step, loss.item()).

Both sides train the same architecture from the same weights on the same batches; they run in
interleaved blocks so machine noise hits both alike. The ratio follows ``bench/_ratios.py``:
median of >= 5 per-block ratios of >= 20 steps, run twice, each run's spread reported, a run
whose spread exceeds +-10% repeated and not scored. Target: ratio <= 1.03.

    python bench/overhead.py [--config configs/demo.yaml] [--blocks 5] [--steps 20]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import statistics

import torch

from _ratios import interleaved_ratio


def plain_loop(model, batches, lr, betas, eps, wd, clip):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    # the fused kernel, as megalite's ShardedAdamW runs it
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas,
                            eps=eps, fused=True)
    ga = len(batches[0])

    def step(i):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in batches[i % len(batches)]:
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / ga).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return (total / ga).item()

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--blocks", type=int, default=5, help="interleaved blocks (>= 5)")
    ap.add_argument("--steps", type=int, default=20, help="steps per block (>= 20)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("overrides", nargs="*", help="--section.field=value config overrides")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from megalite.config import parse_args
    from megalite.models import build_model
    from megalite.parallel.dims import ParallelDims
    from megalite.trainer.loop import Trainer

    tmp = tempfile.mkdtemp()
    total_steps = 2 * 3 * max(a.blocks, 5) * max(a.steps, 20) + 2  # 2 runs x up to 3 attempts
    cfg, _ = parse_args(["--config", a.config, "--parallel.dp=1", f"--run.dir={tmp}",
                         f"--train.steps={total_steps}", "--run.tensorboard=false",
                         "--train.warmup_steps=0", "--train.lr_schedule=constant",
                         "--train.eval_interval=0", *a.overrides], verbose=False)
    trainer = Trainer(cfg, ParallelDims.single())
    t = cfg.train
    model = build_model(trainer.args, t.seed)
    batches = []
    for s in range(8):
        trainer.step = s
        batches.append([_batch(trainer, m) for m in range(trainer.ga)])
    trainer.step = 0
    plain = plain_loop(model, batches, t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay,
                       t.grad_clip)

    counter = iter(range(10**9))
    ours_fn, plain_fn = trainer.train_step, lambda: plain(next(counter))
    ours_fn(), plain_fn()  # warm-up
    tokens = trainer.gbs * cfg.data.seq_len
    print(f"model: {trainer.n_params / 1e6:.2f}M params, batch {trainer.gbs}x{cfg.data.seq_len} "
          f"tokens, {a.threads} thread(s), {max(a.blocks, 5)} interleaved blocks of "
          f">= {max(a.steps, 20)} steps, two runs")
    for run in (1, 2):
        result = interleaved_ratio(ours_fn, plain_fn, a.blocks, a.steps)
        print(f"run {run}: megalite Trainer / plain PyTorch loop {result.line()}; "
              f"{tokens / statistics.median(result.ours_s):,.0f} tok/s (target <= 1.03)")
    return 0


def _batch(trainer, micro):
    from megalite.data import micro_batch

    return micro_batch(trainer.train_ds, trainer.step, micro, 0, trainer.mbs, trainer.ga, 1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
