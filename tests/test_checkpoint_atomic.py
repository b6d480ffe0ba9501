"""Checkpoint writes that must be atomic and reads that must not repeat, in one process (no
world): a weights-only checkpoint (``save_full_model_state``, what ``convert --from hf``
writes) that fails at any fsync or rename leaves no half checkpoint and ``latest`` as it was;
reading a sharded checkpoint's full tensors (``convert --to hf``) unpickles ``.metadata``
once."""
from __future__ import annotations

import dataclasses
import errno
import os
import zlib

import pytest
import torch

from megalite.interop.full_state import load_full_model_state, save_full_model_state
from megalite.models import CausalLM, ModelArgs


def _model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelArgs(family="gpt", num_layers=1, hidden_size=16, num_heads=2,
                              num_kv_heads=2, ffn_hidden_size=32, vocab_size=40, max_seq_len=8,
                              norm_eps=1e-5, rope_theta=1e4, dropout=0.0,
                              tie_embeddings=True, init_std=0.02))


def _sharded_save(directory: str):
    """(path, {name: tensor}) of a one-process format-2 save of ``_model()``'s weights as
    masters (``checkpoint.save``)."""
    from megalite.parallel.dims import ParallelDims
    from megalite.trainer import checkpoint
    from megalite.zero.state import ShardEntry

    model = _model()
    state = {k: p.detach() for k, p in model.named_parameters()}
    entries = {f"master/{k}": ShardEntry(tuple(p.shape), [((0,) * p.dim(), tuple(p.shape))], [p])
               for k, p in state.items()}
    return checkpoint.save(directory, 1, ParallelDims.single(), entries,
                           {"model_args": dataclasses.asdict(model.args)}), state


def test_failed_weights_save_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """Fail the k-th ``os.fsync``/``os.replace`` of a save, for every k a save makes: the error
    reaches the caller, nothing but a complete ``step_00000000`` may appear beside the previous
    checkpoint, and ``latest`` still names the previous one (the new one only when the failure
    is the last fsync, of the directory after ``latest`` was renamed)."""
    model = _model()
    state, tokenizer = dict(model.named_parameters()), tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    calls = []
    real = {"fsync": os.fsync, "replace": os.replace}

    def counted(kind):
        def call(*a):
            calls.append(kind)
            if len(calls) == fail_at:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return real[kind](*a)
        return call

    monkeypatch.setattr(os, "fsync", counted("fsync"))
    monkeypatch.setattr(os, "replace", counted("replace"))
    fail_at = 0
    clean = save_full_model_state(str(tmp_path / "clean"), model.args, state, str(tokenizer))
    num_calls, written = len(calls), sorted(os.listdir(clean))
    last_replace = len(calls) - calls[::-1].index("replace")
    assert num_calls >= 6 and calls.count("replace") == 3, calls  # meta.json, the dir, latest
    for fail_at in range(1, num_calls + 1):
        calls.clear()
        ckpt = tmp_path / f"fail{fail_at}"
        os.makedirs(ckpt / "step_00000007")
        (ckpt / "latest").write_text("step_00000007")
        with pytest.raises(OSError, match="injected"):
            save_full_model_state(str(ckpt), model.args, state, str(tokenizer))
        left = sorted(os.listdir(ckpt))
        assert left in (["latest", "step_00000007"],
                        ["latest", "step_00000000", "step_00000007"]), (fail_at, left)
        moved = fail_at > last_replace  # failed fsyncing the directory after `latest` moved
        assert (ckpt / "latest").read_text() == f"step_0000000{0 if moved else 7}", fail_at
        if "step_00000000" in left:  # renamed into place: complete, only `latest` not moved
            assert sorted(os.listdir(ckpt / "step_00000000")) == written, fail_at
            _, loaded, _ = load_full_model_state(str(ckpt / "step_00000000"))
            for name, value in state.items():
                torch.testing.assert_close(loaded[name], value, atol=0, rtol=0)
    assert (tmp_path / "clean" / "latest").read_text() == "step_00000000"


def test_full_state_of_a_sharded_checkpoint_reads_its_metadata_once(tmp_path, monkeypatch):
    """A format-2 save records each file's CRC and each item's block CRCs (no item CRC: the
    blocks check every byte a load reads) from one read of its files: the file CRCs equal
    reading each again. Exporting it reads one parameter at a time: ``.metadata`` is checked
    and unpickled once for all of them, and every tensor comes back bit-exact."""
    from megalite.checkpoint import storage
    from megalite.trainer import checkpoint

    path, state = _sharded_save(str(tmp_path))
    # the save's one read of its files gave the same CRCs as reading each file and item again
    meta = checkpoint.read_meta(path)
    assert checkpoint.verify_all(path) == (len(meta["files"]), sum(
        os.path.getsize(os.path.join(path, name)) for name in meta["files"]))
    stored = storage.SafeReader(path).read_metadata().storage_data.values()
    assert len(stored) == len(state)  # every item read by its blocks: no item CRC beside
    assert sorted(meta["blocks"]) == sorted(storage.item_key(i.relative_path, i.offset)
                                            for i in stored) and meta["items"] == {}
    unpickled = []
    load = storage._MetadataUnpickler.load
    monkeypatch.setattr(storage._MetadataUnpickler, "load",
                        lambda self: unpickled.append(1) or load(self))
    _, loaded, _ = load_full_model_state(path)
    assert len(loaded) == len(state) > 5
    for name, value in state.items():
        torch.testing.assert_close(loaded[name], value, atol=0, rtol=0)
    assert len(unpickled) == 1


def test_items_without_block_records_are_read_whole_and_checked(tmp_path):
    """Items with no block record in meta.json — every item of the format-2 checkpoints saved
    before block CRCs existed (43409ae to 4d5455e: ``items`` held each item's CRC-32, no
    ``blocks``), today an item whose raw bytes ``describe_item`` cannot locate — are read
    whole and checked against their item CRC-32: bit-exact; one flipped byte of an item is
    refused, naming the file."""
    import json

    from megalite.checkpoint import storage
    from megalite.interop.full_state import CheckpointReadError
    from megalite.trainer import checkpoint

    path, state = _sharded_save(str(tmp_path))
    meta = checkpoint.read_meta(path)
    stored = list(storage.SafeReader(path).read_metadata().storage_data.values())
    items = {}
    for info in stored:  # what the writer before block records stored (storage.item_crcs)
        with open(os.path.join(path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            items[storage.item_key(info.relative_path, info.offset)] = zlib.crc32(
                f.read(info.length))
    meta.pop("blocks")
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(dict(meta, items=items), f)
    _, loaded, _ = load_full_model_state(path)
    for name, value in state.items():
        torch.testing.assert_close(loaded[name], value, atol=0, rtol=0)
    info = max(stored, key=lambda i: i.length)  # a byte in the middle of the largest item
    shard = os.path.join(path, info.relative_path)
    with open(shard, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    _, loaded, _ = load_full_model_state(path)
    with pytest.raises(CheckpointReadError, match=f"{shard} fails the CRC-32 check of its item"):
        [loaded[name] for name in state]


def test_full_weights_reach_the_model_by_the_optimizers_path(tmp_path, data_cache):
    """Full per-parameter weights of a per-layout checkpoint (a weights-only one, as `convert
    --from hf` writes) reach the model by the optimizer's own path (``publish_masters``):
    eval's ``load_weights`` with fp32 and with bf16 parameters, and ``ShardedAdamW.load`` (a
    per-layout resume) whose fp32 masters hold the weights exactly."""
    from helpers import tiny_config
    from megalite.parallel.dims import ParallelDims
    from megalite.trainer.loop import Trainer

    def trainer(precision, read_only):
        cfg = tiny_config(str(tmp_path / "run"), data_cache, f"--train.precision={precision}",
                          "--train.steps=2")
        return Trainer(cfg, ParallelDims.single(), read_only=read_only)

    t = trainer("fp32", read_only=True)
    gen = torch.Generator().manual_seed(0)
    values = {n: torch.randn(p.shape, generator=gen) for n, p in t.model.named_parameters()}
    path = save_full_model_state(str(tmp_path / "weights"), t.args, values)
    for t in (t, trainer("bf16", read_only=True)):
        t.load_weights(path)
        for name, p in t.model.named_parameters():
            assert p.equal(values[name].to(p.dtype)), name
    t = trainer("bf16", read_only=False)
    t.opt.load(values, None)
    for name, p in t.model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.equal(values[name].to(p.dtype)), name
    for g, master in zip(t.engine.groups, t.opt.masters):
        assert master.dtype == torch.float32 and master.equal(t.engine.owned_slice(g, values))
