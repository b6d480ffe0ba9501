"""Document masking for packed sequences (data.reset_attention_mask, data.reset_position_ids,
data.eod_mask_loss; Megatron-LM's --reset-attention-mask, --reset-position-ids, --eod-mask-loss).

Proof by equivalence: a packed sample with the three flags on must give every token the loss it
gets when each of its documents runs alone, unpacked (positions from 0, plain causal attention),
and the same gradients of the loss averaged over the kept tokens. Then every layout (PP=2 x DP=2,
DP=2 x TP=2 with sequence parallelism) must reproduce the single-process packed run.

Tolerances (fp32): packed and unpacked attention sum the same nonzero terms (masked keys add an
exact 0) in another blocking, a relative ~1e-7 effect per op; the layouts reorder sums as in
test_tp_model.py. 2e-5 absolute on token losses of magnitude ~4 and on gradients leaves > 10x
margin over the largest gap seen (~1e-6), while a leaked key, an unreset position or an
unmasked EOD label moves losses by > 1e-2 (asserted below for the flags-off run).
"""
from __future__ import annotations

import shutil
from unittest import mock

import numpy as np
import pytest
import torch

from distributed import run_distributed
from helpers import tiny_config

TOL = 2e-5
STEPS = 3
EOD_BYTES = 256  # the byte tokenizer's EOD (the tiny config's synthetic corpus)
FLAGS = ["--data.reset_attention_mask=true", "--data.reset_position_ids=true",
         "--data.eod_mask_loss=true", "--train.grad_clip=0"]  # raw gradients stay comparable
# layouts: gpt's attention runs the fused masked softmax (kernels=fused, the default; CPU kernels
# built), llama's PyTorch's SDPA with the boolean mask (kernels=torch)
FAMILIES = {"gpt": [], "llama": ["--model.family=llama", "--model.num_kv_heads=2",
                                 "--model.kernels=torch"]}


def _megatron_masks(tokens, eod, reset_attention, reset_positions, eod_loss):
    """Megatron-LM's ``get_ltor_masks_and_position_ids``, written out as a loop over EODs
    (attention: True = may attend; loss mask: 1 = kept)."""
    b, s = tokens.shape
    attend = torch.ones(b, 1, s, s).tril().bool()
    loss_mask = torch.ones(b, s)
    if eod_loss:
        loss_mask[tokens == eod] = 0
    positions = torch.arange(s).expand(b, s).clone()
    for row in range(b):
        prev = 0
        for i in (tokens[row] == eod).nonzero().flatten().tolist():
            if reset_attention:
                attend[row, 0, i + 1:, :i + 1] = False
            if reset_positions:
                positions[row, i + 1:] -= i + 1 - prev
                prev = i + 1
    return attend, loss_mask, positions


def test_masks_follow_megatron():
    from megalite.models.documents import IGNORE_INDEX, document_context, mask_eod_labels
    from megalite.models.transformer import ModelArgs

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (3, 40), generator=g)  # eod 0: about one token in six
    tokens[2, 0], tokens[2, -1] = 0, 0  # an EOD first and last
    for attn in (False, True):
        for pos in (False, True):
            ctx = document_context(tokens, 0, attn, pos)
            want_attend, _, want_pos = _megatron_masks(tokens, 0, attn, pos, False)
            if not (attn or pos):
                assert ctx is None  # the plain causal path
                continue
            if attn:
                assert torch.equal(ctx.attend, want_attend) and torch.equal(ctx.blocked,
                                                                            ~want_attend)
            else:
                assert ctx.attend is None
            if pos:
                assert torch.equal(ctx.positions, want_pos)
            else:
                assert ctx.positions is None
    args = ModelArgs("gpt", 1, 8, 2, 2, 8, 6, 40, 1e-5, 1e4, 0.0, True, 0.02, eod_id=0,
                     eod_mask_loss=True)
    labels = torch.randint(0, 6, (3, 40), generator=g)
    batch = {"tokens": tokens, "labels": labels}
    masked = mask_eod_labels(batch, args)["labels"]
    _, loss_mask, _ = _megatron_masks(tokens, 0, False, False, True)
    assert torch.equal(masked == IGNORE_INDEX, loss_mask == 0)
    assert torch.equal(masked[loss_mask == 1], labels[loss_mask == 1])
    assert batch["labels"] is labels and not (labels == IGNORE_INDEX).any()  # input untouched


def _packed_rows(vocab: int, eod: int, rows: int, seq: int, seed: int):
    """Documents of 2..9 tokens, each followed by EOD, concatenated and cut into ``rows``
    samples of ``seq`` + 1 tokens (a document may straddle two samples, as in packing)."""
    rng = np.random.default_rng(seed)
    stream = []
    while len(stream) < rows * seq + 1:
        stream += rng.integers(0, eod, rng.integers(2, 10)).tolist() + [eod]
    out = np.stack([stream[r * seq:r * seq + seq + 1] for r in range(rows)])
    return torch.from_numpy(out).long()


def _segments(tokens_row: torch.Tensor, eod: int):
    """[start, end) of each document piece in a sample: a piece ends after its EOD."""
    ends = [i + 1 for i in (tokens_row == eod).nonzero().flatten().tolist()]
    if not ends or ends[-1] != len(tokens_row):
        ends.append(len(tokens_row))
    return list(zip([0] + ends[:-1], ends))


def _model_args(family: str, kernels: str, flags: bool, vocab: int, eod: int):
    from megalite.config.schema import DataConfig, ModelConfig
    from megalite.models import resolve_model_args

    kv = 2 if family == "llama" else None
    cfg = ModelConfig(family=family, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=kv,
                      max_seq_len=32, kernels=kernels)
    data = DataConfig(reset_attention_mask=flags, reset_position_ids=flags, eod_mask_loss=flags)
    return resolve_model_args(cfg, vocab, data, eod)


@pytest.mark.parametrize("kernels", ["torch", "fused"])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_packed_documents_equal_unpacked(family, kernels):
    """Per-token losses and every gradient of a packed batch with the flags on equal those of
    its documents run one by one; with the flags off they do not. ``fused`` must run megalite's
    scaled masked softmax kernel (counted)."""
    from megalite import ops
    from megalite.models import build_model, lm_loss
    from megalite.models.documents import IGNORE_INDEX, mask_eod_labels
    from megalite.ops import _backend

    if kernels == "fused" and _backend.cpu_lib is None:
        assert not shutil.which("c++"), "a C++ compiler is here but the kernels are not built"
        pytest.skip("no C++ compiler: megalite._kernels_cpu cannot be built here")
    vocab, eod, seq = 40, 39, 24
    rows = _packed_rows(vocab, eod, 3, seq, seed=1)
    batch = mask_eod_labels({"tokens": rows[:, :-1], "labels": rows[:, 1:]},
                            _model_args(family, kernels, True, vocab, eod))
    x, y = batch["tokens"], batch["labels"]
    assert (y == IGNORE_INDEX).sum() == (x == eod).sum() > 6  # several documents per sample
    kept = (y != IGNORE_INDEX).sum()

    packed = build_model(_model_args(family, kernels, True, vocab, eod), seed=5)
    real_softmax, calls = ops.scaled_masked_softmax, []
    with mock.patch.object(ops, "scaled_masked_softmax",
                           lambda *a: calls.append(1) or real_softmax(*a)):
        logits = packed(x)
    assert len(calls) == (2 if kernels == "fused" else 0)  # one per layer
    token_loss = lm_loss(logits, y, reduction="none").view(y.shape)
    (token_loss.sum() / kept).backward()

    alone = build_model(_model_args(family, kernels, False, vocab, eod), seed=5)
    want = torch.zeros_like(token_loss)
    total = 0.0
    for r in range(x.shape[0]):
        for a, e in _segments(x[r], eod):
            piece = lm_loss(alone(x[r:r + 1, a:e]), y[r:r + 1, a:e], reduction="none")
            want[r, a:e] = piece.detach()
            total = total + piece.sum()
    (total / kept).backward()
    keep = y != IGNORE_INDEX
    torch.testing.assert_close(token_loss[keep], want[keep], atol=TOL, rtol=0)
    assert (token_loss[~keep] == 0).all()
    ref = dict(alone.named_parameters())
    for name, p in packed.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, atol=TOL, rtol=0,
                                   msg=lambda m: f"{family}/{kernels} grad {name}: {m}")
    # not vacuous: the same packed batch read as one text gives other losses
    with torch.no_grad():
        plain = lm_loss(alone(x), y, reduction="none").view(y.shape)
    assert (plain[keep] - want[keep]).abs().max() > 1e-2


class PackedDocs:
    """A training set of packed samples (``seq`` + 1 tokens) of byte documents of 2..9 tokens:
    about ten EODs per 64-token sample, where the synthetic corpus has one every ~350 bytes."""

    def __init__(self, num: int, seq: int):
        self.rows = _packed_rows(EOD_BYTES + 1, EOD_BYTES, num, seq, seed=2).numpy()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rows[i]


def _run(cfg, dims, with_grads: bool):
    """STEPS training steps on PackedDocs: losses, gradient norms and (``with_grads``) the
    first step's gradients as full (TP-gathered, DP-reduced) tensors by parameter name."""
    from megalite.trainer.loop import Trainer

    trainer = Trainer(cfg, dims)
    a = trainer.args
    assert (a.eod_id, a.reset_attention_mask, a.reset_position_ids, a.eod_mask_loss) == \
        (EOD_BYTES, True, True, True)
    trainer.train_ds = PackedDocs(STEPS * trainer.gbs, cfg.data.seq_len)
    losses, norms, grads = [], [], {}
    for step in range(STEPS):
        record = trainer.train_step()
        losses.append(record["loss"])
        norms.append(record["grad_norm"])
        if step == 0 and with_grads:
            grads = _full_grads(trainer, dims)
    return {"losses": losses, "norms": norms, "grads": grads}


def _full_grads(trainer, dims):
    import torch.distributed as dist

    local = trainer.engine.full_values(trainer.engine.owned_grads())
    shard_dim = trainer.model.shard_layout.shard_dim
    out = {}
    for name, g in local.items():
        dim = shard_dim.get(name)
        if dim is not None and dims.tp > 1:
            parts = [torch.empty_like(g) for _ in range(dims.tp)]
            dist.all_gather(parts, g.contiguous(), group=dims.tp_group)
            g = torch.cat(parts, dim)
        out[name] = g
    return out


def _reference_grads(cfg, gbs: int):
    """The first step's mean loss and gradients from the plain single-process model with the
    flags on (no trainer, no executor): the packed global batch, loss summed over the kept
    tokens / their count."""
    from megalite.models import build_model, lm_loss, resolve_model_args
    from megalite.models.documents import mask_eod_labels

    args = resolve_model_args(cfg.model, EOD_BYTES + 1, cfg.data, EOD_BYTES)
    model = build_model(args, cfg.train.seed)
    rows = torch.from_numpy(PackedDocs(gbs, cfg.data.seq_len).rows[:gbs]).long()
    batch = mask_eod_labels({"tokens": rows[:, :-1], "labels": rows[:, 1:]}, args)
    loss = lm_loss(model(batch["tokens"]), batch["labels"], reduction="sum")
    mean = loss / (batch["labels"] != -100).sum()
    mean.backward()
    return mean.item(), {n: p.grad for n, p in model.named_parameters()}


def _layout_world(tmp: str, cache: str):
    from megalite.parallel.dims import ParallelDims
    from megalite.parallel.env import discover

    layouts = {"pp2dp2": ["--parallel.pp=2", "--parallel.dp=2", "--train.micro_batch_size=1",
                          "--train.grad_accum=2", "--parallel.zero_stage=1"],
               "dp2tp2sp": ["--parallel.dp=2", "--parallel.tp=2", "--parallel.zero_stage=3",
                            "--parallel.sequence_parallel=true", "--train.micro_batch_size=2"]}
    out = {}
    for family, extra in FAMILIES.items():
        for name, layout in layouts.items():
            cfg = tiny_config(f"{tmp}/{family}-{name}", cache, *FLAGS, *extra, *layout)
            p = cfg.parallel
            dims = ParallelDims.initialize(p.dp, p.tp, p.pp, discover(), "gloo", timeout_s=60)
            result = _run(cfg, dims, with_grads=True)
            ref_loss, ref = _reference_grads(cfg, 4)
            gap, names = 0.0, set()
            for n, g in result["grads"].items():
                # the last stage's copy of a tied embedding (its gradient summed with stage 0's)
                want = ref[n if n in ref else "embed.tok.weight"]
                names.add(n if n in ref else "embed.tok.weight")
                if g.shape[0] > want.shape[0]:  # TP pads the vocabulary: no gradient there
                    assert g[want.shape[0]:].abs().max() == 0, n
                    g = g[:want.shape[0]]
                gap = max(gap, float((g - want).abs().max()))
            out[f"{family}-{name}"] = {"losses": result["losses"], "norms": result["norms"],
                                       "names": names, "want_names": set(ref),
                                       "grad_gap": gap,
                                       "loss0_gap": abs(result["losses"][0] - ref_loss)}
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, data_cache):
    from megalite.parallel.dims import ParallelDims

    tmp = tmp_path_factory.mktemp("doc-ref")
    return {family: _run(tiny_config(f"{tmp}/{family}", data_cache, *FLAGS, *extra),
                         ParallelDims.single(), with_grads=False)
            for family, extra in FAMILIES.items()}


def test_layouts_equal_single_process(single_process, tmp_path, data_cache):
    """PP=2 x DP=2 with ZeRO-1 (every stage rebuilds positions and mask from the tokens;
    LLaMA's RoPE in stage 1's layers) and DP=2 x TP=2 with sequence parallelism and ZeRO-3
    (heads split; GPT's positions sliced per sequence chunk, the mask built for the gathered
    sequence), GPT through the fused masked softmax, LLaMA through SDPA: the first step's
    gradients equal the plain model's (GPT's tied embedding across stages included) and its loss
    is their mean over the global batch's kept tokens, and STEPS steps give the single-process
    packed run's losses and gradient norms."""
    ranks = run_distributed(_layout_world, 4, str(tmp_path), data_cache, timeout_s=300)
    for rank, out in enumerate(ranks):
        for key, got in out.items():
            ref = single_process[key.split("-")[0]]
            assert got["grad_gap"] <= TOL, (rank, key, got["grad_gap"])
            assert got["loss0_gap"] <= TOL, (rank, key, got["loss0_gap"])  # kept-token mean
            assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) <= TOL, key
            assert max(abs(a - b) for a, b in zip(got["norms"], ref["norms"])) <= TOL, key
    for key in ranks[0]:  # every parameter was compared on some rank (the stages together)
        assert set().union(*(r[key]["names"] for r in ranks)) == ranks[0][key]["want_names"], key
