"""A DeepSpeed JSON trains with DeepSpeed's learning rates: each scheduler, driven the way
DeepSpeedEngine drives it, against megalite's schedule from the mapped config, step for step;
no scheduler block means a constant lr; monitor blocks mapped or named once."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import pytest

from megalite.config import map_deepspeed, parse_args, parse_or_exit
from megalite.config.validate import ConfigError
from megalite.trainer.lr import train_lr

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")  # cosine, warmup_steps 2, lr 1e-3, 20 steps
OPT_LR = 2e-3


def _parse(tmp_path: Path, ds: Dict[str, Any], *cli: str):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return parse_args(["--config", TINY, "--deepspeed_config", str(path), *cli])[0]


def _deepspeed_lrs(kind: str, params: Dict[str, Any], steps: int) -> List[float]:
    """The lr of each of DeepSpeedEngine's optimizer steps: the engine builds the scheduler on
    the optimizer (``_scheduler_from_config``), and after each applied step calls its
    ``step()`` (``_take_model_step``); the optimizer step uses the group's lr at that time."""
    import torch

    schedules = pytest.importorskip(
        "deepspeed.runtime.lr_schedules",
        reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=OPT_LR)
    scheduler = getattr(schedules, kind)(optimizer, **params)
    lrs = []
    for _ in range(steps):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        scheduler.step()
    return lrs


WARMUP = {"warmup_min_lr": 1e-5, "warmup_max_lr": 3e-3, "warmup_num_steps": 8}
CASES = [
    ("WarmupLR", WARMUP),
    ("WarmupLR", {"warmup_num_steps": 5}),  # peak: the optimizer's lr; start 0
    ("WarmupDecayLR", {**WARMUP, "total_num_steps": 30}),
    ("WarmupDecayLR", {"warmup_max_lr": 3e-3, "warmup_num_steps": 1, "total_num_steps": 12}),
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_num_steps": 8, "warmup_min_ratio": 0.1,
                        "cos_min_ratio": 0.05}),
    ("WarmupCosineLR", {"total_num_steps": 16, "warmup_num_steps": 4}),  # default ratios
]


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
@pytest.mark.parametrize("kind, params", CASES)
def test_every_step_lr_equals_deepspeed(kind: str, params: Dict[str, Any], warmup_type: str,
                                        tmp_path: Path) -> None:
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": OPT_LR}},
          "scheduler": {"type": kind, "params": {**params, "warmup_type": warmup_type}}}
    train = _parse(tmp_path, ds).train
    assert (train.lr_schedule_style, train.warmup_type) == ("deepspeed", warmup_type)
    expected = _deepspeed_lrs(kind, {**params, "warmup_type": warmup_type}, train.steps)
    ours = [train_lr(train, k) for k in range(train.steps)]
    for step, (a, b) in enumerate(zip(ours, expected), 1):
        assert math.isclose(a, b, rel_tol=1e-12), (step, ours, expected)
    assert len(set(expected)) >= 4  # the schedule moves: not a constant matched


def test_json_without_scheduler_is_constant_lr_and_cli_wins(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """DeepSpeed keeps the optimizer's lr when the JSON has no scheduler: the YAML's cosine and
    warm-up are overridden like any JSON field (one conflict line each); the command line
    still wins over the JSON."""
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": OPT_LR}}}
    train = _parse(tmp_path, ds).train
    assert (train.lr_schedule, train.warmup_steps) == ("constant", 0)
    assert {train_lr(train, k) for k in range(train.steps)} == {OPT_LR}
    err = capsys.readouterr().err
    assert "config: train.lr_schedule: cosine (yaml) overridden by constant (deepspeed config)" \
        in err
    assert "config: train.warmup_steps: 2 (yaml) overridden by 0 (deepspeed config)" in err
    train = _parse(tmp_path, ds, "--train.lr_schedule=cosine", "--train.warmup_steps=3").train
    assert (train.lr_schedule, train.warmup_steps) == ("cosine", 3)
    assert train_lr(train, 0) < train_lr(train, 2) == OPT_LR > train_lr(train, train.steps - 1)
    err = capsys.readouterr().err
    assert ("config: train.lr_schedule: constant (deepspeed config) overridden by cosine "
            "(command line)") in err


def test_skipped_fp16_step_does_not_advance_the_schedule() -> None:
    """Trainer.lr counts applied updates only, as DeepSpeed skips scheduler.step() on overflow:
    the step after a skipped one uses the skipped step's lr."""
    from megalite.config import Config
    from megalite.trainer.loop import Trainer

    cfg = Config()
    cfg.train.steps, cfg.train.warmup_steps, cfg.train.lr_schedule = 10, 4, "cosine"
    plain = [train_lr(cfg.train, k) for k in range(10)]
    trainer = SimpleNamespace(cfg=cfg, step=0, scaler=SimpleNamespace(skipped=0))
    seen = []
    for overflow in (False, True, True, False, False, True, False):
        seen.append(Trainer.lr(trainer))
        trainer.scaler.skipped += overflow
        trainer.step += 1
    assert seen == [plain[0], plain[1], plain[1], plain[1], plain[2], plain[3], plain[3]]


def test_skipped_fp16_step_deepspeed_style_follows_the_engine(tmp_path: Path) -> None:
    """A DeepSpeed scheduler through Trainer.lr against the real scheduler driven as
    DeepSpeedEngine drives it: on an overflow the engine skips optimizer.step() and
    scheduler.step(), so the next applied step uses the same lr."""
    import torch

    from megalite.trainer.loop import Trainer

    schedules = pytest.importorskip(
        "deepspeed.runtime.lr_schedules",
        reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
    params = {"warmup_min_lr": 1e-5, "warmup_max_lr": 3e-3, "warmup_num_steps": 4,
              "total_num_steps": 10, "warmup_type": "linear"}
    cfg = _parse(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": OPT_LR}},
                            "scheduler": {"type": "WarmupDecayLR", "params": params}})
    assert cfg.train.lr_schedule_style == "deepspeed"
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=OPT_LR)
    scheduler = schedules.WarmupDecayLR(optimizer, **params)
    trainer = SimpleNamespace(cfg=cfg, step=0, scaler=SimpleNamespace(skipped=0))
    for overflow in (False, False, True, True, False, False, True, False, False, False):
        assert Trainer.lr(trainer) == optimizer.param_groups[0]["lr"], trainer.step
        if not overflow:
            weight.grad = torch.ones_like(weight)
            optimizer.step()
            scheduler.step()
        trainer.scaler.skipped += overflow
        trainer.step += 1


def test_monitor_blocks_mapped_or_named_once() -> None:
    out, warnings = map_deepspeed({
        "tensorboard": {"enabled": True, "output_path": "logs/", "job_name": "bert"},
        "wandb": {"enabled": True, "project": "p"}, "csv_monitor": {"enabled": False},
        "activation_checkpointing": {"profile": False}})
    assert out["run"] == {"tensorboard": True}
    assert [w for w in warnings if "tensorboard" in w] == [
        "deepspeed tensorboard.output_path=logs/, tensorboard.job_name=bert: megalite "
        "writes TensorBoard events to RUN_DIR/tensorboard; choose the folder with --run.dir"]
    unused = [w for w in warnings if "does not use" in w]
    assert len(unused) == 1 and len(warnings) == 3
    for key in ("wandb.enabled", "wandb.project", "csv_monitor.enabled"):
        assert key in unused[0]
    assert [w for w in warnings if "activation_checkpointing" in w] == [
        "deepspeed activation_checkpointing.profile=false is ignored: the block does not turn "
        "recomputation on (in DeepSpeed the model calls its checkpoint function); use "
        "--model.recompute=selective|full"]


def test_activation_checkpointing_block_turns_nothing_on() -> None:
    """As in DeepSpeed the block alone does not recompute: its fields are warned once each,
    partitioning and CPU offload of activations are refused by name."""
    block = {"partition_activations": False, "contiguous_memory_optimization": True,
             "number_checkpoints": 4, "synchronize_checkpoint_boundary": False}
    out, warnings = map_deepspeed({"activation_checkpointing": block})
    assert out["parallel"] == {} and "recompute" not in str(out)
    assert len(warnings) == 4 and all("is ignored" in w for w in warnings)
    for key in block:
        assert sum(f"activation_checkpointing.{key}=" in w for w in warnings) == 1, key
    with pytest.raises(ConfigError) as e:
        map_deepspeed({"activation_checkpointing": {"partition_activations": True,
                                                    "cpu_checkpointing": True}})
    assert len(e.value.lines) == 2 and all("does not partition" in x for x in e.value.lines)
    out, warnings = map_deepspeed({"tensorboard": {"enabled": False, "output_path": "x"}})
    assert out["run"] == {"tensorboard": False} and warnings == []


def test_bare_run_ranks_do_not_repeat_the_config_lines(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture,
                                                       tmp_path: Path) -> None:
    """A bare multi-rank run parses the config in the parent (which prints its conflict and
    warning lines) and again in each rank: the ranks it starts stay quiet."""
    from megalite.launcher import local

    plans = []
    monkeypatch.setattr(local, "run_node", lambda plan, grace_s: plans.append(plan) or 0)
    assert local.launch_local(["megalite.cli", "train"], 2) == 0
    monkeypatch.setenv("RANK", "0")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"wandb": {"enabled": True}}))
    argv = ["--config", TINY, "--deepspeed_config", str(path), "--train.lr=0.01"]
    parse_or_exit(argv)
    err = capsys.readouterr().err
    assert "wandb.enabled" in err and "overridden by constant" in err  # a launcher's rank 0
    rank0 = local.rank_env(plans[0], 0)
    monkeypatch.setenv("MEGALITE_CONFIG_SHOWN", rank0["MEGALITE_CONFIG_SHOWN"])
    parse_or_exit(argv)
    assert capsys.readouterr().err == ""  # a bare run's rank 0: its parent said it


def _losses_beside_deepspeed(ds_paths: List[str], steps: int) -> List[List[List[float]]]:
    """One gloo rank: for each JSON, megalite trained from it and a DeepSpeedEngine built from
    it, on the same initial weights and the same batches; each side's per-step loss."""
    import logging

    from deepspeed.utils import logger as ds_logger

    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.env import discover

    ds_logger.setLevel(logging.WARNING)
    dims = ParallelDims.initialize(1, 1, 1, discover(), "gloo")
    return [_both(ds_path, steps, dims) for ds_path in ds_paths]


def _both(ds_path: str, steps: int, dims) -> List[List[float]]:
    import deepspeed

    from megalite.models import build_model, lm_loss
    from megalite.trainer.loop import Trainer

    cfg = parse_args(["--config", TINY, "--deepspeed_config", ds_path,
                      f"--train.steps={steps}", "--run.tensorboard=false"], verbose=False)[0]
    trainer = Trainer(cfg, dims, read_only=True)
    batches = [trainer.micro_batches(s) for s in range(steps)]
    ours = [trainer.train_step()["loss"] for _ in range(steps)]

    model = build_model(trainer.args, cfg.train.seed)  # the weights the trainer started from
    with open(ds_path) as f:
        ds = json.load(f)
    ds["optimizer"]["params"]["torch_adam"] = True  # FusedAdam needs CUDA
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    theirs = []
    for micro in batches:
        total = 0.0
        for b in micro:
            loss = lm_loss(engine(b["tokens"]), b["labels"])
            engine.backward(loss)
            engine.step()
            total += float(loss)
        theirs.append(total / len(micro))
    return [ours, theirs]


@pytest.mark.world
def test_losses_equal_deepspeed_engine(tmp_path: Path) -> None:
    """The same JSON trains the same model in megalite and in DeepSpeed: without a scheduler
    (constant LR: tiny.yaml's cosine must not survive; with it step 2 already differs by 2%)
    and with WarmupDecayLR (log warm-up). fp32; the two AdamW implementations (fused, per-
    tensor loop) round differently: ~1e-6 relative over 10 steps, checked to 2e-5."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed "
                        "(pip install -e '.[deepspeed]')")
    from tests.distributed import run_distributed

    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "gradient_clipping": 1.0, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95],
                                                      "eps": 1e-8, "weight_decay": 0.1}}}
    decay = {**base, "scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 1e-4, "warmup_max_lr": 3e-3, "warmup_num_steps": 4,
        "total_num_steps": 10}}}
    paths = []
    for name, ds in (("constant", base), ("decay", decay)):
        paths.append(str(tmp_path / f"{name}.json"))
        Path(paths[-1]).write_text(json.dumps(ds))
    runs = run_distributed(_losses_beside_deepspeed, 1, paths, 10, timeout_s=300)[0]
    for name, (ours, theirs) in zip(("constant", "decay"), runs):
        assert len(ours) == len(theirs) == 10
        assert ours[-1] < ours[0] - 0.1, (name, ours)  # it trained
        for k, (a, b) in enumerate(zip(ours, theirs)):
            assert abs(a - b) <= 2e-5 * abs(b), (name, k, ours, theirs)
