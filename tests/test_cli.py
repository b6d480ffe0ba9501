"""The command line as a user meets it: help, config errors (exit 2), a bare multi-rank run that
spawns its own ranks, then eval and generate on its checkpoint."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO, tiny_config
from megalite.cli import main

TINY = os.path.join(REPO, "configs", "tiny.yaml")


def _run(*args, env=None, timeout=180):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if env is None or key not in env:
            full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("command", ["train", "eval", "generate", "prepare-data"])
def test_help(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as e:  # argparse-based commands exit after printing help
        code = e.code
    assert code == 0
    out = capsys.readouterr().out
    assert f"megalite {command}" in out
    if command in ("train", "eval"):
        assert "--train.micro_batch_size" in out and "Peak learning rate" in out


def test_config_error_exits_2_before_anything_starts():
    r = _run("megalite.train", "--config", TINY, "--train.lr=-1")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "train.lr" in lines[0] and "-1" in lines[0], r.stderr


def test_world_size_mismatch_exits_2():
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}
    r = _run("megalite.train", "--config", TINY, "--parallel.dp=2", env=env)
    assert r.returncode == 2
    assert "world size 3 != dp*pp*tp = 2*1*1 = 2" in r.stderr, r.stderr


def test_bare_run_spawns_ranks_then_eval_and_generate(tmp_path, data_cache):
    run_dir = str(tmp_path / "run")
    common = ["--config", TINY, f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}",
              "--parallel.dp=2", "--train.micro_batch_size=2", "--train.steps=6",
              "--train.eval_iters=2", "--run.tensorboard=false"]
    r = _run("megalite.cli", "train", *common, "--run.sample_tokens=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2 = dp 2" in r.stdout and "sample:" in r.stdout and "validation loss" in r.stdout
    records = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [x["step"] for x in records] == list(range(1, 7))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "time.forward",
                "time.backward", "time.optimizer", "time.comm", "comm_bytes.all_reduce"):
        assert key in records[-1], key
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "latest"))

    r = _run("megalite.cli", "eval", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "perplexity" in r.stdout
    r = _run("megalite.cli", "generate", "--checkpoint", run_dir, "--prompt", "the ",
             "--max_new_tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("the ")


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, data_cache):
    from megalite.parallel.dims import ParallelDims
    from megalite.trainer import checkpoint
    from megalite.trainer.loop import Trainer, TrainingDiverged

    class Diverging(Trainer):
        def _summary(self, loss, grad_norm):
            summary = super()._summary(loss, grad_norm)
            return summary * math.nan if self.step == 4 else summary

    cfg = tiny_config(str(tmp_path), data_cache, "--train.steps=8", "--checkpoint.interval=2")
    trainer = Diverging(cfg, ParallelDims.single())
    with pytest.raises(TrainingDiverged, match="at step 5"):
        trainer.fit()
    assert checkpoint.latest(trainer.ckpt_dir).endswith("step_00000004")
