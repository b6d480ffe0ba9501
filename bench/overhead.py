"""megalite's single-process training step against the same model and AdamW in a plain PyTorch
loop (forward, loss, backward, clip, step, loss.item()).

Both sides train the same architecture from the same weights on the same batches; they run in
interleaved blocks so machine noise hits both alike, and the median step time of each is
compared. Target: ratio <= 1.03.

    python bench/overhead.py [--config configs/demo.yaml] [--blocks 7] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


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
    ap.add_argument("--blocks", type=int, default=7, help="interleaved blocks per side")
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("overrides", nargs="*", help="--section.field=value config overrides")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from megalite.config import parse_args
    from megalite.models import build_model
    from megalite.parallel.dims import ParallelDims
    from megalite.trainer.loop import Trainer

    tmp = tempfile.mkdtemp()
    total_steps = a.blocks * a.steps + 2
    cfg, _ = parse_args(["--config", a.config, "--parallel.dp=1", f"--run.dir={tmp}",
                         f"--train.steps={total_steps * 10}", "--run.tensorboard=false",
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

    def time_block(fn):
        start = time.perf_counter()
        for _ in range(a.steps):
            fn()
        return (time.perf_counter() - start) / a.steps

    counter = iter(range(10**9))
    ours_fn, plain_fn = trainer.train_step, lambda: plain(next(counter))
    ours_fn(), plain_fn()  # warm-up
    ours, base = [], []
    for _ in range(a.blocks):
        ours.append(time_block(ours_fn))
        base.append(time_block(plain_fn))
    mo, mb = statistics.median(ours), statistics.median(base)
    tokens = trainer.gbs * cfg.data.seq_len
    print(f"model: {trainer.n_params / 1e6:.2f}M params, batch {trainer.gbs}x{cfg.data.seq_len} "
          f"tokens, {a.threads} thread(s), {a.blocks} interleaved blocks of {a.steps} steps")
    print(f"plain PyTorch loop : median {mb * 1e3:8.2f} ms/step  {tokens / mb:10,.0f} tok/s")
    print(f"megalite Trainer   : median {mo * 1e3:8.2f} ms/step  {tokens / mo:10,.0f} tok/s")
    print(f"ratio megalite / plain = {mo / mb:.3f} (target <= 1.03)")
    return 0


def _batch(trainer, micro):
    from megalite.data import micro_batch

    return micro_batch(trainer.train_ds, trainer.step, micro, 0, trainer.mbs, trainer.ga, 1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
