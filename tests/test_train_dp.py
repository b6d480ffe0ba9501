"""Data parallelism equals single-process training; exact resume after preemption.

Same seed, same data (indexed by global sample), dropout 0: a dp-rank world with micro-batch 2
and grad_accum 8/(2*dp) sees exactly the single process's global batch of 8 samples per step.
"""
from __future__ import annotations

import os
import signal

import pytest

from distributed import run_distributed
from helpers import max_abs_diff, tiny_config, train

STEPS, GLOBAL, MICRO = 10, 8, 2
# fp32: the runs differ only in the order gradients are summed (micro-batches vs all-reduce), a
# relative 1e-7 effect per step; over 10 Adam steps losses stay within 1e-5.
FP32_TOL = 1e-5
# bf16: parameters are rounded to 8 mantissa bits (relative spacing 2**-8 = 0.4%) after every
# step, so a summation-order difference can flip a parameter by one bf16 ulp; the loss (~5) then
# moves by a few 1e-3. 2e-2 is ~10x the spread seen and far below a real bug (wrong averaging
# over dp shifts the loss by > 0.1 within 10 steps).
BF16_TOL = 2e-2


def _cfg(run_dir, cache, dp, precision="fp32", *extra):
    return tiny_config(run_dir, cache, f"--parallel.dp={dp}", f"--train.micro_batch_size={MICRO}",
                       f"--train.grad_accum={GLOBAL // (MICRO * dp)}", f"--train.steps={STEPS}",
                       f"--train.precision={precision}", "--train.eval_iters=2",
                       "--checkpoint.keep=0", *extra)


def _param_checksum(trainer) -> float:
    return float(sum(p.detach().double().sum() for p in trainer.model.parameters()))


def _dp_world(tmp, cache):
    """Several checks in one spawned world (spawning costs seconds)."""
    from megalite.trainer.loop import Trainer

    dp = int(os.environ["WORLD_SIZE"])
    out = {}
    trainer, result = train(_cfg(f"{tmp}/fp32", cache, dp), distributed=True)
    out["fp32"], out["val"], out["checksum"] = result.losses, result.val_loss, _param_checksum(trainer)
    _, result = train(_cfg(f"{tmp}/bf16", cache, dp, "bf16"), distributed=True)
    out["bf16"] = result.losses
    _, result = train(_cfg(f"{tmp}/bf16g", cache, dp, "bf16", "--train.grad_dtype=bf16"), True)
    out["bf16_grads"] = result.losses

    # Preemption: SIGUSR1 reaches rank 0 only, during step 4; every rank must stop after that
    # step with a checkpoint, and a new run must continue with exactly the same losses.
    class Preempted(Trainer):
        def micro_batches(self, step, data=None):
            if self.step == 3 and data is None and self.dims.rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().micro_batches(step, data)

    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.env import discover

    cfg = _cfg(f"{tmp}/resume", cache, dp)
    dims = ParallelDims.initialize(dp, 1, 1, discover(), "gloo", timeout_s=60)
    first = Preempted(cfg, dims).fit()
    _, second = train(cfg, distributed=True)
    out["preempted"], out["first"], out["second"] = first.preempted, first.losses, second.losses
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("ref")
    trainer, fp32 = train(_cfg(f"{tmp}/fp32", data_cache, 1), distributed=False)
    _, bf16 = train(_cfg(f"{tmp}/bf16", data_cache, 1, "bf16"), distributed=False)
    _, bf16g = train(_cfg(f"{tmp}/bf16g", data_cache, 1, "bf16", "--train.grad_dtype=bf16"),
                     distributed=False)
    return {"fp32": fp32.losses, "val": fp32.val_loss, "checksum": _param_checksum(trainer),
            "bf16": bf16.losses, "bf16_grads": bf16g.losses}


@pytest.mark.parametrize("dp", [2, 4])
def test_data_parallel_equals_single_process(dp, reference, tmp_path, data_cache):
    ranks = run_distributed(_dp_world, dp, str(tmp_path), data_cache, timeout_s=240)
    ref = reference
    assert ref["fp32"][-1] < ref["fp32"][0] - 0.5, ref["fp32"]  # it learns
    for r, out in enumerate(ranks):
        assert max_abs_diff(out["fp32"], ref["fp32"]) <= FP32_TOL, (r, out["fp32"], ref["fp32"])
        assert abs(out["val"] - ref["val"]) <= FP32_TOL
        assert abs(out["checksum"] - ref["checksum"]) <= 1e-3 * (1 + abs(ref["checksum"]))
        assert max_abs_diff(out["bf16"], ref["bf16"]) <= BF16_TOL, (out["bf16"], ref["bf16"])
        # bf16 gradients too: accumulated and all-reduced in bf16 (coarser, same tolerance
        # argument: one-ulp differences, here in the gradients as well)
        assert max_abs_diff(out["bf16_grads"], ref["bf16_grads"]) <= BF16_TOL
        assert max_abs_diff(ref["bf16"], ref["fp32"]) <= 0.1  # bf16 follows the fp32 run
        # replicas hold identical weights
        assert out["checksum"] == ranks[0]["checksum"]
        # preempted after step 4 on every rank, resumed exactly
        assert out["preempted"] and len(out["first"]) == 4 and len(out["second"]) == STEPS - 4
        assert out["first"] + out["second"] == out["fp32"], (out["first"], out["second"])
