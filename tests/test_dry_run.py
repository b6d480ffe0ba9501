"""The dry run (``megalite train --dry_run``) against the real step: the same rank's peak memory,
measured by the same tracker on real CPU tensors in a gloo world, and on fake tensors in a fake
1-process world; and the full-scale runs (LLaMA-7B at 64 ranks, 70B at 512) finish in time."""
import contextlib
import io
import os
import time

import pytest
import torch

from megalite import cli
from megalite.config.load import parse_args
from megalite.planner.cli import dry_args
from megalite.planner.dry_run import dry_run, layout_dims, missing_apis
from megalite.planner.memory import model_states, rank_memory
from tests.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(missing_apis() is not None, reason=str(missing_apis()))

TINY_LLAMA = ["--model.family=llama", "--model.num_layers=4", "--model.hidden_size=128",
              "--model.num_heads=8", "--model.num_kv_heads=4", "--model.max_seq_len=128",
              "--model.vocab_size=512", "--data.seq_len=128"]
# ~20M parameters: 6 layers, hidden 512, FFN 1536, vocab 8192
SMALL_LLAMA = ["--model.family=llama", "--model.num_layers=6", "--model.hidden_size=512",
               "--model.num_heads=8", "--model.ffn_hidden_size=1536", "--model.max_seq_len=128",
               "--model.vocab_size=8192", "--data.seq_len=128"]
GPT = ["--model.vocab_size=257"]
# bert-tiny's shape (post-norm, bidirectional, dropout 0.1: SDPA's math path on CPU), MLM batches
BERT_TINY = ["--model.family=bert", "--model.num_layers=2", "--model.hidden_size=128",
             "--model.num_heads=4", "--model.max_seq_len=128", "--model.vocab_size=512",
             "--model.dropout=0.1", "--data.seq_len=128"]

# (name, overrides) on 4 ranks; each is measured on ranks 0 and 3 (first and last stage)
LAYOUTS = [
    ("gpt dp4 zero0", GPT + ["--parallel.dp=4", "--train.micro_batch_size=4"]),
    ("llama dp2 tp2 sp zero1 bf16", TINY_LLAMA + [
        "--parallel.dp=2", "--parallel.tp=2", "--parallel.sequence_parallel=true",
        "--parallel.zero_stage=1", "--train.precision=bf16", "--train.micro_batch_size=2"]),
    ("llama dp4 zero3 selective", TINY_LLAMA + [
        "--parallel.dp=4", "--parallel.zero_stage=3", "--model.recompute=selective",
        "--train.micro_batch_size=2", "--train.grad_accum=2"]),
    ("llama dp2 pp2 1f1b zero2", TINY_LLAMA + [
        "--parallel.dp=2", "--parallel.pp=2", "--parallel.zero_stage=2",
        "--train.micro_batch_size=2", "--train.grad_accum=4"]),
    ("llama tp2 pp2 zb-h1", TINY_LLAMA + [
        "--parallel.dp=1", "--parallel.tp=2", "--parallel.pp=2", "--parallel.schedule=zb-h1",
        "--train.micro_batch_size=2", "--train.grad_accum=4"]),
    ("llama dp2 pp2 interleaved zero1 bf16", TINY_LLAMA + [
        "--parallel.dp=2", "--parallel.pp=2", "--parallel.schedule=interleaved",
        "--parallel.virtual_stages=2", "--parallel.zero_stage=1", "--train.precision=bf16",
        "--train.micro_batch_size=1", "--train.grad_accum=4"]),
    ("llama pp4 gpipe full recompute", TINY_LLAMA + [
        "--parallel.dp=1", "--parallel.pp=4", "--parallel.schedule=gpipe",
        "--model.recompute=full", "--train.micro_batch_size=2", "--train.grad_accum=4"]),
    ("bert dp2 tp2 sp zero1", BERT_TINY + [
        "--parallel.dp=2", "--parallel.tp=2", "--parallel.sequence_parallel=true",
        "--parallel.zero_stage=1", "--train.micro_batch_size=2"]),
    ("bert dp2 pp2 1f1b zero3", BERT_TINY + [
        "--parallel.dp=2", "--parallel.pp=2", "--parallel.zero_stage=3",
        "--train.micro_batch_size=2", "--train.grad_accum=4"]),
    ("20M llama dp2 tp2 sp zero1 bf16", SMALL_LLAMA + [
        "--parallel.dp=2", "--parallel.tp=2", "--parallel.sequence_parallel=true",
        "--parallel.zero_stage=1", "--train.precision=bf16", "--train.micro_batch_size=2"]),
]
RANKS = (0, 3)


def config(overrides, world=None):
    cfg, _ = parse_args(["--config", os.path.join(REPO, "configs/tiny.yaml"), *overrides],
                        verbose=False, world_size=world)
    return cfg


def _real_peaks(layouts):
    """Every layout's real step (all its micro-batches) on this gloo rank, measured by the dry
    run's tracker."""
    import torch.distributed as dist

    from megalite.planner.dry_run import build_rank, gloo_dims, tracked_step

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), {}
    for name, overrides in layouts:
        cfg = config(overrides, 4)
        dims = gloo_dims(cfg, rank)
        torch.manual_seed(rank)
        parts = build_rank(cfg, dims, cfg.model.vocab_size)
        step = tracked_step(parts, cfg, cfg.train.grad_accum)  # the whole step
        out[name] = (step.peak, step.kinds)
    return out


def test_dry_run_and_analytic_against_real_step():
    """Each layout's dry-run peak is the real CPU step's within 10% (same code, same tracker:
    real and fake tensors allocate the same bytes) with the model states equal; the analytic
    model's peak (CPU attention paths, no allocator allowance) within 20%."""
    real = run_distributed(_real_peaks, 4, LAYOUTS, timeout_s=300)
    lines = []
    for name, overrides in LAYOUTS:
        cfg = config(overrides, 4)
        args = dry_args(cfg)
        for rank in RANKS if cfg.parallel.pp > 1 else RANKS[:1]:  # pp = 1: ranks alike
            fake = dry_run(cfg, rank)
            analytic = rank_memory(cfg, args, layout_dims(cfg, rank).pp_rank, gpu=False)
            peak, kinds = real[rank][name]
            lines.append(f"{name} rank {rank}: real {peak / 2**20:.2f} MiB, dry run "
                         f"{fake.peak / 2**20:.2f} MiB ({fake.peak / peak:.3f}), analytic "
                         f"{analytic['total'] / 2**20:.2f} MiB ({analytic['total'] / peak:.3f})")
            assert fake.peak == pytest.approx(peak, rel=0.10), lines[-1]
            assert analytic["total"] == pytest.approx(peak, rel=0.20), lines[-1]
            for kind in ("params", "grads", "master", "optimizer"):
                assert fake.kinds[kind] == kinds[kind] == analytic[kind], (lines[-1], kind)
    print("\n".join(lines))


def test_bert_terms_are_what_its_units_save():
    """bert-tiny (fp32, dropout 0.1, PyTorch ops on CPU), one micro-batch of the dry run's MLM
    batch: what each unit saves for backward (``SavedActivationCounter``) is the analytic
    model's term for it — a post-norm block ``layer_activation_terms`` to the byte, the MLM
    head (transform + norm output) to the byte, the embedding's norm within 1% (its position
    ids, 8·s bytes, are left out) — and the block's terms carry post-norm names, the decoders'
    unchanged."""
    from megalite.models.activation_memory import (SavedActivationCounter,
                                                   layer_activation_terms, units_of)
    from megalite.models.transformer import CausalLM
    from megalite.planner.dry_run import step_batch
    from megalite.planner.memory import activation_terms

    cfg = config(BERT_TINY + ["--train.micro_batch_size=2"], 1)
    args = dry_args(cfg)
    torch.manual_seed(0)
    model = CausalLM(args)
    batch = step_batch(cfg, args.vocab_size)
    with SavedActivationCounter(units_of(model), model.parameters(), batch.values()) as counted:
        model(**batch)
    terms = activation_terms(cfg, args, 0, cpu=True)
    block = layer_activation_terms(args, 2, 128, 1, False, "none", 4, True, None, 4, False)
    assert counted.bytes["layers.0"] == counted.bytes["layers.1"] == sum(block.values())
    head = next(v for k, v in terms.items() if k.startswith("head: MLM"))
    assert counted.bytes["head"] == head, (counted.bytes, terms)
    embed = next(v for k, v in terms.items() if "embedding norm" in k)
    assert embed <= counted.bytes["embed"] <= 1.01 * embed, (counted.bytes, terms)
    assert {"block input (q,k,v input)", "attn_norm output (mlp input)"} <= set(block)
    gpt = layer_activation_terms(dry_args(config(GPT)), 2, 64)
    assert {"attn_norm output (q,k,v input)", "mlp_norm output (mlp input)"} <= set(gpt)


# What Trainer.__init__ builds that build_rank leaves out on purpose (a rank's step memory is
# the model, engine, executor and optimizer): data, reporting, checkpoint writing, fp16 scaling.
NOT_IN_DRY_RUN = {"train_ds", "val_ds", "tokenizer", "timers", "activations", "memory_check",
                  "log", "saver", "scaler"}


def test_build_rank_builds_what_the_trainer_builds(tmp_path):
    """``planner.dry_run.build_rank`` mirrors ``Trainer.__init__`` by hand: one rank built both
    ways (fake process group, real tensors, a layout with TP + SP, pipeline, ZeRO-1, bf16,
    dropout's split RNG, selective recompute) has the same parameters (name, shape, dtype), the
    same module tree and hooks, the same model arguments but the norms' kernels (the dry run
    runs PyTorch's), the same engine and optimizer state kinds and bytes, the same executor
    settings; and every megalite component the Trainer holds is built by the dry run or named
    in NOT_IN_DRY_RUN."""
    import dataclasses

    from megalite.planner.dry_run import RankParts, build_rank, fake_world
    from megalite.trainer.loop import Trainer

    cfg = config(TINY_LLAMA + [
        "--parallel.dp=2", "--parallel.tp=2", "--parallel.pp=2",
        "--parallel.sequence_parallel=true", "--parallel.zero_stage=1", "--model.dropout=0.1",
        "--model.recompute=selective", "--train.precision=bf16", "--train.micro_batch_size=2",
        "--train.grad_accum=4", f"--run.dir={tmp_path}"], 8)
    with fake_world(cfg, 7) as dims:  # last stage, dp 1, tp 1
        trainer = Trainer(cfg, dims)
        parts = build_rank(cfg, dims, trainer.args.vocab_size)
        trainer.opt._ensure_moments()  # build_rank's steady state: the moments exist

        def params(model):
            return [(n, tuple(q.shape), q.dtype) for n, q in model.named_parameters()]

        def modules(model):  # + callables set on the instance: recompute's wrapped forward
            return [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks),
                     len(m._backward_hooks), sorted(k for k, v in vars(m).items() if callable(v)
                                                    and not isinstance(v, torch.nn.Module)))
                    for n, m in model.named_modules()]

        def settings(obj):
            return {k: v for k, v in vars(obj).items()
                    if isinstance(v, (bool, int, float, str, tuple, torch.dtype))}

        assert params(trainer.model) == params(parts.model)
        assert modules(trainer.model) == modules(parts.model)
        assert dataclasses.replace(trainer.args, kernels="torch") == parts.args
        assert trainer.engine.memory() == parts.engine.memory()
        assert trainer.opt.memory() == parts.opt.memory()
        assert trainer.opt.memory()["master"] > 0  # bf16: fp32 masters, both ways
        kinds = [{k: (t.dtype, tuple(t.shape)) for k, t in st.items()}
                 for st in trainer.opt.opt.state.values()]
        assert kinds == [{k: (t.dtype, tuple(t.shape)) for k, t in st.items()}
                         for st in parts.opt.opt.state.values()]
        assert settings(trainer.executor) == settings(parts.executor)
        assert settings(trainer.engine) == settings(parts.engine)
    built = {f.name for f in dataclasses.fields(RankParts)} | {"_opt", "cfg"}
    components = {k for k, v in vars(trainer).items()
                  if type(v).__module__.startswith("megalite.")}
    assert components - built - NOT_IN_DRY_RUN == set(), (
        "Trainer.__init__ builds these, planner.dry_run.build_rank does not: build them there "
        "too, or add them to NOT_IN_DRY_RUN with the reason")


def test_dry_run_at_scale():
    """LLaMA-7B at dp8 x tp8 (64 ranks, ZeRO-1) and the 70B at dp8 x tp8 x pp8 (512 ranks)
    finish within 60 s each, their model-state bytes equal to the analytic model's (the
    engine's padding and buckets mirrored); the CLI prints the table, a bad rank is one line,
    exit 2."""
    for cfg_file, world in (("configs/llama-7b.yaml", 64), ("configs/llama-70b.yaml", 512)):
        cfg, _ = parse_args(["--config", os.path.join(REPO, cfg_file)], verbose=False,
                            world_size=world)
        start = time.perf_counter()
        fake = dry_run(cfg, 0)
        took = time.perf_counter() - start
        assert took < 60, f"{cfg_file}: {took:.1f} s"
        states = model_states(cfg, dry_args(cfg), 0)
        for kind in ("params", "grads", "master", "optimizer"):
            assert fake.kinds[kind] == states[kind], (cfg_file, kind)
        print(f"{cfg_file} at {world} ranks: {took:.1f} s, peak {fake.peak / 2**30:.2f} GiB")
    code, out, err = train_cli("--dry_run")
    assert code == 0, err
    assert "peak memory of rank 0" in out and "analytic" in out, out
    code, out, err = train_cli("--dry_run", "--rank", "4")
    assert code == 2 and err.startswith("error: --rank=4"), err
    assert len(err.strip().splitlines()) == 1


def train_cli(*argv):
    """`megalite train --config configs/tiny.yaml ARGV` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["train", "--config", os.path.join(REPO, "configs/tiny.yaml"), *argv])
    return code, out.getvalue(), err.getvalue()


def test_tracked_step_does_not_grow_with_micro_batches():
    """The last stage's tracked activations are the same at 4 and at 12 micro-batches, within
    less than one activation (1F1B and zb-h1,
    whose W pass frees the received activation): MemTracker's module hooks keep a
    grad-requiring input tensor alive while tracking, so the executor drops a received
    activation's values once its backward (and W pass) is done — before, each micro-batch left
    one behind, +8 MiB per micro-batch on a 7B's last stage."""
    from megalite.planner.dry_run import fake_rank, tracked_step

    for schedule in ("1f1b", "zb-h1"):
        cfg = config(TINY_LLAMA + ["--parallel.dp=1", "--parallel.pp=2",
                                   f"--parallel.schedule={schedule}"], 2)
        peaks = []
        for m in (4, 12):
            with fake_rank(cfg, 1, cfg.model.vocab_size) as parts:  # as dry_run() builds
                peaks.append(tracked_step(parts, cfg, m).kinds["activations"])
        # what may grow: the step's batches the executor holds (labels, a few KiB each)
        one = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.model.hidden_size * 4
        assert abs(peaks[1] - peaks[0]) < one, (schedule, peaks, one)
