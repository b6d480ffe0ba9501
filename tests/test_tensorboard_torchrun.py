"""Real components: TensorBoard event files read back by tensorboard itself, and a run started
by torchrun (the launcher torch ships) instead of megalite's own."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, tiny_config, train


def test_tensorboard_events_hold_the_metrics(tmp_path, data_cache):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (in [dev])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(str(tmp_path), data_cache, "--train.steps=3", "--run.tensorboard=true",
                      "--train.eval_iters=1")
    _, result = train(cfg, distributed=False)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert losses == pytest.approx(result.losses, rel=1e-6)
    assert "lr" in acc.Tags()["scalars"] and "time/forward" in acc.Tags()["scalars"]


def test_torchrun_launch(tmp_path, data_cache):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", "-m", "megalite.train", "--config",
           os.path.join(REPO, "configs", "tiny.yaml"), "--parallel.dp=2",
           "--train.micro_batch_size=2", "--train.steps=3", "--train.eval_iters=1",
           f"--run.dir={tmp_path}", f"--data.cache_dir={data_cache}", "--run.tensorboard=false",
           "--run.sample_tokens=0", "--parallel.backend=gloo", "--local_rank=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2 = dp 2" in r.stdout
    records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in records] == [1, 2, 3]
