"""Failure handling of a real local job (4 ranks, dp=2 x tp=2): a rank SIGKILLed mid-training
ends the job quickly, non-zero, naming the rank and its log tail, with no process left; with
--max_restarts 1 the job restarts, resumes from its checkpoint and ends with the same loss as an
uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from launcher_helpers import (clean_env, losses, rank_pid, train_args, wait_for_step, wait_gone)

pytestmark = pytest.mark.slow
LAUNCH = [sys.executable, "-m", "megalite.launcher", "--num_gpus", "4"]


def _start(args, tag, log):
    return subprocess.Popen(args, env=clean_env(MEGALITE_TEST_TAG=tag), stdout=log,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    r = subprocess.run([*LAUNCH, "-m", "megalite.train",
                        *train_args(run_dir, data_cache, 8, "--checkpoint.interval=2")],
                       env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return losses(run_dir)


def test_sigkill_of_one_rank_stops_the_job_fast(tmp_path, data_cache):
    tag, run_dir = uuid.uuid4().hex, str(tmp_path / "run")
    with open(tmp_path / "out.txt", "w+") as log:
        proc = _start([*LAUNCH, "--log_dir", str(tmp_path / "logs"), "-m", "megalite.train",
                       *train_args(run_dir, data_cache, 100000)], tag, log)
        try:
            wait_for_step(run_dir, 2, proc)
            victim = rank_pid(tag, 2)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.time()
            code = proc.wait(timeout=30)
            elapsed = time.time() - killed_at
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        out = log.read()
    print(f"failure detected and job stopped in {elapsed:.2f} s")
    assert code != 0
    assert elapsed < 10, f"the job took {elapsed:.1f} s to stop"
    assert f"rank 2 (local rank 2, pid {victim}) was killed by SIGKILL" in out, out[-3000:]
    assert "last " in out and str(tmp_path / "logs" / "rank_2.log") in out
    assert sorted(os.listdir(tmp_path / "logs")) == [f"rank_{r}.log" for r in range(4)]
    assert wait_gone(tag, 5) == {}, "processes of the job outlived it"


def test_max_restarts_resumes_to_the_same_loss(tmp_path, data_cache, uninterrupted):
    tag, run_dir = uuid.uuid4().hex, str(tmp_path / "run")
    with open(tmp_path / "out.txt", "w+") as log:
        proc = _start([*LAUNCH[:2], "megalite.launcher", "--max_restarts", "1", *LAUNCH[3:],
                       "-m", "megalite.train",
                       *train_args(run_dir, data_cache, 8, "--checkpoint.interval=2")], tag, log)
        try:
            wait_for_step(run_dir, 3, proc)  # the step-2 checkpoint exists
            os.kill(rank_pid(tag, 1), signal.SIGKILL)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        out = log.read()
    assert code == 0, out[-3000:]
    assert "restart 1 of 1" in out and "resumed from" in out, out[-3000:]
    got = losses(run_dir)
    assert max(got) == 8 == max(uninterrupted)
    assert got[8] == pytest.approx(uninterrupted[8], abs=1e-6), (got, uninterrupted)
    assert wait_gone(tag, 5) == {}


RANK_PROGRAM = """
import os, signal, sys, time
out = sys.argv[1]
def on_term(signum, frame):
    open(os.path.join(out, "term_" + os.environ["RANK"]), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(os.path.join(out, "up_" + os.environ["RANK"]), "w").close()
time.sleep(120)
"""


def _start_sleepers(tmp_path, tag):
    proc = subprocess.Popen([sys.executable, "-m", "megalite.launcher", "--num_gpus", "2",
                             "--no_python", sys.executable, "-c", RANK_PROGRAM, str(tmp_path)],
                            env=clean_env(MEGALITE_TEST_TAG=tag), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while len([f for f in os.listdir(tmp_path) if f.startswith("up_")]) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


def test_sigterm_reaches_every_rank(tmp_path):
    tag = uuid.uuid4().hex
    proc = _start_sleepers(tmp_path, tag)
    proc.send_signal(signal.SIGTERM)
    # every rank handled it (and exited 0); the launcher still says it was stopped: 128 + 15
    assert proc.wait(timeout=10) == 143
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("term_")) == \
        ["term_0", "term_1"]
    assert wait_gone(tag, 5) == {}


def test_ranks_die_with_a_sigkilled_launcher(tmp_path):
    tag = uuid.uuid4().hex
    proc = _start_sleepers(tmp_path, tag)
    proc.kill()
    proc.wait()
    assert wait_gone(tag, 5) == {}, "ranks outlived their launcher"
