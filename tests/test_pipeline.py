"""Pipeline parallelism against the single-process model.

For PP in {2, 4} and every schedule (interleaved with v = 2): loss and every parameter gradient
of one global batch equal the unsplit model's; 20 training steps give the same losses; tied
embeddings stay equal across stages; zb-h1's weight gradients appear only in its W pass;
resume and generation work (generation on the training's p2p groups, creating none); and
dp=2 x pp=2 x tp=2 matches the single process.

Tolerance (fp32): stages compute exactly the same ops as the unsplit model (the split only moves
where they run), so differences come from gradient accumulation order: 1e-5 on losses and
gradients is ~100x the observed spread and far below a wrong micro-batch or a lost gradient.
"""
from __future__ import annotations

import os

import pytest
import torch

from distributed import run_distributed
from helpers import max_abs_diff, tiny_config, train

STEPS, LAYERS, MICRO = 20, 8, 4
SCHEDULES = ["gpipe", "1f1b", "interleaved", "zb-h1"]


def _sched_args(schedule):
    v = 2 if schedule == "interleaved" else 1
    return [f"--parallel.schedule={schedule}", f"--parallel.virtual_stages={v}"]


def _cfg(run, cache, *extra):
    return tiny_config(run, cache, f"--model.num_layers={LAYERS}", "--train.micro_batch_size=1",
                       f"--train.grad_accum={MICRO}", f"--train.steps={STEPS}",
                       "--train.eval_iters=1", "--checkpoint.keep=0", *extra)


def _one_batch_gradients(dims, schedule, family):
    """Loss and gradients of one global batch through the schedule vs the unsplit model."""
    from megalite.config.schema import ModelConfig, ParallelConfig
    from megalite.models import build_model, lm_loss, resolve_model_args
    from megalite.pipeline import schedules
    from megalite.pipeline.executor import PipelineExecutor
    from megalite.plan import model_plan
    from megalite.tensor_parallel.plan import loss_fn
    from megalite.zero import ZeroEngine

    kv = 2 if family == "llama" else None
    args = resolve_model_args(ModelConfig(family=family, num_layers=LAYERS, hidden_size=32,
                                          num_heads=4, num_kv_heads=kv, max_seq_len=16), 200)
    data = torch.randint(0, 200, (MICRO, 1, 17), generator=torch.Generator().manual_seed(5))
    batches = [{"tokens": data[i, :, :-1], "labels": data[i, :, 1:]} for i in range(MICRO)]
    ref = build_model(args, seed=3)
    ref_loss = sum(lm_loss(ref(b["tokens"]), b["labels"]) / MICRO for b in batches)
    ref_loss.backward()
    v = 2 if schedule == "interleaved" else 1
    engine = ZeroEngine(0, dims, torch.float32, torch.float32,  # main_grad views, as the trainer
                        tied_across_stages=args.tie_embeddings)
    stage = build_model(args, seed=3, plan=model_plan(dims, ParallelConfig(
        pp=dims.pp, schedule=schedule, virtual_stages=v)), materialize=engine.materialize)
    engine.attach(stage)
    actions = schedules.build(schedule, dims.pp, MICRO, dims.pp_rank, v)
    executor = PipelineExecutor(stage, dims, loss_fn(args, dims, reduction="sum"),
                                (1, 16, args.hidden_size),
                                torch.float32, grads=engine)
    trace = []  # zb-h1 on the last stage: (action, does chunk 0's first weight have a grad?)
    if schedule == "zb-h1" and dims.is_last_stage:
        block = stage.layers[str(stage.chunks[0][0])]
        w = block.mlp.fc_in.weight if family == "gpt" else block.mlp.gate_proj.weight
        for method in ("_forward", "_backward_input", "_backward_weight"):
            def traced(a, *rest, run=getattr(executor, method)):
                trace.append((a.kind, a.micro, bool(w.main_grad.abs().sum() > 0)))
                return run(a, *rest)
            setattr(executor, method, traced)
    loss = executor.run(actions, batches)
    engine.finalize_grads()  # with dp = tp = 1: the tied-embedding sum over the two stages
    ref_grads = dict(ref.named_parameters())
    if dims.is_last_stage:
        torch.testing.assert_close(loss.total / loss.tokens, ref_loss.detach(), atol=1e-5,
                                   rtol=0)
    for name, p in stage.named_parameters():
        want = ref_grads.get(name, ref_grads.get("embed.tok.weight")).grad
        torch.testing.assert_close(p.main_grad, want, atol=1e-5, rtol=0,
                                   msg=lambda m: f"{schedule} {family} {name}: {m}")
    return trace, executor.peak_in_flight, schedules.max_in_flight(actions)


def _generate_counting_groups(model, dims):
    """Greedy generation after training, counting what it asks of torch.distributed: groups
    created, plain send/recv calls, and the batched transfers' groups (are they the
    training's ``p2p_groups``?)."""
    from unittest import mock

    import torch.distributed as dist

    from megalite.generate import generate
    from megalite.pipeline.inference import inference_view

    seen = {"new_group": 0, "send_recv": 0, "batches": 0, "other_groups": 0}
    channels = list(dims.p2p_groups.values())

    def counted(name, real):
        def call(*args, **kwargs):
            seen[name] += 1
            return real(*args, **kwargs)
        return call

    def batched(ops, real=dist.batch_isend_irecv):
        seen["batches"] += 1
        seen["other_groups"] += sum(not any(op.group is g for g in channels) for op in ops)
        return real(ops)

    with mock.patch.object(dist, "new_group", counted("new_group", dist.new_group)), \
            mock.patch.object(dist, "send", counted("send_recv", dist.send)), \
            mock.patch.object(dist, "recv", counted("send_recv", dist.recv)), \
            mock.patch.object(dist, "batch_isend_irecv", batched):
        greedy = generate(inference_view(model, dims), [5, 6, 7], 10, temperature=0).tolist()
    return greedy, seen


def _pp_world(tmp, cache):
    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.env import discover

    pp = int(os.environ["WORLD_SIZE"])
    dims = ParallelDims.initialize(1, 1, pp, discover(), "gloo", timeout_s=60)
    out = {"zb": {}, "in_flight": {}}
    for schedule in SCHEDULES:
        for family in ("gpt", "llama"):
            trace, peak, planned = _one_batch_gradients(dims, schedule, family)
            out["in_flight"][schedule] = (peak, planned)
            if trace:
                out["zb"] = trace
    for schedule in SCHEDULES:
        trainer, result = train(_cfg(f"{tmp}/{schedule}", cache, f"--parallel.pp={pp}",
                                     *_sched_args(schedule)), distributed=True)
        out[schedule] = (result.losses, result.val_loss)
    # tied embedding (GPT): the first stage's embedding equals the last stage's head
    stage = trainer.model
    tied = stage.embed.tok.weight if stage.embed is not None else \
        stage.head.output.weight if stage.head is not None else None
    out["tied"] = None if tied is None else tied.detach().clone()
    out["greedy"], out["generate_comm"] = _generate_counting_groups(trainer.model, dims)
    if pp == 2:  # resume: rewind `latest` to step 10 of a run checkpointed there
        cfg = _cfg(f"{tmp}/resume", cache, "--parallel.pp=2", "--checkpoint.interval=10")
        _, first = train(cfg, distributed=True)
        torch.distributed.barrier()
        if dims.rank == 0:
            with open(os.path.join(f"{tmp}/resume", "checkpoints", "latest"), "w") as f:
                f.write("step_00000010")
        torch.distributed.barrier()
        _, second = train(cfg, distributed=True)
        out["resume"] = (first.losses, second.losses)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    from megalite.generate import generate

    tmp = tmp_path_factory.mktemp("pp-ref")
    trainer, result = train(_cfg(str(tmp), data_cache), distributed=False)
    greedy = generate(trainer.model, [5, 6, 7], 10, temperature=0).tolist()
    return result.losses, result.val_loss, greedy


@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_equals_single_process(pp, reference, tmp_path, data_cache):
    ref_losses, ref_val, ref_greedy = reference
    ranks = run_distributed(_pp_world, pp, str(tmp_path), data_cache, timeout_s=400)
    for schedule in SCHEDULES:
        losses, val = ranks[0][schedule]
        assert max_abs_diff(losses, ref_losses) <= 1e-5, (schedule, losses, ref_losses)
        assert abs(val - ref_val) <= 1e-5, schedule
        assert all(r[schedule] == ranks[0][schedule] for r in ranks)  # reported on every rank
    # the last stage's tied head equals the first stage's embedding after 20 steps
    assert torch.equal(ranks[0]["tied"], ranks[-1]["tied"])
    assert all(r["greedy"] == ref_greedy for r in ranks)
    # generation reuses the training's groups: no new group, no plain send/recv (a new NCCL
    # communicator per pair), every transfer on a p2p group (10 tokens: >= 10 batches a rank)
    for r in ranks:
        comm = r["generate_comm"]
        assert comm["new_group"] == comm["send_recv"] == comm["other_groups"] == 0, comm
        assert comm["batches"] >= 10, comm
    # zb-h1: after micro-batch 0's B pass its weight gradient is still absent; after its W
    # pass (seen before the next action) it is there
    trace = ranks[-1]["zb"]
    w0 = trace.index(("W", 0, False))
    assert ("B", 0, False) in trace[:w0] and trace[w0 + 1][2], trace
    # 1F1B keeps at most pp - rank micro-batches in flight; GPipe all of them
    for rank, r in enumerate(ranks):
        assert r["in_flight"]["1f1b"] == (min(pp - rank, MICRO),) * 2, r["in_flight"]
        assert r["in_flight"]["gpipe"][0] == MICRO
    if pp == 2:
        first, second = ranks[0]["resume"]
        assert second == first[10:]


def _three_d_world(tmp, cache):
    _, result = train(_cfg(f"{tmp}/3d", cache, "--parallel.dp=2", "--parallel.pp=2",
                           "--parallel.tp=2", "--parallel.sequence_parallel=true",
                           "--train.grad_accum=2"), distributed=True)
    return result.losses, result.val_loss


def test_3d_dp2_pp2_tp2_equals_single_process(reference, tmp_path, data_cache):
    """8 ranks: the same global batch of 4 (micro 1 x grad_accum 2 x dp 2) as the reference."""
    ref_losses, ref_val, _ = reference
    ranks = run_distributed(_three_d_world, 8, str(tmp_path), data_cache, timeout_s=400)
    for losses, val in ranks:
        assert max_abs_diff(losses, ref_losses) <= 1e-5, (losses, ref_losses)
        assert abs(val - ref_val) <= 1e-5
