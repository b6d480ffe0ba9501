"""The command line as a user meets it: help, config errors (exit 2), a bare multi-rank run that
spawns its own ranks, then eval and generate on its checkpoint."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, snapshot, tiny_config
from megalite.cli import main

TINY = os.path.join(REPO, "configs", "tiny.yaml")


def _run(*args, env=None, timeout=180):
    if args[0] == "megalite.train" or args[1:2] in (("train",), ("eval",)):
        args = (*args, "--parallel.backend=gloo")  # CPU even where a GPU is (auto: nccl)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if env is None or key not in env:
            full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("command", ["train", "eval", "generate", "prepare-data", "convert"])
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


def test_rank_process_exit_keeps_code_and_output():
    """A process that started torch.distributed ends through exit_process (os._exit, no
    interpreter finalisation): its exit code and its unflushed output must survive."""
    code = ("import megalite.parallel.dims as d; from megalite.cli import exit_process; "
            "d.STARTED_PROCESS_GROUP = True; print('out', end=''); "
            "print('err', end='', file=__import__('sys').stderr); exit_process(3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out", "err"), r


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
              "--train.eval_iters=2"]  # TensorBoard on: eval must not add an events file
    r = _run("megalite.cli", "train", *common, "--run.sample_tokens=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2 = dp 2" in r.stdout and "sample:" in r.stdout and "validation loss" in r.stdout
    records = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [x["step"] for x in records] == list(range(1, 7))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "time.forward",
                "time.backward", "time.optimizer", "time.comm", "comm_bytes.all_reduce"):
        assert key in records[-1], key
    assert "mfu" not in records[-1] and "mfu n/a" in r.stdout  # a CPU has no known peak
    assert "device cpu, backend gloo" in r.stdout  # the layout: line
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "latest"))
    assert records[-1]["val_loss"] > 0  # the end-of-run validation loss is in the last row
    assert "validation loss" in r.stdout and "val_loss" not in records[0]
    before = snapshot(run_dir)
    assert "config.yaml" in before and any(k.startswith("tensorboard") for k in before)

    # only train writes into a run directory: eval and generate leave it byte-identical
    r = _run("megalite.cli", "eval", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "perplexity" in r.stdout
    r = _run("megalite.cli", "generate", "--checkpoint", run_dir, "--prompt", "the ",
             "--max_new_tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("the ")
    after = snapshot(run_dir)
    assert sorted(after) == sorted(before)
    assert all(after[k] == before[k] for k in before), [k for k in before if after[k] != before[k]]


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


def _one_error_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_bad_layout_and_run_dir_one_line_before_ranks(tmp_path):
    """Each is one ``error:`` line from the parent, exit 2, before any rank starts (no rank
    prefix, no traceback, nothing left behind)."""
    run = str(tmp_path / "run")
    # tp=3 misses heads and ffn: once, naming both and the degrees that fit
    _one_error_line(_run("megalite.cli", "train", "--config", TINY, "--parallel.tp=3",
                         f"--run.dir={run}"), "parallel.tp=3", "model.num_heads=4",
                    "model.ffn_hidden_size=256", "valid: 1, 2, 4")
    assert not os.path.exists(run)
    # a file where the run directory (or one of its parents) should be
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for where in (blocker, blocker / "run"):
        _one_error_line(_run("megalite.cli", "train", "--config", TINY, f"--run.dir={where}",
                             "--parallel.dp=2"), f"run.dir={where}", "a file is in the way")
    _one_error_line(_run("megalite.cli", "train", "--config", TINY, f"--run.dir={run}",
                         f"--checkpoint.dir={blocker}"), f"checkpoint.dir={blocker}")
    # under a launcher, dp=auto takes world / (tp x pp): 3 ranks cannot hold tp=2
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}
    _one_error_line(_run("megalite.train", "--config", TINY, "--parallel.tp=2",
                         f"--run.dir={run}", env=env),
                    "parallel.dp=auto", "started 3 ranks", "tp*pp = 2*1 = 2")
    # the node's other ranks exit 2 too, silently: one copy of the line per node
    env.update(RANK="1", LOCAL_RANK="1")
    r = _run("megalite.train", "--config", TINY, "--parallel.tp=2", f"--run.dir={run}", env=env)
    assert (r.returncode, r.stderr, r.stdout) == (2, "", "")


def test_resume_drops_metrics_rows_past_checkpoint(tmp_path, data_cache):
    """A run resumed from an earlier checkpoint (here: `latest` rewound from step 6 to 4, as
    after a crash between saves) rewrites steps 5-6: metrics.jsonl keeps one row per step, the
    resumed losses equal the first run's, and the final validation loss is in the last row.
    A later command whose train.steps is below the run's checkpoint is refused before any rank
    starts (another layout resumes: tests/test_checkpoint_reshard.py)."""
    from megalite.parallel.dims import ParallelDims
    from megalite.trainer.loop import Trainer

    run_dir = str(tmp_path / "run")
    cfg = tiny_config(run_dir, data_cache, "--train.steps=6", "--checkpoint.interval=2",
                      "--checkpoint.keep=0", "--train.eval_iters=2", "--train.eval_interval=3",
                      "--run.tensorboard=true")
    first = Trainer(cfg, ParallelDims.single()).fit()
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ckpt_dir, "latest"), "w") as f:
        f.write("step_00000004")
    resumed = Trainer(cfg, ParallelDims.single()).fit()
    assert resumed.losses == first.losses[4:] and resumed.val_loss == first.val_loss
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in rows] == first.losses
    assert [row["step"] for row in rows if "val_loss" in row] == [3, 6]  # interval 3, and end
    assert rows[-1]["val_loss"] == first.val_loss
    # TensorBoard purges the first run's events past step 4 in the same way
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert [e.step for e in acc.Scalars("val_loss")] == [3, 6]

    r = _run("megalite.cli", "train", "--config", TINY, f"--run.dir={run_dir}",
             f"--data.cache_dir={data_cache}", "--train.steps=3")
    _one_error_line(r, "checkpoint.resume", "step 6", "train.steps=3", "--run.dir")


@pytest.mark.world
def test_ctrl_c_saves_checkpoint_without_traceback(tmp_path, data_cache):
    """Ctrl-C in a terminal signals the foreground process group: the bare run's parent, which
    forwards SIGINT to its 2 ranks. They finish the step, save a checkpoint there and exit;
    nobody prints a traceback; the parent exits 130 (128 + SIGINT)."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "megalite.cli", "train", "--config", TINY, "--parallel.dp=2",
         "--train.micro_batch_size=2", "--train.steps=100000", "--train.warmup_steps=0",
         f"--run.dir={run_dir}", f"--data.cache_dir={data_cache}", "--run.tensorboard=false",
         "--run.sample_tokens=0", "--parallel.backend=gloo"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own "terminal" group
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and (
                not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err[-3000:]
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 2 <= step < 100000
    assert f"signal received: saved {run_dir}/checkpoints/step_{step:08d}" in out, out[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
