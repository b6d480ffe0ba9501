"""GPU-only start-up paths checked on a CPU with CUDA mocked (``torch.cuda.is_available``,
``device_count``, ``CUDA_VISIBLE_DEVICES``, ``SLURM_*``): backend and device choice, the one-line
errors before any process group, the MFU peak table, fp32 gradient norms of fp16 gradients, the
kernel library's toolkit check, and data preparation before and outside any collective."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from helpers import REPO, tiny_config
from megalite.parallel.device import DeviceError, cuda_index, resolve_backend
from megalite.parallel.dims import LayoutError, ParallelDims
from megalite.parallel.env import LaunchEnv, discover

TINY = os.path.join(REPO, "configs", "tiny.yaml")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS",
               "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES", "OMPI_COMM_WORLD_RANK")


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: this process sees n GPUs (0: no CUDA); launcher variables cleared; any
    process group start or real device switch fails the test."""
    for key in (*LAUNCH_VARS, "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.setenv(key, "x")  # recorded: whatever a test sets is undone after it
        monkeypatch.delenv(key)
    chosen = []

    def refuse(*a, **k):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)

    def set_count(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        return chosen
    return set_count


def test_backend_and_device_rules(gpus, monkeypatch):
    gpus(0)
    assert resolve_backend("auto", {}) == "gloo" and resolve_backend("gloo", {}) == "gloo"
    with pytest.raises(DeviceError, match=r"parallel.backend=nccl .*--parallel.backend=gloo"):
        resolve_backend("nccl", {})
    # SLURM gave this step GPUs, CUDA is broken: auto must not quietly become gloo
    for var, value in (("SLURM_STEP_GPUS", "0,1"), ("SLURM_JOB_GPUS", "3"),
                       ("SLURM_GPUS_ON_NODE", "2")):
        with pytest.raises(DeviceError, match=f"SLURM allocated GPUs .*{var}={value}"):
            resolve_backend("auto", {var: value})
    assert resolve_backend("auto", {"SLURM_GPUS_ON_NODE": "0"}) == "gloo"
    assert resolve_backend("gloo", {"SLURM_STEP_GPUS": "0"}) == "gloo"  # asked for the CPU
    gpus(8)
    assert resolve_backend("auto", {}) == "nccl" and resolve_backend("gloo", {}) == "gloo"

    # one GPU per local rank: cuda:LOCAL_RANK
    assert [cuda_index(r, 8, False, {}) for r in range(8)] == list(range(8))
    assert cuda_index(3, 4, True, {}) == 3  # srun without binding sees all 8
    # srun --gpus-per-task=1 / --gpu-bind: LOCAL_RANK=3 sees one GPU, its own -> cuda:0
    gpus(1)
    bound = {"SLURM_STEP_GPUS": "0,1,2,3", "CUDA_VISIBLE_DEVICES": "3"}
    assert cuda_index(3, 4, True, bound) == 0
    assert cuda_index(1, 2, True, {"SLURM_GPUS_ON_NODE": "2"}) == 0
    gpus(2)  # --gpus-per-task=2: the first of its own two
    assert cuda_index(1, 4, True, {"SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7"}) == 0
    # more ranks than GPUs and nothing says each has its own: one line naming the fix
    gpus(1)
    for local_rank, local, srun, env in ((1, 2, False, {"CUDA_VISIBLE_DEVICES": "0"}),
                                         (0, 2, False, {}),
                                         (1, 2, True, {"SLURM_STEP_GPUS": "0"}),
                                         (1, 2, True, {})):
        with pytest.raises(DeviceError) as e:
            cuda_index(local_rank, local, srun, env)
        assert f"{local} ranks on this node but 1 visible GPU(s)" in str(e.value)
        assert "--parallel.backend=gloo" in str(e.value) and "\n" not in str(e.value)
    assert "CUDA_VISIBLE_DEVICES=0" in str(pytest.raises(
        DeviceError, cuda_index, 1, 2, False, {"CUDA_VISIBLE_DEVICES": "0"}).value)


def test_initialize_checks_before_the_process_group(gpus, monkeypatch):
    """ParallelDims.initialize stops with a LayoutError (the CLI's one line) before starting a
    process group; with a usable GPU it binds the rule's device and says so in the layout."""
    env = LaunchEnv(rank=1, world_size=2, local_rank=1, local_world_size=2,
                    master_addr="127.0.0.1", master_port=1, source="env")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    gpus(0)
    with pytest.raises(LayoutError, match="parallel.backend=nccl but CUDA is not available"):
        ParallelDims.initialize(2, 1, 1, env, "nccl")
    with pytest.raises(LayoutError, match="parallel.backend=nccl"):
        ParallelDims.single("nccl")  # before: AttributeError ... _cuda_setDevice
    assert ParallelDims.single("auto").device.type == "cpu"
    chosen = gpus(1)  # torchrun --nproc_per_node=2 on a one-GPU machine
    with pytest.raises(LayoutError, match=r"2 ranks on this node but 1 visible GPU"):
        ParallelDims.initialize(2, 1, 1, env, "auto")
    assert chosen == []  # not even set_device ran
    # LOCAL_RANK missing: ranks fill the node in order (was: every rank local rank 0)
    found = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"})
    assert (found.local_rank, found.local_world_size) == (1, 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    found = discover({"RANK": "3", "WORLD_SIZE": "4"})
    with pytest.raises(LayoutError, match=r"4 ranks on this node \(LOCAL_WORLD_SIZE unset"):
        ParallelDims.initialize(4, 1, 1, found, "auto")

    # srun --gpus-per-task=1: LOCAL_RANK=3 with one visible GPU -> cuda:0, a one-rank world
    started = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **k: started.append(backend))
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(started))
    monkeypatch.setenv("SLURM_STEP_GPUS", "0,1,2,3")
    srun = LaunchEnv(rank=0, world_size=1, local_rank=3, local_world_size=4,
                     master_addr="127.0.0.1", master_port=1, source="slurm")
    dims = ParallelDims.initialize(1, 1, 1, srun, "auto")
    assert chosen == [0] and started == ["nccl"] and dims.device == torch.device("cuda", 0)
    assert dims.describe().endswith("device cuda:0, backend nccl")


def _main_error(capsys, argv, code=2):
    from megalite.cli import main

    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_device_mistakes_are_one_line(gpus, monkeypatch, capsys, tmp_path, data_cache):
    """What a user meets: exit 2 and one line naming the fix, before any rank or process group
    starts (``launch_local`` and ``init_process_group`` refuse)."""
    from megalite.launcher import local

    monkeypatch.setattr(local, "launch_local", lambda *a, **k: pytest.fail("ranks started"))
    base = ["train", "--config", TINY, f"--run.dir={tmp_path}/run",
            f"--data.cache_dir={data_cache}"]
    gpus(1)  # a bare dp=2 run on a one-GPU machine
    line = _main_error(capsys, [*base, "--parallel.dp=2"])
    assert "2 ranks on this node" in line and "1 visible GPU" in line
    assert "--parallel.backend=gloo" in line
    gpus(0)  # --parallel.backend=nccl on a CPU machine, bare and launched
    assert "parallel.backend=nccl" in _main_error(capsys, [*base, "--parallel.backend=nccl"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    fresh = tmp_path / "fresh-cache"  # a launched rank prepares data before the process group
    line = _main_error(capsys, [*base, "--parallel.backend=nccl", f"--data.cache_dir={fresh}"])
    assert "parallel.backend=nccl" in line
    assert any(name.endswith(".meta.json") for name in os.listdir(fresh))
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key)
    # an srun task of a job SLURM allocated GPUs, on a node where CUDA is unavailable
    for key, value in (("SLURM_PROCID", "0"), ("SLURM_STEP_ID", "0"), ("SLURM_NTASKS", "1"),
                       ("SLURM_JOB_GPUS", "0"), ("SLURM_JOB_ID", "7")):
        monkeypatch.setenv(key, value)
    assert "SLURM allocated GPUs" in _main_error(capsys, base)


def test_mfu_peak_table_and_progress_line(monkeypatch):
    from megalite import hardware
    from megalite.trainer.loop import Trainer
    from megalite.trainer.metrics import MetricsLogger

    peak = hardware.peak_tflops
    # dense peaks, not the datasheets' 2:4-sparse headline numbers
    assert peak("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak("NVIDIA H200", "bf16") == 989.0 and peak("NVIDIA H200", "fp16") == 989.0
    assert peak("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak("NVIDIA A100 80GB PCIe", "fp32") == 19.5
    assert peak("NVIDIA A100-SXM4-40GB", "fp32", tf32=True) == 156.0
    assert peak("NVIDIA A10", "bf16") == 125.0  # not the A100 row
    assert peak("NVIDIA L40S", "fp16") == 362.05 and peak("NVIDIA L4", "bf16") == 121.0
    assert peak("Tesla V100-SXM2-16GB", "fp16") == 125.0
    assert peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores: no guess
    assert peak("Tesla V100-PCIE-32GB", "fp32", tf32=True) == 14.0  # no TF32 either
    assert peak("NVIDIA GeForce GTX 1080", "fp32") is None
    # fp32 uses the TF32 peak only while torch lets matmuls use TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert hardware.device_peak_tflops(cuda, "fp32") == 67.0
        torch.set_float32_matmul_precision("high")
        assert hardware.device_peak_tflops(cuda, "fp32") == 494.5
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert hardware.device_peak_tflops(cuda, "fp32") == 494.5
        assert hardware.device_peak_tflops(cuda, "bf16") == 989.0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision(before)
    assert hardware.device_peak_tflops(torch.device("cpu"), "fp32") is None  # CPU: no MFU
    # the trainer: train.peak_tflops overrides, else the table
    fake = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(peak_tflops=0.0,
                                                                     precision="bf16")),
                           dims=SimpleNamespace(device=cuda))
    assert Trainer.peak_tflops(fake) == 989.0
    fake.cfg.train.peak_tflops = 400.0
    assert Trainer.peak_tflops(fake) == 400.0
    fake.cfg.train.peak_tflops, fake.dims.device = 0.0, torch.device("cpu")
    assert Trainer.peak_tflops(fake) is None

    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    log = MetricsLogger("unused", 2, True, False, 1, write=False)
    log.tty, log.first_step = False, 1
    row = {"loss": 2.0, "tokens_per_s": 10.0, "lr": 1e-3}
    log._progress({"step": 1, **row, "mfu": 0.412})
    log._progress({"step": 2, **row})
    assert "| mfu 41.2% |" in lines[0] and "| mfu n/a |" in lines[1]


def test_fp16_gradient_norm_is_fp32(tmp_path, monkeypatch):
    """fp16 gradients whose norm is far above 65504 (fp16's largest value): the norm is finite
    and right, and the clipped, unscaled gradients AdamW receives are right too (the clip
    factor, ~1e-6, cast to fp16 kept a few bits: subnormal); a real inf is still an overflow.

    The trainer starts on an empty data cache with barriers refused: it prepares the data
    without waiting in a collective (a large corpus outlasted the collective timeout)."""
    from megalite.parallel import comm
    from megalite.trainer.loop import Trainer

    monkeypatch.setattr(comm, "barrier", lambda *a, **k: pytest.fail("barrier around data"))
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: pytest.fail("barrier around data"))
    cfg = tiny_config(str(tmp_path), str(tmp_path / "cache"), "--train.precision=fp16",
                      "--train.grad_dtype=fp16", "--train.steps=2")
    trainer = Trainer(cfg, ParallelDims.single())
    assert len(trainer.train_ds) > 0
    opt = trainer.opt
    gen = torch.Generator().manual_seed(0)
    for grad in trainer.engine.owned_grads():
        assert grad.dtype == torch.float16
        grad.copy_(torch.randn(grad.shape, generator=gen) * 3000)
    grads64 = torch.cat([grad[s.start:s.start + s.numel].double() for g, grad in
                         zip(trainer.engine.groups, trainer.engine.owned_grads())
                         for s in g.segments])  # in the order AdamW sees the segments
    counted = torch.cat([p.double() for p in opt._norm_parts])
    scale = 65536.0  # the default initial loss scale
    want = counted.norm().item() / scale
    assert counted.norm().item() > 65504 * 10
    norm = opt.clip_grad_norm(1.0, scale)
    assert math.isfinite(norm.item()) and norm.item() == pytest.approx(want, rel=1e-5)

    seen = []
    opt.opt.step = lambda: seen.append(torch.cat([v.grad.double() for s in opt.segments
                                                  for v in s]))
    opt.step(1e-3)
    coef = min(1.0, 1.0 / (want + 1e-6)) / scale
    assert seen[0].abs().max().item() > 0
    torch.testing.assert_close(seen[0], grads64 * coef, rtol=1e-6, atol=0)

    next(iter(trainer.engine.owned_grads()))[0] = float("inf")
    assert not math.isfinite(opt.clip_grad_norm(1.0, scale).item())


def test_cuda_toolkit_newer_than_driver_falls_back(caplog):
    from megalite.ops import _backend

    lib = SimpleNamespace(cuda_runtime_version=lambda: 13000)
    _backend._warned.discard("cuda-driver")
    with caplog.at_level("WARNING", logger="megalite.ops"):
        assert _backend.check_toolkit(lib, 12040) is None
        assert _backend.check_toolkit(lib, 12040) is None  # the warning is said once
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "CUDA 13.0" in warnings[0] and "CUDA 12.4" in warnings[0]
    assert _backend.check_toolkit(lib, 13020) is lib  # same major: minor version compatibility
    assert _backend.check_toolkit(SimpleNamespace(cuda_runtime_version=lambda: 12080),
                                  12040) is not None
    assert _backend.check_toolkit(lib, None) is lib  # no driver to ask: kept (CPU node)
    assert _backend.check_toolkit(SimpleNamespace(), 12040) is not None  # a library of before
    assert _backend.driver_cuda_version() is None or _backend.driver_cuda_version() > 0
