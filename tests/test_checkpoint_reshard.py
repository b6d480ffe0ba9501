"""A checkpoint saved at one layout resumes at another, optimizer state included, and the
losses that follow equal those of continuing in the original layout.

Every run trains the same 8 steps of the same global batch (8 samples) and saves at step 4; a
resumed run starts from a copy of another layout's step-4 checkpoint. Pairs:
- dp2 x tp2 x pp2 ZeRO-3 (8 ranks) -> dp4 ZeRO-1 (4 ranks);
- tp1 (one process) -> dp2 x tp2 and -> tp4 (vocabulary padded differently at each tp);
- dp2 x pp2 zb-h1 ZeRO-3 with the optimizer offloaded -> pp1 ZeRO-0 (one process);
- interleaved dp2 x pp2 (virtual_stages=2) -> pp4 1F1B, and that run's step-8 checkpoint ->
  pp1 (one process): 4 layers, 10 steps;
exact resumes (bit for bit) at dp2 x tp2 and at dp2 x pp2 zb-h1 in their own layout;
and the dp2 x tp2 x pp2 checkpoint evaluated from one process (eval's loader and generate's
whole-model loader) equals that run's own validation loss. The tp1 and dp2 x pp2 sources save
asynchronously (checkpoint.async_save: a writer thread, on its own gloo group in the 4-rank
world), so those pairs also resume from asynchronous saves. Two spawned worlds, 8 and 4 ranks.

Tolerance: fp32 layouts differ only in the order partial sums are added (all-reduce vs
reduce-scatter, TP partial products), a relative 1e-7 effect per step; over 4 Adam steps the
losses stay within 1e-5 (tests/test_zero.py, test_train_dp.py hold each layout to it against
the single process). A wrong resharding (a box read from the wrong offset, moments lost, a
transposed TP slice) moves the loss by > 1e-2.
"""
from __future__ import annotations

import os
import shutil

import pytest

from distributed import run_distributed
from helpers import max_abs_diff, tiny_config, train

STEPS, SAVE, GLOBAL = 8, 4, 8
TOL = 1e-5
# the pipeline chain (interleaved -> pp4 -> pp1): 4 layers (one per stage or chunk), 10 steps,
# so that pp4, resumed at step 4, saves at 8 with 2 steps left for pp1
LAYERS4 = ("--model.num_layers=4", "--train.steps=10")


def _cfg(run, cache, dp, *extra):
    return tiny_config(run, cache, f"--parallel.dp={dp}", "--train.micro_batch_size=1",
                       f"--train.grad_accum={GLOBAL // dp}", f"--train.steps={STEPS}",
                       "--train.eval_iters=1", "--checkpoint.keep=0",
                       f"--checkpoint.interval={SAVE}", *extra)


def _resume_copy(src_run: str, dst_run: str, step: int = SAVE) -> None:
    """dst_run starts from src_run's step-``step`` checkpoint (its `latest`)."""
    name = f"step_{step:08d}"
    os.makedirs(os.path.join(dst_run, "checkpoints"))
    shutil.copytree(os.path.join(src_run, "checkpoints", name),
                    os.path.join(dst_run, "checkpoints", name))
    with open(os.path.join(dst_run, "checkpoints", "latest"), "w") as f:
        f.write(name)


def _world8(tmp, cache):
    trainer, result = train(_cfg(f"{tmp}/x", cache, 2, "--parallel.tp=2", "--parallel.pp=2",
                                 "--parallel.zero_stage=3"), distributed=True)
    return result.losses, result.val_loss, _written(trainer, f"{tmp}/x/checkpoints")


def _written(trainer, ckpts: str):
    """(bytes of this rank's DCP file, bytes and number of the boxes it owns, its stored
    items) of the last checkpoint."""
    import json

    from megalite.trainer import checkpoint

    rank = trainer.dims.rank
    path = os.path.join(ckpts, f"step_{STEPS:08d}")
    boxes = [t for e in checkpoint.state_entries(trainer.engine.table,
                                                 trainer.opt.state_dict()).values()
             if not e.replica for t in e.tensors]
    meta = json.load(open(os.path.join(path, "meta.json")))
    items = sum(key.startswith(f"__{rank}_") for key in {**meta["blocks"], **meta["items"]})
    return (os.path.getsize(os.path.join(path, f"__{rank}_0.distcp")),
            sum(t.numel() * t.element_size() for t in boxes), len(boxes), items)


def _world4(tmp, cache):
    import threading
    import time

    import torch

    out = {}
    trainer, result = train(_cfg(f"{tmp}/x_dp4", cache, 4, "--parallel.zero_stage=1"), True)
    out["x_dp4"] = (trainer.step, result.losses)
    out["x_dp4_read"] = (trainer.bytes_read, _needed(trainer, f"{tmp}/x"))
    for tp, dp in ((2, 2), (4, 1)):  # tp2 also saves at step 6, for its exact resume
        trainer, result = train(_cfg(f"{tmp}/ref_tp{tp}", cache, dp, f"--parallel.tp={tp}",
                                     f"--checkpoint.interval={6 if tp == 2 else SAVE}"), True)
        out[f"ref_tp{tp}"] = (trainer.step, result.losses)
        out[f"ref_tp{tp}_read"] = (trainer.bytes_read, _needed(trainer, f"{tmp}/ref"))
    p_cfg = ("--parallel.pp=2", "--parallel.schedule=zb-h1", "--parallel.zero_stage=3",
             "--parallel.offload_optimizer=true", "--checkpoint.async_save=true")
    trainer, result = train(_cfg(f"{tmp}/p", cache, 2, *p_cfg), True)
    out["p"] = result.losses
    out["p_saver_group"] = trainer.saver.group is not None and trainer.saver.pending is None
    out["p_writer_ended"] = not any(t.name.startswith("megalite-ckpt") and t.is_alive()
                                    for t in threading.enumerate())  # fit closed its saver
    # exact resume in the same layout: tp2 from its step 6, zb-h1 from its (async) step 4
    torch.distributed.barrier()
    if int(os.environ["RANK"]) == 0:
        _resume_copy(f"{tmp}/ref_tp2", f"{tmp}/ref_tp2_again", step=6)
        _resume_copy(f"{tmp}/p", f"{tmp}/p_again")
    torch.distributed.barrier()
    trainer, result = train(_cfg(f"{tmp}/ref_tp2_again", cache, 2, "--parallel.tp=2"), True)
    out["ref_tp2_again"] = (trainer.step, result.losses)
    trainer, result = train(_cfg(f"{tmp}/p_again", cache, 2, *p_cfg), True)
    out["p_again"] = (trainer.step, result.losses)
    # interleaved dp2 x pp2 (2 chunks per rank) -> pp4 1F1B, which saves the pp4 -> pp1 source
    start = time.perf_counter()
    trainer, result = train(_cfg(f"{tmp}/i", cache, 2, "--parallel.pp=2",
                                 "--parallel.schedule=interleaved",
                                 "--parallel.virtual_stages=2", *LAYERS4), True)
    out["i"] = (len(trainer.model.chunks), result.losses)
    torch.distributed.barrier()
    if int(os.environ["RANK"]) == 0:
        _resume_copy(f"{tmp}/i", f"{tmp}/i_pp4")
    torch.distributed.barrier()
    trainer, result = train(_cfg(f"{tmp}/i_pp4", cache, 1, "--parallel.pp=4", *LAYERS4), True)
    out["i_pp4"] = (trainer.step, result.losses)
    out["i_seconds"] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    tmp = str(tmp_path_factory.mktemp("reshard"))
    _, ref = train(_cfg(f"{tmp}/ref", data_cache, 1, "--checkpoint.async_save=true"),
                   distributed=False)
    world8 = run_distributed(_world8, 8, tmp, data_cache, timeout_s=600)
    x_losses, x_val, _ = world8[0]
    _resume_copy(f"{tmp}/x", f"{tmp}/x_dp4")
    _resume_copy(f"{tmp}/ref", f"{tmp}/ref_tp2")
    _resume_copy(f"{tmp}/ref", f"{tmp}/ref_tp4")
    world4 = run_distributed(_world4, 4, tmp, data_cache, timeout_s=600)
    _resume_copy(f"{tmp}/p", f"{tmp}/p_pp1")
    trainer, p_pp1 = train(_cfg(f"{tmp}/p_pp1", data_cache, 1), distributed=False)
    _resume_copy(f"{tmp}/i_pp4", f"{tmp}/i_pp1", step=8)
    i_trainer, i_pp1 = train(_cfg(f"{tmp}/i_pp1", data_cache, 1, *LAYERS4), distributed=False)
    return {"tmp": tmp, "ref": ref.losses, "x": (x_losses, x_val), "world4": world4,
            "written": [w for _, _, w in world8],
            "p_pp1": (trainer.step, p_pp1.losses), "i_pp1": (i_trainer.step, i_pp1.losses)}


def test_dp2_tp2_pp2_zero3_resumes_at_dp4_zero1(runs):
    x_losses, _ = runs["x"]
    assert max_abs_diff(x_losses, runs["ref"]) < TOL  # the source layout itself is right
    for rank in runs["world4"]:
        step, losses = rank["x_dp4"]
        assert step == STEPS and len(losses) == STEPS - SAVE  # resumed at 4, not restarted
        assert max_abs_diff(losses, x_losses[SAVE:]) < TOL


@pytest.mark.parametrize("pair", ["x_dp4", "ref_tp2", "ref_tp4"])
def test_a_rank_reads_only_the_blocks_its_boxes_need(runs, pair):
    """Resumed at dp4 (from dp2 x tp2 x pp2 ZeRO-3: boxes cut mid-row by ZeRO ranges), at tp2
    and tp4 (from tp1: row ranges and, for row-parallel weights, column halves/quarters of every
    row), each rank reads exactly the CRC blocks holding a byte of its boxes — a block is
    1/256 of an item here (256 B minimum), so what it reads beyond its boxes' bytes is at most
    two partial blocks per contiguous run — and less than the stored items its boxes overlap
    (what reading items whole costs)."""
    for rank in runs["world4"]:
        bytes_read, (needed, blocks, runs_edge, items) = rank[f"{pair}_read"]
        assert bytes_read == blocks, (bytes_read, blocks)
        assert needed <= bytes_read <= needed + runs_edge, (bytes_read, needed, runs_edge)
        assert bytes_read < items, (bytes_read, items)


def test_each_rank_writes_what_it_owns(runs):
    """A rank's file holds its own boxes and nothing else (no replica, no gathered tensor):
    its size is the boxes' bytes plus torch.save's container per stored item (~1.5 KiB of zip
    headers; 2 KiB allowed)."""
    for written, owned, boxes, items in runs["written"]:
        assert items == boxes  # one stored item per owned box, none for a replica
        assert 0 < owned <= written <= owned + 2048 * items, (written, owned, items)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp1_resumes_at_tp2_and_tp4(runs, tp):
    for rank in runs["world4"]:
        step, losses = rank[f"ref_tp{tp}"]
        assert step == STEPS and max_abs_diff(losses, runs["ref"][SAVE:]) < TOL


def test_pp2_zero3_offload_resumes_at_pp1_zero0(runs):
    p_losses = runs["world4"][0]["p"]
    assert all(rank["p_saver_group"] for rank in runs["world4"])  # saved on its own group
    assert all(rank["p_writer_ended"] for rank in runs["world4"])
    step, losses = runs["p_pp1"]
    assert step == STEPS and max_abs_diff(losses, p_losses[SAVE:]) < TOL


def test_tp2_and_zb_h1_resume_bit_exact(runs):
    """Resumed in its own layout — dp2 x tp2 from its step-6 checkpoint; dp2 x pp2 zb-h1
    (ZeRO-3, optimizer offloaded) from its asynchronous step-4 one — a run continues with
    exactly the losses of the uninterrupted run: same reductions in the same order, state and
    data restored bit for bit."""
    for rank in runs["world4"]:
        _, uninterrupted = rank["ref_tp2"]
        step, losses = rank["ref_tp2_again"]
        assert step == STEPS and losses == uninterrupted[6 - SAVE:]
        step, losses = rank["p_again"]
        assert step == STEPS and losses == rank["p"][SAVE:]


def test_interleaved_resumes_at_pp4_1f1b_and_pp4_at_pp1(runs):
    for rank in runs["world4"]:
        chunks, i_losses = rank["i"]
        assert chunks == 2 and len(i_losses) == 10  # the source really ran interleaved
        step, losses = rank["i_pp4"]
        assert step == 10 and max_abs_diff(losses, i_losses[SAVE:]) < TOL
    _, pp4_losses = runs["world4"][0]["i_pp4"]
    step, losses = runs["i_pp1"]
    assert step == 10 and max_abs_diff(losses, pp4_losses[8 - SAVE:]) < TOL


def test_tp2_pp2_checkpoint_evaluated_in_one_process(runs, data_cache):
    import torch

    from megalite.parallel.dims import ParallelDims
    from megalite.trainer.inference import load_for_inference
    from megalite.trainer.loop import Trainer

    _, x_val = runs["x"]
    path = os.path.join(runs["tmp"], "x", "checkpoints", f"step_{STEPS:08d}")
    cfg = _cfg(os.path.join(runs["tmp"], "eval"), data_cache, 1)
    trainer = Trainer(cfg, ParallelDims.single(), read_only=True)
    trainer.load_weights(path)
    assert abs(trainer.evaluate() - x_val) < TOL
    # weights only: no optimizer, no AdamW moments (nor masters) beside the parameters
    assert trainer._opt is None and "optimizer" not in trainer.memory()
    model, _ = load_for_inference(path)  # generate's loader: the same weights, whole
    for name, p in model.named_parameters():
        assert p.equal(dict(trainer.model.named_parameters())[name]), name
    # 16-bit parameters: the fp32 masters, cast
    cfg16 = _cfg(os.path.join(runs["tmp"], "eval16"), data_cache, 1, "--train.precision=bf16")
    trainer16 = Trainer(cfg16, ParallelDims.single(), read_only=True)
    trainer16.load_weights(path)
    for name, p in trainer16.model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.equal(dict(model.named_parameters())[name].to(
            torch.bfloat16)), name


def _needed(trainer, run: str):
    """Of the step-4 checkpoint of ``run``, element by element (not by the reader's run and
    block arithmetic): the bytes of this rank's boxes, of the CRC blocks holding them, two
    blocks per contiguous run of them (the most partial blocks can add), and of the stored items
    they overlap."""
    import json

    import torch

    from megalite.checkpoint.storage import SafeReader
    from megalite.trainer import checkpoint

    path = os.path.join(run, "checkpoints", f"step_{SAVE:08d}")
    md = SafeReader(path).read_metadata()
    blocks_of = json.load(open(os.path.join(path, "meta.json")))["blocks"]
    where = {(i.fqn, tuple(i.offset)): info for i, info in md.storage_data.items()}
    needed = blocks = edges = items = 0
    for key, entry in checkpoint.state_entries(trainer.engine.table,
                                               trainer.opt.state_dict()).items():
        element = torch.empty((), dtype=md.state_dict_metadata[key].properties.dtype).element_size()
        for chunk in md.state_dict_metadata[key].chunks:
            info = where[(key, tuple(chunk.offsets))]
            _, block, _ = blocks_of[f"{info.relative_path}@{info.offset}"]
            ids = torch.arange(chunk.sizes.numel()).reshape(chunk.sizes)  # C order
            touched = set()
            for offsets, sizes in entry.boxes:
                lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
                hi = [min(o + n, c + s) for o, n, c, s in
                      zip(offsets, sizes, chunk.offsets, chunk.sizes)]
                if any(a >= b for a, b in zip(lo, hi)):
                    continue
                part = ids[tuple(slice(a - c, b - c) for a, b, c in
                                 zip(lo, hi, chunk.offsets))].flatten()
                needed += part.numel() * element
                touched.update((part * element // block).tolist())
                edges += 2 * block * (1 + int((part[1:] - part[:-1] != 1).sum()))
            size = chunk.sizes.numel() * element
            blocks += sum(min(size, (b + 1) * block) - b * block for b in touched)
            items += info.length if touched else 0
    return needed, blocks, edges, items


def test_fp16_resume_is_exact_with_its_loss_scaler(tmp_path, data_cache):
    """The loss scaler lives in meta.json (no pickled state): a resumed fp16 run (scale grown
    twice by then) continues bit for bit."""
    cfg = tiny_config(str(tmp_path / "run"), data_cache, "--train.precision=fp16",
                      "--train.steps=6", "--checkpoint.interval=3", "--checkpoint.keep=0",
                      "--train.eval_iters=1", "--train.initial_loss_scale=1024",
                      "--train.loss_scale_window=1")
    first_trainer, first = train(cfg, distributed=False)
    with open(tmp_path / "run" / "checkpoints" / "latest", "w") as f:
        f.write("step_00000003")
    trainer, second = train(cfg, distributed=False)
    assert second.losses == first.losses[3:]
    assert trainer.scaler.state_dict() == first_trainer.scaler.state_dict()
    assert trainer.scaler.scale > 1024  # the scale the checkpoint carried, grown on


def test_resume_with_another_global_batch_continues_by_consumed_samples(tmp_path, data_cache,
                                                                         monkeypatch, capsys):
    """Saved at step 4 with a global batch of 2, resumed with 4 (grad_accum 2 -> 4): the
    resumed steps read exactly the next samples by sample number (4*2 .. 4*2 + 2*4), with one
    warning, and the next checkpoint records the samples consumed in both runs."""
    import json

    import megalite.trainer.objective as objective  # where the trainer takes micro-batches

    run = str(tmp_path / "run")
    common = ("--train.micro_batch_size=1", "--train.eval_iters=1", "--checkpoint.keep=0",
              "--checkpoint.interval=2")
    train(tiny_config(run, data_cache, "--train.grad_accum=2", "--train.steps=4", *common),
          distributed=False)
    seen = []  # (sample number, inputs) of every training micro-batch after the resume

    def recording(dataset, step, micro, dp_rank, mbs, ga, dp, start=None):
        x, y = real(dataset, step, micro, dp_rank, mbs, ga, dp, start)
        first = (step * mbs * ga * dp if start is None else start) + (dp_rank * ga + micro) * mbs
        seen.extend((first + i, row) for i, row in enumerate(x))
        return x, y

    real = objective.micro_batch
    monkeypatch.setattr(objective, "micro_batch", recording)
    capsys.readouterr()
    trainer, result = train(tiny_config(run, data_cache, "--train.grad_accum=4",
                                        "--train.steps=6", *common), distributed=False)
    err = capsys.readouterr().err
    assert err.count("global batch of 2 samples, this run's is 4") == 1, err
    assert trainer.step == 6 and len(result.losses) == 2
    assert all(0 < loss < 20 for loss in result.losses)  # it trains
    train_seen = seen[:2 * 4]  # then the validation batch (its own dataset, from sample 0)
    assert [i for i, _ in train_seen] == list(range(8, 16))
    for i, row in train_seen:  # the dataset's samples 8..15, nothing else
        assert row.equal(torch_row(trainer.train_ds[i][:-1]))
    meta = json.load(open(os.path.join(run, "checkpoints", "step_00000006", "meta.json")))
    assert (meta["consumed_samples"], meta["global_batch_size"]) == (16, 4)


def torch_row(values):
    import torch

    return torch.from_numpy(values)
