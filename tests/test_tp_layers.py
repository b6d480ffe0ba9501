"""Tensor-parallel collectives, layers and vocab-parallel cross-entropy against single-device
PyTorch references (nn.Linear, nn.Embedding, F.cross_entropy).

One spawned gloo world per TP size runs every check. Each rank builds the reference from the same
seed (identical on all ranks), the parallel module from exact slices of it, runs the same input
and compares forward outputs, input gradients and weight/bias gradients (shards gathered back to
full tensors). Tolerance: fp32, atol = rtol = 1e-5. The math is the same; only the summation order
differs (partial sums over TP shards added by a collective, matmul blocking of smaller shapes),
which moves results by a few ulp (~1e-7 relative on values of order 1), far below 1e-5.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megalite.parallel.comm import CommMeter
from megalite.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding, copy_to_tp, gather_from_tp,
                                      gather_seq, pad_vocab, reduce_from_tp, reduce_scatter_seq,
                                      scatter_seq, scatter_to_tp, vocab_parallel_cross_entropy)
from megalite.tensor_parallel.collectives import all_reduce_copy, gather_along
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

    # f: identity forward, all-reduce backward
    xi = x.clone().requires_grad_()
    y = copy_to_tp(xi, group, meter)
    assert torch.equal(y, x) and meter.take() == {}
    y.backward(g * (r + 1))
    close(xi.grad, g * ranks_sum)
    assert meter.take() == {"all_reduce": full}

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
        # scatter: own chunk forward, all-gather backward
        xi = x.clone().requires_grad_()
        y = scatter_to_tp(xi, group, dim=dim, meter=meter)
        assert torch.equal(y, x.chunk(p, dim)[r]) and meter.take() == {}
        y.backward(g.chunk(p, dim)[r])
        assert torch.equal(xi.grad, g) and meter.take() == {"all_gather": full}
        # gather: all-gather forward, own chunk backward
        xi = x.chunk(p, dim)[r].clone().requires_grad_()
        y = gather_from_tp(xi, group, dim=dim, meter=meter)
        assert torch.equal(y, x) and meter.take() == {"all_gather": full}
        y.backward(g)
        assert torch.equal(xi.grad, g.narrow(dim % 3, r * n, n))

    # ḡ: all-gather along the sequence forward, reduce-scatter backward
    xi = x.chunk(p, 1)[r].clone().requires_grad_()
    y = gather_seq(xi, group, meter)
    assert torch.equal(y, x) and meter.take() == {"all_gather": full}
    y.backward(g * (r + 1))
    close(xi.grad, (g * ranks_sum).chunk(p, 1)[r])
    assert meter.take() == {"reduce_scatter": full}

    # reduce-scatter along the sequence forward, all-gather backward
    xi = (x * (r + 1)).requires_grad_()
    y = reduce_scatter_seq(xi, group, meter)
    close(y, (x * ranks_sum).chunk(p, 1)[r])
    assert meter.take() == {"reduce_scatter": full}
    y.backward(g.chunk(p, 1)[r])
    assert torch.equal(xi.grad, g) and meter.take() == {"all_gather": full}

    # scatter_seq: own sequence chunk forward, all-gather backward
    xi = x.clone().requires_grad_()
    y = scatter_seq(xi, group, meter=meter)
    assert torch.equal(y, x.chunk(p, 1)[r])
    y.backward(g.chunk(p, 1)[r])
    assert torch.equal(xi.grad, g) and meter.take() == {"all_gather": full}

    bad = torch.randn(B, p + 1, H)  # every rank raises before any collective: no hang
    raises(lambda: scatter_seq(bad, group), f"size {p + 1}", f"group size {p}")
    raises(lambda: reduce_scatter_seq(bad, group), f"size {p + 1}", f"group size {p}")


def check_linears(group, p: int, r: int) -> None:
    torch.manual_seed(2)
    ref = nn.Linear(H, FFN)
    x, g = torch.randn(B, S, H), torch.randn(B, S, FFN)
    xr = x.clone().requires_grad_()
    ref(xr).backward(g)
    y_ref = ref(x).detach()
    for gather_output in (False, True):
        col = ColumnParallelLinear.from_linear(ref, group, gather_output=gather_output)
        assert col.weight.shape == (FFN // p, H) and col.weight.tp_sharded and col.bias.tp_sharded
        assert (col.in_features, col.out_features, col.tp_size, col.tp_rank) == (H, FFN, p, r)
        xi = x.clone().requires_grad_()
        y = col(xi)
        if gather_output:
            close(y, y_ref)
            y.backward(g)
        else:
            close(y, y_ref.chunk(p, -1)[r])
            y.backward(g.chunk(p, -1)[r])
        close(xi.grad, xr.grad)
        close(gather_along(col.weight.grad, group, 0), ref.weight.grad)
        close(gather_along(col.bias.grad, group, 0), ref.bias.grad)

    torch.manual_seed(3)
    ref = nn.Linear(FFN, H)
    x, g = torch.randn(B, S, FFN), torch.randn(B, S, H)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(g)
    row = RowParallelLinear.from_linear(ref, group)
    assert row.weight.shape == (H, FFN // p) and row.weight.tp_sharded
    assert not hasattr(row.bias, "tp_sharded") and not hasattr(row.bias, "tp_partial_grad")
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
        assert row.bias.tp_partial_grad
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
        close(all_reduce_copy(row.bias.grad, group), fc2.bias.grad)  # the trainer's TP sum
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
    for reduce in ("all", "scatter_seq", "none"):
        emb = VocabParallelEmbedding.from_embedding(ref, group, reduce=reduce)
        assert (emb.vocab_start, emb.vocab_end) == (r * per, (r + 1) * per)
        assert emb.weight.tp_sharded
        y = emb(tokens)
        if reduce == "all":
            close(y, y_ref.detach())
            y.backward(g)
        elif reduce == "scatter_seq":
            assert y.shape == (B, S // p, H)
            close(y, y_ref.detach().chunk(p, 1)[r])
            y.backward(g.chunk(p, 1)[r])
        else:
            close(all_reduce_copy(y.detach(), group), y_ref.detach())
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
    assert torch.equal(ColumnParallelLinear.from_linear(lin, None, gather_output=True)(x), lin(x))
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
