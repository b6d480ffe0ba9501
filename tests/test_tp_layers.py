"""Tensor-parallel collectives, layers and vocab-parallel cross-entropy against single-device
PyTorch references (nn.Linear, nn.Embedding, F.cross_entropy), and zero-bubble deferral of the
layers' weight gradients.

One spawned gloo world per TP size runs every check. Each rank builds the reference from the same
seed (identical on all ranks), the parallel module from exact slices of it, runs the same input
and compares forward outputs, input gradients and weight/bias gradients (shards gathered back to
full tensors). Tolerance: fp32, atol = rtol = 1e-5. The math is the same; only the summation order
differs (partial sums over TP shards added by a collective, matmul blocking of smaller shapes),
which moves results by a few ulp (~1e-7 relative on values of order 1), far below 1e-5.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megalite.parallel.comm import CommMeter
from megalite.pipeline.zero_bubble import DeferrableLinear, WeightGradStore, defer_weight_grads
from megalite.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding, column_parallel, gather_from_tp,
                                      pad_vocab, reduce_from_tp, reduce_scatter_seq,
                                      vocab_parallel_cross_entropy)
from megalite.tensor_parallel.collectives import (all_reduce_copy, gather_along,
                                                  start_all_reduce, start_reduce_scatter)
from tests.distributed import run_distributed

B, S, H, FFN = 2, 8, 8, 16  # S, FFN divisible by TP in {2, 4}
TOL = dict(atol=1e-5, rtol=1e-5)  # see the module docstring


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, **TOL)


def raises(fn, *needles: str) -> None:
    with pytest.raises(ValueError) as info:
        fn()
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


def check_collectives(group, p: int, r: int) -> None:
    meter = CommMeter()
    full = B * S * H * 4
    torch.manual_seed(1)
    x, g = torch.randn(B, S, H), torch.randn(B, S, H)  # identical on every rank
    ranks_sum = sum(range(1, p + 1))

    # g: all-reduce forward (one all-reduce of b*s*h*4 bytes), identity backward
    xi = (x * (r + 1)).requires_grad_()
    y = reduce_from_tp(xi, group, meter)
    close(y, x * ranks_sum)
    assert meter.take() == {"all_reduce": full}
    assert torch.equal(xi, x * (r + 1)), "forward must not modify its input"
    y.backward(g)
    assert torch.equal(xi.grad, g) and meter.take() == {}

    for dim in (-1, 0, 1):
        n = x.shape[dim] // p
        if x.shape[dim] % p:
            continue
        # gather: all-gather forward, own chunk backward
        xi = x.chunk(p, dim)[r].clone().requires_grad_()
        y = gather_from_tp(xi, group, dim=dim, meter=meter)
        assert torch.equal(y, x) and meter.take() == {"all_gather": full}
        y.backward(g)
        assert torch.equal(xi.grad, g.narrow(dim % 3, r * n, n))

    # reduce-scatter along the sequence forward, all-gather backward
    xi = (x * (r + 1)).requires_grad_()
    y = reduce_scatter_seq(xi, group, meter)
    close(y, (x * ranks_sum).chunk(p, 1)[r])
    assert meter.take() == {"reduce_scatter": full}
    y.backward(g.chunk(p, 1)[r])
    assert torch.equal(xi.grad, g) and meter.take() == {"all_gather": full}

    # the asynchronous starters the column-parallel backward uses
    close(start_all_reduce(x * (r + 1), group, meter)(), x * ranks_sum)
    close(start_reduce_scatter(x * (r + 1), group, 1, meter)(), (x * ranks_sum).chunk(p, 1)[r])
    assert meter.take() == {"all_reduce": full, "reduce_scatter": full}

    bad = torch.randn(B, p + 1, H)  # every rank raises before any collective: no hang
    raises(lambda: reduce_scatter_seq(bad, group), f"size {p + 1}", f"group size {p}")


def _region_refs():
    """A q/k/v-like region: three projections of one input, the last one replicated."""
    torch.manual_seed(2)
    return nn.Linear(H, FFN), nn.Linear(H, FFN // 2, bias=False), nn.Linear(H, 4)


def check_linears(group, p: int, r: int) -> None:
    full_x = B * S * H * 4
    for sp in (False, True):
        q_ref, k_ref, v_ref = _region_refs()
        x = torch.randn(B, S, H)
        gq, gk, gv = torch.randn(B, S, FFN), torch.randn(B, S, FFN // 2), torch.randn(B, S, 4)
        xr = x.clone().requires_grad_()
        torch.autograd.backward([q_ref(xr), k_ref(xr), v_ref(xr)], [gq, gk, gv])
        meter = CommMeter()
        q = ColumnParallelLinear.from_linear(q_ref, group, meter, sequence_parallel=sp)
        k = ColumnParallelLinear.from_linear(k_ref, group, meter, sequence_parallel=sp)
        v = ColumnParallelLinear(H, 4, True, group, meter, sp, split=False)
        v.load_full(v_ref.weight.detach(), v_ref.bias.detach())
        assert q.weight.shape == (FFN // p, H) and v.weight.shape == (4, H)
        assert (q.in_features, q.out_features, q.tp_size, q.tp_rank) == (H, FFN, p, r)
        xi = (x.chunk(p, 1)[r] if sp else x).clone().requires_grad_()
        yq, yk, yv = column_parallel(xi, (q, k, v))  # one entry collective for all three
        close(yq, q_ref(x).detach().chunk(p, -1)[r])
        close(yk, k_ref(x).detach().chunk(p, -1)[r])
        close(yv, v_ref(x).detach())
        assert meter.take() == ({"all_gather": full_x} if sp else {})
        # the replicated projection: each rank sends back 1/p of its output's gradient
        torch.autograd.backward([yq, yk, yv], [gq.chunk(p, -1)[r], gk.chunk(p, -1)[r], gv / p])
        assert meter.take() == ({"reduce_scatter": full_x} if sp else {"all_reduce": full_x})
        close(xi.grad, xr.grad.chunk(p, 1)[r] if sp else xr.grad)
        close(gather_along(q.weight.grad, group, 0), q_ref.weight.grad)
        close(gather_along(q.bias.grad, group, 0), q_ref.bias.grad)
        close(gather_along(k.weight.grad, group, 0), k_ref.weight.grad)
        assert k.bias is None
        close(all_reduce_copy(v.weight.grad, group), v_ref.weight.grad)  # partial: TP sum
        close(all_reduce_copy(v.bias.grad, group), v_ref.bias.grad)
        # a single layer is the same call
        xi = (x.chunk(p, 1)[r] if sp else x).clone().requires_grad_()
        torch.testing.assert_close(q(xi), column_parallel(xi, (q,))[0], atol=0, rtol=0)

    torch.manual_seed(3)
    ref = nn.Linear(FFN, H)
    x, g = torch.randn(B, S, FFN), torch.randn(B, S, H)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(g)
    row = RowParallelLinear.from_linear(ref, group)
    assert row.weight.shape == (H, FFN // p)
    xi = x.chunk(p, -1)[r].clone().requires_grad_()
    y = row(xi)
    close(y, y_ref.detach())
    y.backward(g)
    close(xi.grad, xr.grad.chunk(p, -1)[r])
    close(gather_along(row.weight.grad, group, 1), ref.weight.grad)
    close(row.bias.grad, ref.bias.grad)

    raises(lambda: ColumnParallelLinear(H, 2 * p + 1, True, group), str(2 * p + 1), str(p))
    raises(lambda: RowParallelLinear(2 * p + 1, H, True, group), str(2 * p + 1), str(p))


def check_mlp(group, p: int, r: int, sequence_parallel: bool) -> None:
    """Column -> GELU -> Row against nn.Linear -> GELU -> nn.Linear, plus the bytes moved."""
    torch.manual_seed(4)
    fc1, fc2 = nn.Linear(H, FFN), nn.Linear(FFN, H)
    x, g = torch.randn(B, S, H), torch.randn(B, S, H)
    xr = x.clone().requires_grad_()
    y_ref = fc2(F.gelu(fc1(xr)))
    y_ref.backward(g)
    meter = CommMeter()
    col = ColumnParallelLinear.from_linear(fc1, group, meter, sequence_parallel=sequence_parallel)
    row = RowParallelLinear.from_linear(fc2, group, meter, sequence_parallel=sequence_parallel)
    full = B * S * H * 4
    if sequence_parallel:
        xi = x.chunk(p, 1)[r].clone().requires_grad_()
        y = row(F.gelu(col(xi)))
        assert y.shape == (B, S // p, H)
        close(y, y_ref.detach().chunk(p, 1)[r])
        close(gather_along(y.detach(), group, 1), y_ref.detach())
        assert meter.take() == {"all_gather": full, "reduce_scatter": full}
        y.backward(g.chunk(p, 1)[r])
        assert meter.take() == {"all_gather": full, "reduce_scatter": full}
        close(xi.grad, xr.grad.chunk(p, 1)[r])
        close(gather_along(xi.grad, group, 1), xr.grad)
        close(all_reduce_copy(row.bias.grad, group), fc2.bias.grad)  # partial: the TP sum
    else:
        xi = x.clone().requires_grad_()
        y = row(F.gelu(col(xi)))
        close(y, y_ref.detach())
        assert meter.take() == {"all_reduce": full}  # one all-reduce of b*s*h*4 forward
        y.backward(g)
        assert meter.take() == {"all_reduce": full}  # and one backward
        close(xi.grad, xr.grad)
        grads = gather_along(xi.grad.unsqueeze(0), group, 0)
        assert all(torch.equal(grads[0], gr) for gr in grads), "input grad differs across ranks"
        close(row.bias.grad, fc2.bias.grad)
    close(gather_along(col.weight.grad, group, 0), fc1.weight.grad)
    close(gather_along(col.bias.grad, group, 0), fc1.bias.grad)
    close(gather_along(row.weight.grad, group, 1), fc2.weight.grad)


def check_deferral(group, p: int, r: int) -> None:
    """Zero-bubble at the layer level: with a deferring store the backward leaves every dW unset
    (input and bias gradients are computed), ``store.run(key)`` then gives the dW of the
    non-deferred backward, into ``main_grad`` where a weight has one, and ``on_accumulate``
    hears of each weight once."""

    def region():  # the same weights each call: a q/k/v-like column region and a row layer
        q_ref, k_ref, v_ref = _region_refs()
        q = ColumnParallelLinear.from_linear(q_ref, group)
        k = ColumnParallelLinear.from_linear(k_ref, group)
        v = ColumnParallelLinear(H, 4, True, group, split=False)
        v.load_full(v_ref.weight.detach(), v_ref.bias.detach())
        return nn.ModuleList([q, k, v, RowParallelLinear.from_linear(nn.Linear(FFN, H), group)])

    torch.manual_seed(8)
    x, g, gk, gv = (torch.randn(B, S, n) for n in (H, H, FFN // 2 // p, 4))
    store = WeightGradStore()
    heard = Counter()
    store.on_accumulate = lambda weight: heard.update([id(weight)])
    plain, deferred = region(), region()
    defer_weight_grads(deferred, store)
    deferred[2].weight.main_grad = torch.zeros_like(deferred[2].weight)
    input_grads = []
    for (q, k, v, row), key in ((plain, None), (deferred, (0, 1))):
        store.key = key  # what the executor does around a B pass
        xi = x.clone().requires_grad_()
        yq, yk, yv = column_parallel(xi, (q, k, v))
        loss = (row(F.gelu(yq)) * g).sum() + (yk * gk).sum() + (yv * gv).sum()
        loss.backward()
        store.key = None
        input_grads.append(xi.grad)
    close(input_grads[1], input_grads[0])
    for m in deferred:
        assert m.weight.grad is None, "dW must wait for the W pass"
    for i in (0, 2, 3):
        close(deferred[i].bias.grad, plain[i].bias.grad)  # biases: computed in B
    assert not heard
    store.run((0, 1))
    for i in (0, 1, 3):
        close(deferred[i].weight.grad, plain[i].weight.grad)
    assert deferred[2].weight.grad is None  # into main_grad instead
    close(deferred[2].weight.main_grad, plain[2].weight.grad)
    assert sorted(heard.values()) == [1] * 4
    assert set(heard) == {id(m.weight) for m in deferred}
    store.run((0, 1))  # a key's W pass runs once
    assert sorted(heard.values()) == [1] * 4


def check_embedding(group, p: int, r: int) -> None:
    torch.manual_seed(5)
    per = B * S // (2 * p)
    vocab = per * p  # half as many ids as tokens
    ref = nn.Embedding(vocab, H)
    tokens = torch.cat([torch.randperm(vocab), torch.randint(0, vocab, (B * S - vocab,))])
    tokens = tokens.view(B, S)  # every shard's rows are hit
    g = torch.randn(B, S, H)
    y_ref = ref(tokens)
    y_ref.backward(g)
    for sp in (False, True):
        meter = CommMeter()
        emb = VocabParallelEmbedding.from_embedding(ref, group, meter, sequence_parallel=sp)
        assert (emb.vocab_start, emb.vocab_end) == (r * per, (r + 1) * per)
        y = emb(tokens)
        kind = "reduce_scatter" if sp else "all_reduce"
        assert meter.take() == {kind: B * S * H * 4}  # it reduces its own partial sums
        if sp:
            assert y.shape == (B, S // p, H)
            close(y, y_ref.detach().chunk(p, 1)[r])
            y.backward(g.chunk(p, 1)[r])
        else:
            close(y, y_ref.detach())
            y.backward(g)
        close(gather_along(emb.weight.grad, group, 0), ref.weight.grad)
    raises(lambda: VocabParallelEmbedding(vocab + 1, H, group), str(vocab + 1), str(p))


def check_cross_entropy(group, p: int, r: int) -> None:
    torch.manual_seed(6)
    real = 50
    n = 3 * 4
    labels = torch.randint(0, real, (n,))
    labels[:4] = torch.tensor([0, real - 1, real // 2, 31])  # hits first, last and middle shards
    labels[[5, 9]] = -100
    labels = labels.view(3, 4)
    for padded in (pad_vocab(real, p, 16), pad_vocab(real, p)):  # 64, and 128/256: empty shards
        v_local = padded // p
        full = torch.randn(3, 4, padded) * 3
        full[..., real:] = 1e4  # huge padding logits: must not matter
        ref_in = full[..., :real].clone().requires_grad_()
        loss_ref = F.cross_entropy(ref_in.reshape(-1, real), labels.reshape(-1))
        (loss_ref * 2.5).backward()
        meter = CommMeter()
        local = full.chunk(p, -1)[r].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, labels, group, r * v_local, real, meter)
        close(loss, loss_ref.detach())
        assert meter.take() == {"all_reduce": 3 * n * 4}  # MAX of [N] + SUM of [2, N]
        (loss * 2.5).backward()
        grad = gather_along(local.grad, group, -1)
        close(grad[..., :real], ref_in.grad)
        assert torch.equal(grad[..., real:], torch.zeros_like(grad[..., real:]))
        assert torch.equal(grad[1, 1], torch.zeros(padded))  # ignored token (flat index 5)
    # bf16 logits: computed in fp32, gradient returned in bf16
    lb = full.chunk(p, -1)[r].to(torch.bfloat16).requires_grad_()
    loss = vocab_parallel_cross_entropy(lb, labels, group, r * v_local, real)
    ref = F.cross_entropy(full[..., :real].to(torch.bfloat16).float().reshape(-1, real),
                          labels.reshape(-1))
    close(loss, ref)
    loss.backward()
    assert lb.grad.dtype == torch.bfloat16


def _tp_world() -> int:
    dist.init_process_group("gloo")
    p, r = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(p)))
    check_collectives(group, p, r)
    check_linears(group, p, r)
    check_mlp(group, p, r, sequence_parallel=False)
    check_mlp(group, p, r, sequence_parallel=True)
    check_deferral(group, p, r)
    check_embedding(group, p, r)
    check_cross_entropy(group, p, r)
    return r


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_layers_match_single_device(tp):
    assert run_distributed(_tp_world, tp, timeout_s=120) == list(range(tp))


def test_no_group_is_plain_pytorch():
    """group None: the layers are nn.Linear / nn.Embedding, the loss is F.cross_entropy."""
    torch.manual_seed(0)
    lin, emb, x = nn.Linear(H, FFN), nn.Embedding(64, H), torch.randn(B, S, H)
    close(ColumnParallelLinear.from_linear(lin, None)(x), lin(x))
    y = torch.randn(B, S, FFN)
    lin2 = nn.Linear(FFN, H)
    close(RowParallelLinear.from_linear(lin2, None, sequence_parallel=True)(y), lin2(y))
    tok = torch.randint(0, 64, (B, S))
    assert torch.equal(VocabParallelEmbedding.from_embedding(emb, None)(tok), emb(tok))
    logits, labels = torch.randn(B, S, 64), torch.randint(0, 50, (B, S))
    close(vocab_parallel_cross_entropy(logits, labels, None, 0, 50),
          F.cross_entropy(logits[..., :50].reshape(-1, 50), labels.reshape(-1)))
    all_ignored = vocab_parallel_cross_entropy(logits, torch.full((B, S), -100), None, 0, 50)
    assert all_ignored.item() == 0.0


def test_pad_vocab():
    assert pad_vocab(50, 1) == 64 and pad_vocab(50, 4, 16) == 64 and pad_vocab(64, 2, 32) == 64
    assert pad_vocab(50257, 2) == 50304 and pad_vocab(50257, 8) == 50688
    raises(lambda: pad_vocab(0, 2), "vocab_size=0")


def test_deferrable_linear_twin():
    """Pipeline without TP: ``defer_weight_grads`` swaps each nn.Linear for its deferring twin
    (the same parameter objects, same names); the W pass gives nn.Linear's dW."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(H, FFN), nn.GELU(), nn.Linear(FFN, H, bias=False))
    ref = nn.Sequential(nn.Linear(H, FFN), nn.GELU(), nn.Linear(FFN, H, bias=False))
    ref.load_state_dict(model.state_dict())
    params = dict(model.named_parameters())
    store, heard = WeightGradStore(), []
    store.on_accumulate = heard.append
    defer_weight_grads(model, store)
    assert isinstance(model[0], DeferrableLinear) and model[0].wgrad_store is store
    assert dict(model.named_parameters()) == params  # the very same tensors
    x = torch.randn(B, S, H)
    ref(x).square().sum().backward()
    xi = x.clone().requires_grad_()
    store.key = (0, 0)
    model(xi).square().sum().backward()
    store.key = None
    assert model[0].weight.grad is None and model[2].weight.grad is None
    close(model[0].bias.grad, ref[0].bias.grad)
    store.run((0, 0))
    close(model[0].weight.grad, ref[0].weight.grad)
    close(model[2].weight.grad, ref[2].weight.grad)
    assert [id(w) for w in heard] == [id(model[2].weight), id(model[0].weight)]  # once each
    model(xi).square().sum().backward()  # no key: an ordinary backward
    close(model[0].weight.grad, 2 * ref[0].weight.grad)
