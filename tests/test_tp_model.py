"""Tensor (and sequence) parallel GPT / LLaMA against the single-process model.

Each spawned world (TP = world size) checks, for both families, with and without sequence
parallelism, with grouped-query attention (kv heads split at TP=2, replicated at TP=4):
logits and every parameter gradient equal the unsharded model's; the model a run builds
(``megalite.plan.model_plan``) is made of the layers ``bench/tp.py`` measures, its overlapped
column-parallel backward runs once per region, and one forward + backward moves exactly the
collectives the plan's docstring counts; 20 training steps give the same losses and gradient
norms; resume, generation, dropout reproducibility, HF weights loaded into TP, and (at 4 ranks)
DP=2 x TP=2.

Tolerances (fp32): the sharded model sums the same products in another order (partial matmuls
reduced over ranks), a relative ~1e-7 effect per op; 1e-5 absolute on logits/losses of magnitude
~5 and on gradients leaves ~100x margin, while a wrong slice or a missing/duplicated reduction
is off by > 1e-2.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from helpers import max_abs_diff, tiny_config, train

STEPS = 20
LLAMA = ["--model.family=llama", "--model.num_kv_heads=2"]
FAMILIES = {"gpt": [], "llama": LLAMA}


def _args(family: str):
    from megalite.config.schema import ModelConfig
    from megalite.models import resolve_model_args

    kv = 2 if family == "llama" else None
    return resolve_model_args(ModelConfig(family=family, num_layers=2, hidden_size=64,
                                          num_heads=4, num_kv_heads=kv, max_seq_len=32), 250)


def _full(name, tensor, layout, group, full_shape):
    """Gather a sharded parameter (or gradient) back to the unsharded shape."""
    dim = layout.shard_dim.get(name)
    if dim is None:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(layout.tp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim).narrow(dim, 0, full_shape[dim])


def _check_model_equivalence(dims, family: str, sp: bool) -> None:
    from megalite.models import build_model, lm_loss
    from megalite.tensor_parallel.plan import FullLogits, loss_fn, parallelize

    args = _args(family)
    ref = build_model(args, seed=7)
    tp_model = build_model(args, seed=7, plan=lambda m: (m, parallelize(m, dims, sp)))
    tokens = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    x, y = tokens[:, :-1], tokens[:, 1:]
    ref_logits = ref(x)
    lm_loss(ref_logits, y).backward()
    tp_loss = loss_fn(args, dims)(tp_model(x), y)
    tp_loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(FullLogits(tp_model, dims)(x), ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(tp_loss, lm_loss(ref_logits, y), atol=1e-5, rtol=0)
    layout, ref_params = tp_model.shard_layout, dict(ref.named_parameters())
    for name, p in tp_model.named_parameters():
        grad = p.grad.clone()
        if name in layout.partial_grad:
            dist.all_reduce(grad, group=dims.tp_group)
        full = _full(name, grad, layout, dims.tp_group, ref_params[name].shape)
        torch.testing.assert_close(full, ref_params[name].grad, atol=1e-5, rtol=0,
                                   msg=lambda m: f"{family} sp={sp} grad {name}: {m}")
        if name in ("embed.tok.weight", "head.output.weight"):  # padded vocab rows: no gradient
            local_rows = p.shape[0]
            pad_start = args.vocab_size - dims.tp_rank * local_rows
            if pad_start < local_rows:
                assert grad[max(pad_start, 0):].abs().max() == 0, name


def _column_backward_nodes(root) -> list:
    """The autograd nodes of the column-parallel layers' Function reachable from ``root``."""
    seen, stack, found = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_ColumnParallelBackward":
            found.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return found


def _check_trained_layers_and_bytes(dims, family: str) -> None:
    """The model a run trains (``build_model`` with ``megalite.plan.model_plan``) is made of the
    layers ``bench/tp.py`` measures, its column-parallel backward (the one that overlaps its dX
    all-reduce with the dW matmuls) runs once per region, and one forward + backward moves, with
    L layers, tokens N = b*s and A = b*s*h*4 bytes (one fp32 activation):

      without SP: all-reduces, forward 2L (the row exits) + 1 (embedding) + 2 (the loss's MAX of
      [N] and SUM of [2N]) and backward 2L (the column entries) + 1 (the head's column entry);
      every one but the loss's of A bytes;
      with SP: each of those A-sized all-reduces becomes an all-gather or a reduce-scatter
      (entries gather forward and reduce-scatter backward, exits the reverse), so all-gathers
      and reduce-scatters each move the bytes the all-reduces did, and the wire bytes equal.
    """
    from megalite.config.schema import ParallelConfig
    from megalite.models import build_model
    from megalite.plan import model_plan
    from megalite.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                          VocabParallelEmbedding)
    from megalite.tensor_parallel.plan import loss_fn

    args = _args(family)
    L, b, s = args.num_layers, 2, 16
    A, loss_bytes = b * s * args.hidden_size * 4, 3 * b * s * 4
    tokens = torch.randint(0, args.vocab_size, (b, s + 1),
                           generator=torch.Generator().manual_seed(4))
    x, y = tokens[:, :-1], tokens[:, 1:]
    meter, wire = dims.meter, {}
    for sp in (False, True):
        plan = model_plan(dims, ParallelConfig(tp=dims.tp, sequence_parallel=sp))
        model = build_model(args, seed=7, plan=plan)
        kinds = [type(m) for m in model.modules()]
        for m in model.modules():  # every weight matrix is a benchmarked layer's...
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                assert family == "gpt" and m is model.embed.pos, m  # ...but GPT's positions
        assert kinds.count(RowParallelLinear) == 2 * L
        assert kinds.count(ColumnParallelLinear) == (5 if family == "llama" else 4) * L + 1
        assert kinds.count(VocabParallelEmbedding) == 1
        meter.take()
        loss = loss_fn(args, dims)(model(x), y)
        forward = (dict(meter.calls), meter.take(wire=True))
        nodes, ran = _column_backward_nodes(loss.grad_fn), []
        for node in nodes:
            node.register_hook(lambda grad_inputs, grad_outputs: ran.append(1))
        loss.backward()
        backward = (dict(meter.calls), meter.take(wire=True))
        assert len(nodes) == len(ran) == 2 * L + 1  # q/k/v, MLP entry per layer; the head
        if sp:
            assert forward[0] == {"all_gather": 2 * L + 1, "reduce_scatter": 2 * L + 1,
                                  "all_reduce": 2}, forward
            assert backward[0] == {"all_gather": 2 * L + 1, "reduce_scatter": 2 * L + 1}
            for kind in ("all_gather", "reduce_scatter"):
                assert forward[1][kind] == backward[1][kind] == (2 * L + 1) * A
            assert forward[1]["all_reduce"] == loss_bytes
        else:
            assert forward[0] == {"all_reduce": 2 * L + 1 + 2}, forward
            assert backward[0] == {"all_reduce": 2 * L + 1}, backward
            assert forward[1]["all_reduce"] == (2 * L + 1) * A + loss_bytes
            assert backward[1]["all_reduce"] == (2 * L + 1) * A
        wire[sp] = sum(v for d in (forward[1], backward[1]) for k, v in d.items()
                       if k.startswith("wire."))
    # ring traffic: an all-reduce is a reduce-scatter plus an all-gather
    assert abs(wire[True] - wire[False]) <= 2, wire


def _metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _tp_world(tmp, cache):
    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.env import discover

    world = int(os.environ["WORLD_SIZE"])
    dims = ParallelDims.initialize(1, world, 1, discover(), "gloo", timeout_s=60)
    for family in FAMILIES:
        for sp in (False, True):
            _check_model_equivalence(dims, family, sp)
        _check_trained_layers_and_bytes(dims, family)
    out = {}
    for family, extra in FAMILIES.items():
        for sp in (False, True):
            key = f"{family}{'_sp' if sp else ''}"
            run = f"{tmp}/{key}"
            _, result = train(tiny_config(run, cache, f"--parallel.tp={world}",
                                          f"--parallel.sequence_parallel={sp}",
                                          f"--train.steps={STEPS}", "--train.eval_iters=1",
                                          *extra), distributed=True)
            out[key] = {"losses": result.losses, "val": result.val_loss,
                        "grad_norm": [r["grad_norm"] for r in _metrics(run)]}
    if world == 2:
        out.update(_resume_generate_dropout_hf(tmp, cache, dims))
    if world == 4:  # 2-way data parallel x 2-way tensor parallel, same global batch of 4
        _, result = train(tiny_config(f"{tmp}/dp2tp2", cache, "--parallel.dp=2", "--parallel.tp=2",
                                      "--train.micro_batch_size=2", f"--train.steps={STEPS}",
                                      "--train.eval_iters=1", *LLAMA), distributed=True)
        out["dp2tp2"] = result.losses
    return out


def _resume_generate_dropout_hf(tmp, cache, dims):
    from megalite.generate import generate
    from megalite.tensor_parallel.plan import FullLogits

    out = {}
    # resume: a 20-step run checkpointed at 10; rewind `latest` to 10 and run again
    run = f"{tmp}/resume"
    cfg = tiny_config(run, cache, "--parallel.tp=2", f"--train.steps={STEPS}",
                      "--train.eval_iters=1", "--checkpoint.interval=10", "--checkpoint.keep=0",
                      *LLAMA)
    trainer, first = train(cfg, distributed=True)
    out["greedy"] = generate(FullLogits(trainer.model, dims), [1, 2, 3, 4], 12,
                             temperature=0).tolist()
    dist.barrier()
    if dims.rank == 0:
        with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
            f.write("step_00000010")
    dist.barrier()
    _, second = train(cfg, distributed=True)
    out["resume"] = (first.losses, second.losses)
    # dropout under TP: reproducible for a layout, and different masks per split region
    drops = []
    for i in range(2):
        _, r = train(tiny_config(f"{tmp}/drop{i}", cache, "--parallel.tp=2",
                                 "--parallel.sequence_parallel=true", "--model.dropout=0.1",
                                 "--train.steps=4", "--train.eval_iters=1"), distributed=True)
        drops.append(r.losses)
    out["dropout"] = drops
    out["hf"] = _hf_into_tp(dims)
    return out


def _hf_into_tp(dims) -> float:
    """An HF LLaMA (random weights, built from config: no download) loaded into TP=2: each rank
    materialises only its slices; the gathered logits equal HF's."""
    import transformers

    from megalite.interop.hf import args_from_hf_config, megalite_state_dict
    from megalite.models import build_model
    from megalite.tensor_parallel.plan import FullLogits, parallelize

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(config).eval()
    args = args_from_hf_config(config)
    sd = megalite_state_dict(hf.state_dict(), args)
    model = build_model(args, seed=0, plan=lambda m: (m, parallelize(m, dims)),
                        values=lambda name, shape: sd[name])
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (FullLogits(model, dims)(x) - hf(x).logits).abs().max().item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """Single-process runs: the losses every layout must reproduce."""
    from megalite.generate import generate

    tmp = tmp_path_factory.mktemp("tp-ref")
    out = {}
    for family, extra in FAMILIES.items():
        run = f"{tmp}/{family}"
        trainer, result = train(tiny_config(run, data_cache, f"--train.steps={STEPS}",
                                            "--train.eval_iters=1", *extra), distributed=False)
        out[family] = {"losses": result.losses, "val": result.val_loss,
                       "grad_norm": [r["grad_norm"] for r in _metrics(run)]}
        if family == "llama":
            out["greedy"] = generate(trainer.model, [1, 2, 3, 4], 12, temperature=0).tolist()
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_single_process(tp, reference, tmp_path, data_cache):
    ranks = run_distributed(_tp_world, tp, str(tmp_path), data_cache, timeout_s=300)
    for out in ranks:
        for family in FAMILIES:
            ref = reference[family]
            for key in (family, f"{family}_sp"):
                assert max_abs_diff(out[key]["losses"], ref["losses"]) <= 1e-5, key
                assert abs(out[key]["val"] - ref["val"]) <= 1e-5, key
                # clipping's global norm counts each replicated parameter once
                assert max_abs_diff(out[key]["grad_norm"], ref["grad_norm"]) <= 1e-4, key
        if tp == 4:
            assert max_abs_diff(out["dp2tp2"], reference["llama"]["losses"]) <= 1e-5
        if tp == 2:
            first, second = out["resume"]
            assert second == first[10:], (first, second)
            assert out["greedy"] == reference["greedy"]
            a, b = out["dropout"]
            assert a == b  # same layout, same masks
            assert out["hf"] <= 1e-5
    # all TP ranks report the same loss
    assert all(r["gpt"]["losses"] == ranks[0]["gpt"]["losses"] for r in ranks)
