"""Config system: YAML/DeepSpeed/CLI precedence, coercion, DeepSpeed mapping, validation.

Fast and torch-free, since the config layer must work (and fail) before torch is imported.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]

from megalite.config import (SECTIONS, Config, ConfigError, config_from_dict, config_to_dict,
                             field_docs, help_text, map_deepspeed, parse_args, parse_or_exit,
                             save_yaml, validate)  # noqa: E402

TINY = str(ROOT / "configs" / "tiny.yaml")

DS_CONFIG: Dict[str, Any] = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 4,
    "steps_per_print": 50,
    "optimizer": {"type": "Adam", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                              "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR",
                  "params": {"total_num_steps": 1000, "warmup_min_lr": 0, "warmup_max_lr": 3e-4,
                             "warmup_num_steps": 100, "warmup_type": "linear"}},
    "gradient_clipping": 0.5,
    "bf16": {"enabled": True},
    "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 16},
    "zero_optimization": {"stage": 0, "overlap_comm": True, "contiguous_gradients": True},
    "wall_clock_breakdown": False,
    "comms_logger": {"enabled": False},
}


def _write(tmp_path: Path, name: str, content: Any) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(content) if name.endswith(".json") else content)
    return str(path)


def _errors(argv: List[str]) -> List[str]:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    return info.value.lines


# ---------------------------------------------------------------- YAML, overrides, coercion

@pytest.mark.parametrize("form", [["--train.lr=1e-4"], ["--train.lr", "1e-4"]])
def test_yaml_then_override(form: List[str], capsys: pytest.CaptureFixture) -> None:
    cfg, warnings = parse_args(["--config", TINY, *form])
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 20 and cfg.model.max_seq_len == 64
    assert cfg.train.global_batch_size == 4 and warnings == []
    # overriding the YAML from the command line is how configs are extended: no conflict line
    assert "overridden" not in capsys.readouterr().err


def test_no_conflict_line_when_value_unchanged(capsys: pytest.CaptureFixture) -> None:
    parse_args(["--config", TINY, "--train.lr=0.001", "--train.eps=1e-6"])
    assert "overridden" not in capsys.readouterr().err


@pytest.mark.parametrize("text,expected", [("no", False), ("yes", True), ("0", False),
                                           ("1", True), ("True", True), ("off", False)])
def test_bool_coercion(text: str, expected: bool) -> None:
    cfg, _ = parse_args(["--config", TINY, f"--checkpoint.resume={text}"])
    assert cfg.checkpoint.resume is expected


def test_bare_bool_flag_and_optional() -> None:
    cfg, _ = parse_args(["--config", TINY, "--checkpoint.resume=false", "--checkpoint.resume",
                         "--model.tie_embeddings=false", "--checkpoint.dir=none"])
    assert cfg.checkpoint.resume is True and cfg.model.tie_embeddings is False
    assert cfg.checkpoint.dir is None


def test_list_coercion_cli_and_yaml(tmp_path: Path) -> None:
    cfg, _ = parse_args(["--config", TINY, "--data.source=prepared", "--data.paths=a/x, b/y",
                         "--data.weights=1,3e-1"])
    assert cfg.data.paths == ["a/x", "b/y"] and cfg.data.weights == [1.0, 0.3]
    yml = _write(tmp_path, "c.yaml", "data:\n  source: prepared\n  paths: [p1, p2]\n"
                 "  weights: [2, 1]\ntrain:\n  micro_batch_size: 2\n  lr: 1e-3\n  steps: 1e3\n")
    cfg, _ = parse_args(["--config", yml])
    assert cfg.data.paths == ["p1", "p2"] and cfg.data.weights == [2.0, 1.0]
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 1000


def test_unknown_field_and_section_suggest(tmp_path: Path) -> None:
    (line,) = _errors(["--train.lrr=1"])
    assert "train.lrr" in line and "did you mean train.lr?" in line
    yml = _write(tmp_path, "bad.yaml", "trian:\n  steps: 3\nmodel:\n  num_layer: 2\n")
    lines = _errors(["--config", yml])
    assert any("'trian'" in l and "did you mean train?" in l for l in lines)
    assert any("model.num_layer" in l and "did you mean model.num_layers?" in l for l in lines)


def test_wrong_type_names_field_value_and_type() -> None:
    (line,) = _errors(["--train.steps=abc"])
    assert "train.steps=abc" in line and "expected int" in line
    (line,) = _errors(["--train.steps=2.5"])
    assert "train.steps=2.5" in line


def test_unknown_flag_and_local_rank() -> None:
    (line,) = _errors(["--config", TINY, "--fp16"])
    assert "--fp16" in line
    (line,) = _errors(["--config", TINY, "stray"])
    assert "stray" in line
    for form in (["--local_rank=3"], ["--local_rank", "3"], ["--local-rank=0"]):
        cfg, _ = parse_args(["--config", TINY, *form])
        assert cfg.train.steps == 20


def test_help_text_documents_every_field() -> None:
    text = help_text()
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs[f.name], f"{section}.{f.name} has no docstring"
            assert f"--{section}.{f.name} (" in text and docs[f.name] in text
    assert "--train.micro_batch_size (int or none, default none)" in text


def test_roundtrip_save_yaml(tmp_path: Path) -> None:
    cfg, _ = parse_args(["--config", TINY, "--data.paths=x,y"])
    save_yaml(cfg, tmp_path / "run" / "config.yaml")
    again, _ = parse_args(["--config", str(tmp_path / "run" / "config.yaml")])
    assert again == cfg and config_from_dict(config_to_dict(cfg)) == cfg


def test_parse_or_exit(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        parse_or_exit(["--config", TINY, "--model.num_heads=5", "--train.lr=-1"])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len([l for l in err if l.startswith("error: ")]) == 2


def test_config_package_does_not_import_torch() -> None:
    code = "import megalite.config, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- DeepSpeed JSON

def test_deepspeed_mapping(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = _write(tmp_path, "ds.json", DS_CONFIG)
    cfg, warnings = parse_args(["--config", TINY, "--deepspeed_config", ds, "--parallel.dp=2"])
    t = cfg.train
    assert (t.global_batch_size, t.micro_batch_size, t.grad_accum) == (64, 8, 4)
    assert (t.lr, t.beta1, t.beta2, t.eps, t.weight_decay) == (3e-4, 0.9, 0.95, 1e-8, 0.1)
    assert (t.lr_schedule, t.steps, t.warmup_steps, t.min_lr) == ("linear", 1000, 100, 0.0)
    assert t.grad_clip == 0.5 and t.precision == "bf16" and cfg.run.log_interval == 50
    unused = [w for w in warnings if "does not use" in w]
    assert len(unused) == 1
    for key in ("wall_clock_breakdown", "comms_logger.enabled"):
        assert key in unused[0]
    for key in ("fp16.enabled", "fp16.loss_scale", "zero_optimization.stage",
                "zero_optimization.overlap_comm", "bf16.enabled", "train_batch_size"):
        assert key not in unused[0]
    err = capsys.readouterr().err
    assert "config: train.lr: 0.001 (yaml) overridden by 0.0003 (deepspeed config)" in err
    assert "config: train.steps: 20 (yaml) overridden by 1000 (deepspeed config)" in err
    assert "config: train.micro_batch_size: 4 (yaml) overridden by 8 (deepspeed config)" in err


def test_deepspeed_then_cli_conflict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = _write(tmp_path, "ds.json", DS_CONFIG)
    cfg, _ = parse_args(["--deepspeed-config", ds, "--parallel.dp=2", "--train.steps=500"])
    assert cfg.train.steps == 500
    assert "train.steps: 1000 (deepspeed config) overridden by 500 (command line)" in \
        capsys.readouterr().err


def test_deepspeed_fp16_and_zero() -> None:
    out, warnings = map_deepspeed({
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
                 "loss_scale_window": 500, "hysteresis": 1, "min_loss_scale": 2},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 2**20, "overlap_comm": True,
                              "offload_optimizer": {"device": "cpu", "pin_memory": True}}})
    assert out["train"] == {"precision": "fp16", "loss_scale": 0, "initial_loss_scale": 4096.0,
                            "loss_scale_window": 500, "loss_scale_hysteresis": 1,
                            "min_loss_scale": 2,
                            "lr_schedule": "constant", "warmup_steps": 0}  # no scheduler
    assert out["parallel"] == {"zero_stage": 3, "bucket_mb": 4.0, "offload_optimizer": True}
    assert not any("does not use" in w for w in warnings)
    out, _ = map_deepspeed({"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}})
    assert out["train"]["initial_loss_scale"] == 65536.0  # DeepSpeed's default power 16
    assert out["train"]["loss_scale_hysteresis"] == 2 and out["parallel"]["zero_stage"] == 1


def test_deepspeed_auto_and_schedulers() -> None:
    out, warnings = map_deepspeed({"train_micro_batch_size_per_gpu": "auto",
                                   "gradient_clipping": "auto",
                                   "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                                   "scheduler": {"type": "WarmupLR",
                                                 "params": {"warmup_max_lr": 1e-3,
                                                            "warmup_num_steps": 10}}})
    assert out["train"] == {"lr_schedule": "constant", "lr_schedule_style": "deepspeed",
                            "warmup_steps": 10, "warmup_type": "log", "lr": 1e-3,
                            "warmup_min_lr": 0.0}  # log: DeepSpeed's default
    assert len(warnings) == 1 and "optimizer.params omits betas" in warnings[0]
    out, _ = map_deepspeed({"optimizer": {"type": "adamw", "params": {"lr": 2e-4}},
                            "scheduler": {"type": "WarmupCosineLR",
                                          "params": {"total_num_steps": 300,
                                                     "warmup_num_steps": 5,
                                                     "cos_min_ratio": 0.1}}})
    assert out["train"]["lr_schedule"] == "cosine" and out["train"]["steps"] == 300
    assert out["train"]["min_lr"] == pytest.approx(2e-5)


@pytest.mark.parametrize("ds,needle", [
    ({"fp16": {"enabled": True, "consecutive_hysteresis": True}}, "consecutive_hysteresis"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4: must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param"),
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}, "cpu only"),
    ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "adam_w_mode"),
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type=Lamb"),
    ({"scheduler": {"type": "OneCycle"}}, "scheduler.type=OneCycle"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}},
     "warmup_num_steps=0: DeepSpeed needs a positive integer"),
    ({"scheduler": {"params": {"warmup_num_steps": 5}}}, "a scheduler block needs a type"),
])
def test_deepspeed_unsupported(ds: Dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        map_deepspeed(ds)
    assert len(info.value.lines) == 1 and needle in info.value.lines[0]


# ---------------------------------------------------------------- batch arithmetic

def _batch(m: Any, a: Any, g: Any, dp: int = 2) -> Config:
    cfg = config_from_dict({"parallel": {"dp": dp}, "train": {
        "micro_batch_size": m, "grad_accum": a, "global_batch_size": g}})
    return validate(cfg)


@pytest.mark.parametrize("m,a,g,want", [
    (4, 2, None, (4, 2, 16)), (4, None, 16, (4, 2, 16)), (None, 2, 16, (4, 2, 16)),
    (4, None, None, (4, 1, 8)), (None, None, 16, (8, 1, 16)), (4, 2, 16, (4, 2, 16)),
])
def test_batch_resolution(m: Any, a: Any, g: Any, want: tuple) -> None:
    t = _batch(m, a, g).train
    assert (t.micro_batch_size, t.grad_accum, t.global_batch_size) == want


@pytest.mark.parametrize("m,a,g,numbers", [
    (4, 2, 20, ["micro_batch_size 4", "grad_accum 2", "dp 2", "20"]),
    (3, None, 16, ["micro_batch_size 3", "dp 2", "16"]),
    (None, 3, 16, ["grad_accum 3", "dp 2", "16"]),
    (None, None, 15, ["dp 2", "15"]),
    (None, 2, None, ["micro_batch_size"]),
    (None, None, None, ["micro_batch_size"]),
])
def test_batch_mismatch(m: Any, a: Any, g: Any, numbers: List[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _batch(m, a, g)
    (line,) = info.value.lines
    assert all(n in line for n in numbers), line


# ---------------------------------------------------------------- parallel.dp=auto

def _dp(world: Any, **parallel: Any) -> Config:
    """A config with micro_batch_size 2 and grad_accum 2, validated for a launcher world."""
    d = {"parallel": parallel, "train": {"micro_batch_size": 2, "grad_accum": 2}}
    return validate(config_from_dict(d), world)


@pytest.mark.parametrize("world,parallel,dp", [
    (None, {}, 1),                         # a bare run: one replica
    (None, {"tp": 2, "pp": 2}, 1),
    (8, {"tp": 2, "pp": 2}, 2),            # Megatron: world / (tp x pp)
    (4, {}, 4),
    (4, {"dp": 4}, 4),                     # explicit and agreeing
    (None, {"dp": 3}, 3),                  # explicit, bare: starts 3 local ranks
])
def test_dp_auto_resolution(world: Any, parallel: Dict[str, Any], dp: int) -> None:
    cfg = _dp(world, **parallel)
    assert cfg.parallel.dp == dp and cfg.world_size == dp * cfg.parallel.tp * cfg.parallel.pp
    assert cfg.train.global_batch_size == 2 * 2 * dp  # batch sizes resolve with that dp
    assert Config().parallel.dp == "auto"  # the default, and what --help shows
    assert "--parallel.dp (int or auto, default auto)" in help_text()


@pytest.mark.parametrize("world,parallel,needles", [
    (6, {"tp": 4}, ["parallel.dp=auto", "started 6 ranks", "tp*pp = 4*1 = 4"]),
    (4, {"dp": 2}, ["parallel.dp=2", "world size 4 != dp*pp*tp = 2*1*1 = 2"]),
    (8, {"dp": 4, "tp": 2, "pp": 2}, ["parallel.dp=4", "world size 8", "= 16"]),
])
def test_dp_mismatch_one_line(world: int, parallel: Dict[str, Any], needles: List[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _dp(world, **parallel)
    (line,) = info.value.lines
    assert all(n in line for n in needles), line


def test_dp_auto_parsing_and_configs() -> None:
    for text in ("auto", "AUTO", " auto "):
        assert parse_args(["--config", TINY, f"--parallel.dp={text}"])[0].parallel.dp == 1
    assert parse_args(["--config", TINY, "--parallel.dp=2"])[0].parallel.dp == 2
    (line,) = _errors(["--config", TINY, "--parallel.dp=many"])
    assert "parallel.dp=many" in line and "int or auto" in line, line
    # configs leave dp to the launcher unless they mean a bare multi-rank run (demo*.yaml)
    import yaml

    assert "dp" not in yaml.safe_load(open(TINY))["parallel"]


def test_deepspeed_train_batch_size_with_dp_auto(tmp_path: Path) -> None:
    """A DeepSpeed JSON's train_batch_size resolves once auto has become world / (tp x pp)."""
    ds = _write(tmp_path, "ds.json", {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2})
    cfg, _ = parse_args(["--config", TINY, "--deepspeed_config", ds,
                         "--train.grad_accum=none"], world_size=8)
    t = cfg.train
    assert (cfg.parallel.dp, t.micro_batch_size, t.grad_accum, t.global_batch_size) == \
        (8, 2, 2, 32)
    cfg, _ = parse_args(["--config", TINY, "--deepspeed_config", ds, "--parallel.tp=2",
                         "--train.grad_accum=none"], world_size=8)
    assert (cfg.parallel.dp, cfg.train.grad_accum) == (4, 4)
    cfg, _ = parse_args(["--config", TINY, "--deepspeed_config", ds, "--train.grad_accum=none"])
    assert (cfg.parallel.dp, cfg.train.grad_accum) == (1, 16)  # bare: one replica accumulates
    with pytest.raises(ConfigError) as info:  # 6 ranks: 32 is no multiple of micro 2 x dp 6
        parse_args(["--config", TINY, "--deepspeed_config", ds, "--train.grad_accum=none"],
                   world_size=6)
    (line,) = info.value.lines
    assert line.startswith("train.global_batch_size=32") and "dp 6" in line, line


def test_tp_error_is_one_line_with_valid_degrees() -> None:
    """tp=3 misses heads and ffn (and with GQA kv heads): one line naming each and what fits."""
    (line,) = _errors(["--config", TINY, "--parallel.tp=3"])
    assert line.startswith("parallel.tp=3: must divide model.num_heads=4, "
                           "model.ffn_hidden_size=256"), line
    assert line.endswith("valid: 1, 2, 4"), line
    (line,) = _errors(["--config", TINY, "--model.family=llama", "--model.num_heads=8",
                       "--model.num_kv_heads=2", "--model.ffn_hidden_size=96",
                       "--parallel.tp=3"])
    assert "model.num_heads=8" in line and "model.num_kv_heads=2" in line, line
    assert "ffn_hidden_size" not in line and line.endswith("valid: 1, 2, 4, 8"), line


# ---------------------------------------------------------------- interleaved: resolved batch

INTERLEAVED = {"parallel": {"dp": 1, "pp": 2, "schedule": "interleaved", "virtual_stages": 2},
               "model": {"num_layers": 4}}


def _interleaved(m: Any, a: Any, g: Any, dp: int = 1) -> Config:
    d = copy.deepcopy(INTERLEAVED)
    d["parallel"]["dp"] = dp
    d["train"] = {"micro_batch_size": m, "grad_accum": a, "global_batch_size": g}
    return validate(config_from_dict(d))


@pytest.mark.parametrize("m,a,g,dp,numbers", [
    # grad_accum derived by resolve_batch (3 = 3 / (1 x 1)): was missed before resolution
    (1, None, 3, 1, ["train.grad_accum=3", "micro-batches per step 3", "parallel.pp=2",
                     "global_batch_size 3 / (micro_batch_size 1 x dp 1)",
                     "train.global_batch_size=2 or 4"]),
    (2, None, 20, 2, ["train.grad_accum=5", "parallel.pp=2", "train.global_batch_size=16 or 24"]),
    (None, None, 4, 1, ["train.grad_accum=1", "parallel.pp=2",
                        "train.micro_batch_size=4 with train.global_batch_size=8"]),
    (1, None, None, 1, ["train.grad_accum=1", "train.grad_accum=2"]),  # grad_accum defaults to 1
    (1, 3, None, 1, ["train.grad_accum=3", "set train.grad_accum=2 or 4"]),
    (None, 3, 6, 1, ["train.grad_accum=3", "train.grad_accum=4 with train.global_batch_size=8"]),
])
def test_interleaved_checks_resolved_grad_accum(m: Any, a: Any, g: Any, dp: int,
                                                numbers: List[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _interleaved(m, a, g, dp)
    (line,) = info.value.lines
    assert all(n in line for n in numbers), line


def test_interleaved_valid_and_conflict_reported_once() -> None:
    assert _interleaved(1, None, 4).train.grad_accum == 4
    assert _interleaved(2, None, 8, dp=2).train.grad_accum == 2
    # conflicting sizes: only the conflict (the final grad_accum is not known yet)
    with pytest.raises(ConfigError) as info:
        _interleaved(1, 1, 3)
    (line,) = info.value.lines
    assert line.startswith("train.global_batch_size=3:"), line


@pytest.mark.parametrize("extra,needles", [
    # grad_accum left to resolve_batch: 3 micro-batches for pp=2 (passed validation before)
    (["--train.grad_accum=none"], ["train.grad_accum=3", "micro-batches per step 3",
                                   "parallel.pp=2", "train.global_batch_size=2 or 4"]),
    # tiny.yaml's grad_accum=1 conflicts with micro 1 x global 3: that one root cause only
    ([], ["train.global_batch_size=3", "micro_batch_size 1 x grad_accum 1 x dp 1 = 1"]),
])
def test_interleaved_grad_accum_cli_exits_2_before_spawning(extra: List[str],
                                                            needles: List[str]) -> None:
    """Checked before any rank starts: exit 2 and one ``error:`` line naming field and fix."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "megalite.train", "--config", TINY,
                        "--parallel.pp=2", "--parallel.schedule=interleaved",
                        "--parallel.virtual_stages=2", "--train.micro_batch_size=1",
                        "--train.global_batch_size=3", "--model.num_layers=4", *extra],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in r.stderr and "rank" not in r.stderr.lower(), r.stderr


# ---------------------------------------------------------------- one error per bad config

BASE: Dict[str, Any] = {
    "model": {"family": "gpt", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
              "max_seq_len": 64},
    "train": {"steps": 20, "micro_batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2},
    "data": {"source": "synthetic", "seq_len": 64},
}

BAD = [
    ({"model": {"family": "t5"}}, "model.family", "t5"),
    ({"model": {"num_layers": 0}}, "model.num_layers", "0"),
    ({"model": {"hidden_size": -64}}, "model.hidden_size", "-64"),
    ({"model": {"num_heads": 5}}, "model.num_heads", "5"),
    ({"model": {"family": "llama", "num_kv_heads": 3}}, "model.num_kv_heads", "3"),
    ({"model": {"num_kv_heads": 2}}, "model.num_kv_heads", "2"),
    ({"model": {"ffn_hidden_size": 0}}, "model.ffn_hidden_size", "0"),
    ({"model": {"vocab_size": -1}}, "model.vocab_size", "-1"),
    ({"model": {"max_seq_len": 32}}, "data.seq_len", "64"),
    ({"model": {"dropout": 1.0}}, "model.dropout", "1.0"),
    ({"model": {"norm_eps": 0}}, "model.norm_eps", "0.0"),
    ({"parallel": {"dp": 0}}, "parallel.dp", "0"),
    ({"parallel": {"tp": 8}}, "parallel.tp", "8"),  # 4 heads do not split over 8 ranks
    ({"parallel": {"tp": 2, "sequence_parallel": True}, "data": {"seq_len": 63}},
     "parallel.sequence_parallel", "seq_len=63"),
    ({"parallel": {"vocab_multiple": 0}}, "parallel.vocab_multiple", "0"),
    ({"parallel": {"pp": 4}}, "parallel.pp", "4"),
    ({"parallel": {"backend": "mpi"}}, "parallel.backend", "mpi"),
    ({"parallel": {"bucket_mb": 0}}, "parallel.bucket_mb", "0.0"),
    ({"parallel": {"timeout_s": -1}}, "parallel.timeout_s", "-1.0"),
    ({"train": {"steps": 0}}, "train.steps", "0"),
    ({"train": {"lr": 0}}, "train.lr", "0.0"),
    ({"train": {"min_lr": 0.01}}, "train.min_lr", "0.01"),
    ({"train": {"lr_schedule": "step"}}, "train.lr_schedule", "step"),
    ({"train": {"warmup_steps": 30}}, "train.warmup_steps", "30"),
    ({"train": {"decay_fraction": 0}}, "train.decay_fraction", "0.0"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay", "-0.1"),
    ({"train": {"beta2": 1.0}}, "train.beta2", "1.0"),
    ({"train": {"eps": 0}}, "train.eps", "0.0"),
    ({"train": {"grad_clip": -1}}, "train.grad_clip", "-1.0"),
    ({"train": {"precision": "fp8"}}, "train.precision", "fp8"),
    ({"train": {"grad_dtype": "int8"}}, "train.grad_dtype", "int8"),
    ({"parallel": {"zero_stage": 4}}, "parallel.zero_stage", "4"),
    ({"parallel": {"zero2_accumulate": "some"}}, "parallel.zero2_accumulate", "some"),
    ({"parallel": {"zero3_reshard_after_forward": "sometimes"}},
     "parallel.zero3_reshard_after_forward", "sometimes"),
    ({"train": {"precision": "fp16", "loss_scale_window": 0}}, "train.loss_scale_window", "0"),
    ({"train": {"precision": "fp16", "min_loss_scale": 0}}, "train.min_loss_scale", "0"),
    ({"train": {"eval_interval": -5}}, "train.eval_interval", "-5"),
    ({"train": {"eval_iters": 0}}, "train.eval_iters", "0"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size", "0"),
    ({"train": {"grad_accum": 2, "global_batch_size": 10}}, "train.global_batch_size", "10"),
    ({"data": {"source": "web"}}, "data.source", "web"),
    ({"data": {"source": "prepared"}}, "data.paths", "prepared"),
    ({"data": {"paths": ["a"], "weights": [1, 2]}}, "data.weights", "[1.0,2.0]"),
    ({"data": {"paths": ["a", "b"], "weights": [1, 0]}}, "data.weights", "[1.0,0.0]"),
    ({"data": {"split": "0,100"}}, "data.split", "0,100"),
    ({"data": {"split": "abc"}}, "data.split", "abc"),
    ({"data": {"tokenizer": "bpe:100"}}, "data.tokenizer", "bpe:100"),
    ({"data": {"tokenizer": "bpe:257"}}, "data.tokenizer", "bpe:257"),  # no room for a merge
    ({"data": {"tokenizer": "sentencepiece"}}, "data.tokenizer", "sentencepiece"),
    ({"data": {"stdlib_max_bytes": 0}}, "data.stdlib_max_bytes", "0"),
    ({"data": {"num_workers": 0}}, "data.num_workers", "0"),
    ({"checkpoint": {"interval": -1}}, "checkpoint.interval", "-1"),
    ({"checkpoint": {"keep": -1}}, "checkpoint.keep", "-1"),
    ({"run": {"log_interval": 0}}, "run.log_interval", "0"),
    ({"run": {"sample_tokens": -1}}, "run.sample_tokens", "-1"),
]


def test_base_is_valid() -> None:
    validate(config_from_dict(BASE))


@pytest.mark.parametrize("patch,field,value", BAD, ids=[f"{f}={v}" for _, f, v in BAD])
def test_bad_config_one_error(patch: Dict[str, Any], field: str, value: str) -> None:
    d = copy.deepcopy(BASE)
    for section, fields in patch.items():
        d.setdefault(section, {}).update(fields)
    with pytest.raises(ConfigError) as info:
        validate(config_from_dict(d))
    lines = info.value.lines
    assert len(lines) == 1, lines
    assert field in lines[0] and value in lines[0], lines[0]


def test_all_problems_reported_at_once() -> None:
    d = copy.deepcopy(BASE)
    d["model"]["num_heads"] = 5
    d["train"]["lr"] = -1
    d["data"]["source"] = "web"
    with pytest.raises(ConfigError) as info:
        validate(config_from_dict(d))
    assert len(info.value.lines) == 3 and str(info.value).count("\n") == 2
