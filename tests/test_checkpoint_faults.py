"""Checkpoint faults as a user (or an adversary) meets them, through the command line in this
process (one rank: no process world): a shard carrying pickled code under resume, eval and
generate; truncated, emptied, overwritten shards and a cut meta.json; a dangling ``latest``;
``resume=false`` beside another run's checkpoints; a model-shape mismatch; a full disk (a real
1.5-checkpoint tmpfs where mounting is allowed); ``checkpoint.keep`` sparing other runs'
checkpoints; ``megalite checkpoint verify``; SIGKILL during an asynchronous write (a
subprocess). Each fault: one ``error:`` line naming the file, exit 2, nothing run, nothing lost.

One 4-step run (checkpoints at steps 2 and 4) is trained once; each test damages a copy."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import zlib

import pytest

from helpers import REPO, tiny_config, train
from megalite.cli import main

TINY = os.path.join(REPO, "configs", "tiny.yaml")
SHARD = "__0_0.distcp"  # rank 0's DCP file


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    from megalite.parallel.dims import ParallelDims
    from megalite.trainer.loop import Trainer

    run = str(tmp_path_factory.mktemp("ckpt") / "run")
    cfg = tiny_config(run, data_cache, "--train.steps=4", "--checkpoint.interval=2",
                      "--checkpoint.keep=0", "--train.eval_iters=1")
    Trainer(cfg, ParallelDims.single()).fit()
    return run


def _copy(trained, tmp_path) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(trained, run)
    return run


def _cli(capsys, command, run, data_cache, *extra):
    argv = [command]
    if command not in ("generate", "checkpoint"):
        argv += ["--config", TINY, f"--run.dir={run}", f"--data.cache_dir={data_cache}",
                 "--run.tensorboard=false", "--run.sample_tokens=0", "--parallel.backend=gloo",
                 "--train.eval_iters=1", "--train.steps=6"]
    code = main(argv + list(extra))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(code, err, *needles):
    assert code == 2, (code, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in needles), lines[0]


def _rewrite_manifest(step_path: str, name: str) -> None:
    """What an adversary who can write the shard can also do: make meta.json agree with it."""
    meta_file = os.path.join(step_path, "meta.json")
    meta = json.load(open(meta_file))
    data = open(os.path.join(step_path, name), "rb").read()
    meta["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    json.dump(meta, open(meta_file, "w"))


class _Exec:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_poisoned_files_never_run_code(trained, tmp_path, data_cache, capsys):
    """Pickled code in DCP's ``.metadata`` (which DCP itself would ``pickle.load``) and in a
    shard of the per-layout format, each with a manifest rewritten to match, under resume,
    eval and generate: refused, never run."""
    run = _copy(trained, tmp_path)
    step = os.path.join(run, "checkpoints", "step_00000004")
    marker = str(tmp_path / "code-ran")
    payload = pickle.dumps({"model": _Exec(marker), "step": 4}, protocol=2)
    pickle.loads(payload)  # the poison works: a plain unpickling runs it
    assert os.path.exists(marker)
    os.remove(marker)
    with open(os.path.join(step, ".metadata"), "wb") as f:
        f.write(payload)
    # the manifest still describes the real file: refused by its size before any rank starts
    code, _, err = _cli(capsys, "train", run, data_cache)
    _one_error_line(code, err, f"{step}/.metadata", "bytes", "meta.json records")
    _rewrite_manifest(step, ".metadata")
    for command, extra in (("train", ()), ("eval", ()), ("generate", ("--checkpoint", run))):
        code, _, err = _cli(capsys, command, run, data_cache, *extra)
        _one_error_line(code, err, f"{step}/.metadata", "exec", "not DCP metadata")
        assert not os.path.exists(marker), command
    # a checkpoint of the per-layout format (torch.save shards, meta.json without a manifest)
    meta = json.load(open(os.path.join(step, "meta.json")))
    for key in ("format", "files", "items"):
        meta.pop(key)
    meta["zero"] = {"shards": 1, "bucket_mb": meta["config"]["parallel"]["bucket_mb"],
                    "grad_dtype": "float32"}  # what the format-1 writer recorded
    json.dump(meta, open(os.path.join(step, "meta.json"), "w"))
    with open(os.path.join(step, "model_tp00_pp00.pt"), "wb") as f:
        f.write(payload)
    for command, extra in (("train", ()), ("eval", ()), ("generate", ("--checkpoint", run))):
        code, _, err = _cli(capsys, command, run, data_cache, *extra)
        _one_error_line(code, err, f"{step}/model_tp00_pp00.pt", "cannot be loaded safely")
        assert not os.path.exists(marker), command
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [
        "latest", "step_00000002", "step_00000004"]


@pytest.mark.parametrize("damage", ["truncated", "emptied", "overwritten", "cut meta.json"])
def test_damaged_checkpoint_is_one_line_naming_the_file(trained, tmp_path, data_cache, capsys,
                                                        damage):
    run = _copy(trained, tmp_path)
    step = os.path.join(run, "checkpoints", "step_00000004")
    name = "meta.json" if damage == "cut meta.json" else SHARD
    path = os.path.join(step, name)
    data = open(path, "rb").read()
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "emptied":
        data = b""
    elif damage == "overwritten":  # same size, other bytes of an item's tensor: only a CRC tells
        at = json.load(open(os.path.join(step, "meta.json")))["blocks"][f"{SHARD}@0"][0] + 10
        data = data[:at] + bytes(b ^ 0x5A for b in data[at:at + 100]) + data[at + 100:]
    else:
        data = data[:len(data) // 3]
    with open(path, "wb") as f:
        f.write(data)
    code, _, err = _cli(capsys, "train", run, data_cache)
    why = {"truncated": "bytes", "emptied": "bytes", "overwritten": "CRC-32",
           "cut meta.json": "cannot be read"}[damage]
    _one_error_line(code, err, path, why)
    if damage == "overwritten":  # found by the rank reading the item, or before ranks start
        assert "fails the CRC-32 check of block 0 of its item at byte 0" in err, err
        code, _, err = _cli(capsys, "train", run, data_cache, "--checkpoint.verify=full")
        _one_error_line(code, err, path, "fails its CRC-32 check against meta.json")
    code, _, err = _cli(capsys, "eval", run, data_cache)
    _one_error_line(code, err, path, why)
    code, _, err = _cli(capsys, "checkpoint", run, data_cache, "verify", step)
    _one_error_line(code, err, path, why)
    assert os.listdir(step) and open(path, "rb").read() == data  # nothing removed or rewritten


def test_verify_checks_every_byte(trained, capsys):
    code = main(["checkpoint", "verify", trained])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"ok: {trained}/checkpoints/step_00000004: "), out


def test_dangling_latest_resumes_newest_complete_with_a_warning(trained, tmp_path, data_cache,
                                                                capsys):
    run = _copy(trained, tmp_path)
    ckpts = os.path.join(run, "checkpoints")
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write("step_00000009")
    code, out, err = _cli(capsys, "train", run, data_cache)
    assert code == 0, err[-2000:]
    assert err.strip().splitlines() == [
        f"warning: {ckpts}/latest names step_00000009, which does not exist; resuming from the "
        f"newest complete checkpoint {ckpts}/step_00000004"]
    assert f"resumed from {ckpts}/step_00000004 at step 4" in out
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # continued, not restarted
    # no complete checkpoint behind a dangling pointer: an error, never a fresh start
    for name in os.listdir(ckpts):
        if name.startswith("step_"):
            shutil.rmtree(os.path.join(ckpts, name))
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write("step_00000009")
    code, _, err = _cli(capsys, "train", run, data_cache)
    _one_error_line(code, err, f"{ckpts}/latest", "step_00000009", "no complete checkpoint")


def test_resume_off_and_model_mismatch_refused(trained, tmp_path, data_cache, capsys,
                                              monkeypatch):
    run = _copy(trained, tmp_path)
    ckpts = os.path.join(run, "checkpoints")
    before = sorted(os.listdir(ckpts))
    code, _, err = _cli(capsys, "train", run, data_cache, "--checkpoint.resume=false")
    _one_error_line(code, err, "checkpoint.resume=false", ckpts, "step_00000004", "--run.dir")
    assert sorted(os.listdir(ckpts)) == before
    assert open(os.path.join(ckpts, "latest")).read() == "step_00000004"
    from megalite.trainer import objective

    prepared = []  # the refusal comes from the trainer, built on the data the CLI prepared
    prepare = objective.prepare
    monkeypatch.setattr(objective, "prepare", lambda cfg: prepared.append(1) or prepare(cfg))
    code, _, err = _cli(capsys, "train", run, data_cache, "--model.hidden_size=32",
                        "--model.num_layers=3")
    _one_error_line(code, err, "num_layers=2 there, 3 here", "hidden_size=64 there, 32 here",
                    "--run.dir")
    assert len(prepared) == 1


def test_another_tokenizer_refused_on_resume_and_init_from(trained, tmp_path, data_cache,
                                                          capsys):
    """The run trained with the bytes tokenizer (synthetic data: 257 ids). Its manifest is made
    to say what a run with a 257-id tokenizer.json would have recorded (the synthetic corpus
    comes only in bytes): every parameter keeps its shape, so only the tokenizer fingerprint
    tells. Resume and checkpoint.init_from name the differing fields and the ways out, exit 2,
    before training."""
    run = _copy(trained, tmp_path)
    step = os.path.join(run, "checkpoints", "step_00000004")
    meta_file = os.path.join(step, "meta.json")
    meta = json.load(open(meta_file))
    with open(os.path.join(step, "tokenizer.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert meta["tokenizer"] == {"kind": "bytes", "vocab_size": 257, "eod_id": 256,
                                 "sha256": digest}
    meta["tokenizer"] = {"kind": "tokenizer.json", "vocab_size": 257, "eod_id": 0,
                         "sha256": "ab" * 32}
    json.dump(meta, open(meta_file, "w"))
    code, _, err = _cli(capsys, "train", run, data_cache)
    _one_error_line(code, err, f"{step} was trained with another tokenizer",
                    "tokenizer kind=tokenizer.json there, bytes here",
                    "tokenizer eod_id=0 there, 256 here",
                    f"tokenizer sha256=abababababab there, {digest[:12]} here",
                    f"--data.tokenizer={step}/tokenizer.json", "--run.dir")
    code, _, err = _cli(capsys, "train", str(tmp_path / "new"), data_cache,
                        f"--checkpoint.init_from={run}")
    _one_error_line(code, err, f"checkpoint.init_from={run}", "another tokenizer",
                    "tokenizer kind=tokenizer.json there, bytes here", "data.tokenizer")
    assert not os.path.exists(os.path.join(tmp_path, "new", "checkpoints"))


def test_old_format_at_another_layout_says_how(trained, tmp_path, data_cache, capsys):
    """Checkpoints of the per-layout format (before DCP) resume only at their own layout: their
    optimizer state is that layout's flat ZeRO buckets. Saved at tp=2 and resumed at tp=1, or
    weights only (what `megalite convert --from hf` writes), the one line names
    checkpoint.init_from — which does start this layout from the weights."""
    from megalite.interop.full_state import save_full_model_state
    from megalite.trainer.inference import load_for_inference

    run = _copy(trained, tmp_path)
    step = os.path.join(run, "checkpoints", "step_00000004")
    meta = json.load(open(os.path.join(step, "meta.json")))
    for key in ("format", "files", "items", "blocks"):
        meta.pop(key)
    meta["layout"] = {"dp": 1, "tp": 2, "pp": 1}
    json.dump(meta, open(os.path.join(step, "meta.json"), "w"))
    code, _, err = _cli(capsys, "train", run, data_cache)
    _one_error_line(code, err, f"{step} is in megalite's per-layout format", "tp=2 pp=1",
                    "this run is tp=1 pp=1", "resume it once at its own layout",
                    f"--checkpoint.init_from={step}")
    model, _ = load_for_inference(trained)
    weights = str(tmp_path / "weights")
    path = save_full_model_state(os.path.join(weights, "checkpoints"), model.args,
                                 dict(model.named_parameters()),
                                 os.path.join(trained, "checkpoints", "step_00000004",
                                              "tokenizer.json"))
    code, _, err = _cli(capsys, "train", weights, data_cache)
    _one_error_line(code, err, f"{path} holds model weights only", "no optimizer state",
                    f"--checkpoint.init_from={path}", "--run.dir")
    code, _, err = _cli(capsys, "train", str(tmp_path / "fresh"), data_cache,
                        f"--checkpoint.init_from={path}", "--train.steps=2")
    assert code == 0, err[-2000:]


def test_keep_prunes_only_this_runs_checkpoints(trained, tmp_path, data_cache, capsys):
    """step 2 carries no run id (as written by another run, or before run ids): resumed with
    keep=1 to step 8 (saves at 6 and 8), only this run's 4 and 6 go."""
    run = _copy(trained, tmp_path)
    ckpts = os.path.join(run, "checkpoints")
    meta_file = os.path.join(ckpts, "step_00000002", "meta.json")
    meta = json.load(open(meta_file))
    del meta["run_id"]
    json.dump(meta, open(meta_file, "w"))
    code, _, err = _cli(capsys, "train", run, data_cache, "--train.steps=8",
                        "--checkpoint.keep=1", "--checkpoint.interval=2")
    assert code == 0, err[-2000:]
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000002", "step_00000008"]


def _mount_tmpfs(path: str, size: int) -> bool:
    os.makedirs(path)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                           capture_output=True)
    except OSError:  # no mount command
        return False
    return r.returncode == 0


def test_full_disk_keeps_previous_checkpoint(trained, tmp_path, data_cache, capsys,
                                             monkeypatch):
    """A disk with room for one checkpoint and a half: the save at step 2 fits, the one at 4
    does not. Where mounting is not allowed, the second save's write fails with ENOSPC."""
    from megalite.checkpoint import sharded
    from megalite.trainer import checkpoint

    one = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
              os.walk(os.path.join(trained, "checkpoints", "step_00000002")) for f in fs)
    ckpts = str(tmp_path / "disk")
    mounted = _mount_tmpfs(ckpts, one * 3 // 2)
    if not mounted:
        real, calls = sharded.save_entries, []

        def full(directory, *args):
            calls.append(directory)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(directory, *args)
        monkeypatch.setattr(sharded, "save_entries", full)
    try:
        run = str(tmp_path / "run")
        code, _, err = _cli(capsys, "train", run, data_cache, "--train.steps=4",
                            "--checkpoint.interval=2", f"--checkpoint.dir={ckpts}")
        _one_error_line(code, err, "no space left on device", "step_00000002", "intact")
        assert sorted(os.listdir(ckpts)) == ["latest", "step_00000002"]  # no .tmp_step_* left
        assert open(os.path.join(ckpts, "latest")).read() == "step_00000002"
        path = os.path.join(ckpts, "step_00000002")
        meta = checkpoint.read_meta(path)
        assert meta["step"] == 2 and checkpoint.is_complete(path)
        for name in meta["files"]:
            checkpoint.verify_file(path, name, meta)  # every byte as written
    finally:
        if mounted:
            subprocess.run(["umount", ckpts], check=True)


_SLOW_WRITER = """
import sys, time
sys.path.insert(0, {tests!r})
from helpers import tiny_config, train
from megalite.checkpoint import sharded

real = sharded.save_entries

def slow(directory, *args, **kwargs):  # a slow disk: step 4's write is stuck after its data
    out = real(directory, *args, **kwargs)
    if directory.endswith("step_00000004"):
        open({marker!r}, "w").close()
        time.sleep(120)
    return out

sharded.save_entries = slow
train(tiny_config({run!r}, {cache!r}, *{args!r}), distributed=False)
"""


def test_sigkill_during_async_write_keeps_latest_complete(tmp_path, data_cache):
    """SIGKILL while an asynchronous save is being written (its data on disk, not yet renamed):
    `latest` still names the previous, complete checkpoint, and resuming from it gives the
    uninterrupted run's losses exactly. The killed save's temporary directory is removed when
    the run starts again (checkpoint.save also removes any before it writes); checkpoints
    stay."""
    from megalite.trainer import checkpoint

    args = ["--train.steps=6", "--checkpoint.interval=2", "--checkpoint.keep=0",
            "--train.eval_iters=1"]
    run, marker = str(tmp_path / "run"), str(tmp_path / "writing")
    script = _SLOW_WRITER.format(tests=os.path.join(REPO, "tests"), marker=marker, run=run,
                                 cache=data_cache, args=args + ["--checkpoint.async_save=true"])
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(marker), proc.poll()
    finally:
        proc.kill()
        proc.wait()
    ckpts = os.path.join(run, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read() == "step_00000002"
    assert ".tmp_step_00000004" in os.listdir(ckpts)  # the write the kill cut short
    checkpoint.verify_all(os.path.join(ckpts, "step_00000002"))  # every byte as written
    # as if cut at a step the resumed run never saves (it rewrites a same-step one anyway)
    os.rename(os.path.join(ckpts, ".tmp_step_00000004"),
              os.path.join(ckpts, ".tmp_step_00000005"))
    from megalite.parallel.dims import ParallelDims
    from megalite.trainer.loop import Trainer

    started = Trainer(tiny_config(run, data_cache, *args), ParallelDims.single())
    started.maybe_resume()  # start-up: the stale directory goes, before any save
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000002"]
    _, resumed = train(tiny_config(run, data_cache, *args), distributed=False)
    _, reference = train(tiny_config(str(tmp_path / "ref"), data_cache, *args),
                         distributed=False)
    assert resumed.losses == reference.losses[2:]
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000002", "step_00000004",
                                         "step_00000006"]
