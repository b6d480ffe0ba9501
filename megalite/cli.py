"""``megalite`` command line: train, finetune, prepare-data, generate, eval, convert, bench,
launch, serve."""
from __future__ import annotations

import argparse
import faulthandler
import gc
import math
import os
import sys
from typing import List, Optional

USAGE = """usage: megalite <command> [options]

commands:
  train         train a model: megalite train --config configs/tiny.yaml [--section.field=value]
  prepare-data  tokenize files into a training dataset
  finetune      fine-tune a bert checkpoint as a classifier: megalite finetune --task
                classification --train F.jsonl --eval F.jsonl --init_from CKPT|hf:DIR
  generate      sample text from a checkpoint
  eval          validation loss and perplexity of a checkpoint
  convert       Hugging Face <-> megalite: convert --to hf CKPT OUT | convert --from hf HF_DIR CKPT
  checkpoint    megalite checkpoint verify DIR: check every byte of a checkpoint
  bench         microbenchmarks: megalite bench kernels [--device cpu|cuda] (fused kernels)
  launch        start a job on several processes/nodes (local, pdsh, ssh, slurm, openmpi)
  plan          which layout of N GPUs fits and runs fastest: plan --config F --gpus N
  serve         an OpenAI-compatible REST endpoint: serve --checkpoint RUN_DIR [--port 8000]

`megalite <command> --help` describes each command."""


def _config_help(command: str, extra: str = "") -> str:
    from megalite.config import help_text

    return (f"usage: megalite {command} --config FILE.yaml [--deepspeed_config ds.json] "
            f"[--section.field=value ...]{extra}\n\n"
            "Options are read from the defaults, then the YAML file, then the DeepSpeed JSON, "
            "then the command line. Run bare, it starts the parallel.dp*tp*pp local ranks the "
            "config asks for (dp=auto: 1); under torchrun, deepspeed, srun or mpirun it is one "
            "rank (dp=auto: world size / (tp*pp)).\n\n"
            + help_text())


def _pop_option(argv: List[str], name: str) -> Optional[str]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from argv and return VALUE."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if a.startswith(name + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def run_ranks(command: str, argv: List[str]) -> int:
    """Parse the config, start local ranks if no launcher did, and run ``command`` on each.

    Ctrl-C (SIGINT) during training saves a checkpoint and exits like SIGTERM (the trainer's
    handler); before or after the step loop it ends the command with one line, no traceback."""
    try:
        return _run_ranks(command, argv)
    except KeyboardInterrupt:
        print(f"megalite {command}: interrupted", file=sys.stderr)
        return 130


def _run_ranks(command: str, argv: List[str]) -> int:
    from megalite.config import parse_or_exit
    from megalite.parallel.env import discover

    argv = list(argv)
    ckpt = _pop_option(argv, "--checkpoint") if command == "eval" else None
    try:
        env = discover()
    except RuntimeError as e:  # a launcher left an unusable environment
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, _ = parse_or_exit(argv, env.world_size if env is not None else None,
                           node_speaker=env is None or env.local_rank == 0)
    from megalite.data import DataError
    from megalite.trainer import objective

    try:  # bad data is one line, before any rank or process group starts
        # prepared here, before any process group (a bare run: once, for the ranks it starts);
        # launched ranks all call it: the cache's file lock lets one per node prepare while the
        # others wait on the lock, never in a collective with a timeout
        prefixes = objective.prepare(cfg)
    except DataError as e:
        if env is None or env.rank == 0:  # launched ranks would all say it
            print(f"error: {e}", file=sys.stderr)
        return 2
    if command == "train":
        problem = _unwritable_run_dirs(cfg) or _resume_problem(cfg)
        if problem:
            if env is None or env.local_rank == 0:  # every rank finds it; one per node says it
                print(f"error: {problem}", file=sys.stderr)
            return 2
    if env is None and cfg.world_size > 1:
        from megalite.launcher.local import launch_local

        problem = _bare_run_device_problem(cfg.parallel.backend, cfg.world_size)
        if problem:  # the ranks would crash in set_device or NCCL ("duplicate GPU")
            print(f"error: {problem}", file=sys.stderr)
            return 2

        extra = ["--checkpoint", ckpt] if ckpt else []
        return launch_local(["megalite.cli", command, *argv, *extra], cfg.world_size)
    from megalite.parallel.dims import LayoutError, ParallelDims
    from megalite.trainer.checkpoint import CheckpointError
    from megalite.trainer.loop import ResumeError, Trainer, TrainingDiverged

    try:
        if env is None:
            dims = ParallelDims.single(cfg.parallel.backend)
        else:
            dims = ParallelDims.initialize(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, env,
                                           cfg.parallel.backend, cfg.parallel.timeout_s)
    except LayoutError as e:
        if env is None or env.local_rank == 0:  # every rank finds it; one per node says it
            print(f"error: {e}", file=sys.stderr)
        return 2
    trainer = None
    try:
        trainer = Trainer(cfg, dims, read_only=command == "eval", prefixes=prefixes)
        if command == "eval":
            return _eval(trainer, ckpt)
        result = trainer.fit()
        if cfg.run.sample_tokens > 0 and not result.preempted:
            # every rank generates (TP ranks must run the forward together); rank 0 prints
            text = trainer.sample(cfg.run.sample_prompt, cfg.run.sample_tokens)
            if dims.rank == 0:
                print("sample:\n" + text, flush=True)
        return 0
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ResumeError as e:
        if dims.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # said by rank 0, or by the one rank whose file it is
        if dims.rank == 0 or not e.everyone:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        # Free everything holding a process group or a finished collective's work while the
        # interpreter is whole (a rank then ends with exit_process, skipping finalisation,
        # where their release can abort a run that succeeded: SIGABRT, "terminate called
        # without an active exception").
        trainer = None
        gc.collect()
        dims.destroy()
        dims = None
        gc.collect()


def _bare_run_device_problem(backend: str, num_ranks: int) -> Optional[str]:
    """Why the ``num_ranks`` local ranks of a bare run cannot get a GPU each, or None."""
    from megalite.parallel.device import DeviceError, cuda_index, resolve_backend

    try:
        if resolve_backend(backend) == "nccl":
            cuda_index(0, num_ranks, under_srun=False,
                       why_local=" (a bare run starts parallel.dp*tp*pp ranks here)")
    except DeviceError as e:
        return str(e)
    return None


def _unwritable_run_dirs(cfg) -> Optional[str]:
    """The one-line problem with run.dir / checkpoint.dir that train would hit, or None.

    Creates the directories (train would, a moment later): the only sure test of writability,
    whoever runs it (root ignores permission bits)."""
    dirs = [("run.dir", cfg.run.dir)]
    if cfg.checkpoint.dir:
        dirs.append(("checkpoint.dir", cfg.checkpoint.dir))
    for name, path in dirs:
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".megalite-write-test-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            why = e.strerror or str(e)
            if isinstance(e, (FileExistsError, NotADirectoryError)):
                why += ": a file is in the way"
            return (f"{name}={path}: cannot write there ({why}); pass --{name}=DIR with a "
                    "writable directory")
    return None


def _resume_problem(cfg) -> Optional[str]:
    """Why the run directory's checkpoints stop this config, or None, by plain file reads
    before any rank starts: resume off beside another run's checkpoints; a missing, cut or
    truncated latest checkpoint; one past train.steps (another run's: the trainer would resume
    it and train nothing) or, in the per-layout format of before DCP, at another tp or pp."""
    from megalite.trainer import checkpoint
    from megalite.trainer.loop import resume_off_problem

    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")
    if not cfg.checkpoint.resume:
        return resume_off_problem(ckpt_dir)
    try:
        path = checkpoint.latest(ckpt_dir)  # its warning comes from the trainer's rank 0
        if path is None:
            return None
        meta = checkpoint.read_meta(path)
        checkpoint.check_sizes(path, meta)
        if cfg.checkpoint.verify == "full" and meta.get("files"):
            checkpoint.verify_all(path)
        step = int(meta["step"])
    except checkpoint.CheckpointError as e:
        return str(e)
    except (ValueError, KeyError, TypeError):
        return f"{path}/meta.json lacks a valid step or layout: not a megalite checkpoint"
    if step > cfg.train.steps:
        return (f"checkpoint.resume: {path} is at step {step}, past train.steps="
                f"{cfg.train.steps}: this run directory holds another run; give this one its "
                f"own --run.dir, raise train.steps, or pass --checkpoint.resume=false")
    if checkpoint.is_sharded(meta):
        return None  # layout-free: any dp, tp, pp, ZeRO stage
    return checkpoint.format1_problem(path, meta, cfg.parallel.tp, cfg.parallel.pp)


def _eval(trainer, ckpt: Optional[str]) -> int:
    from megalite.trainer import checkpoint

    warn = trainer._warn
    path = ckpt or checkpoint.latest(trainer.ckpt_dir, warn)
    if path is None:
        print(f"error: no checkpoint in {trainer.ckpt_dir}: train first or pass --checkpoint",
              file=sys.stderr)
        return 2
    path = checkpoint.latest(path, warn) or path  # accept a checkpoints directory too
    trainer.load_weights(path)
    loss = trainer.evaluate()
    if loss is None:
        print("error: the data split has no validation documents (data.split)", file=sys.stderr)
        return 2
    if trainer.dims.rank == 0:
        print(f"eval {path}: loss {loss:.4f} perplexity {math.exp(min(loss, 50)):.2f}", flush=True)
    return 0


def train_main(argv: List[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(_config_help("train", " [--dry_run [--rank R] [--world_size N]]")
              + "\n\n--dry_run: build rank R (default: the one predicted to peak) of the "
              "N-rank job on fake tensors, run one step, print its peak memory by kind "
              "(megalite/planner/dry_run.py); reads no data, writes nothing")
        return 0
    if "--dry_run" in argv:
        from megalite.planner.cli import dry_run_main

        return dry_run_main(argv)
    return run_ranks("train", argv)


def eval_main(argv: List[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(_config_help("eval", " [--checkpoint DIR]") + "\n\n--checkpoint DIR: a checkpoint "
              "(or a checkpoints directory; its latest); default: checkpoint.dir's latest")
        return 0
    return run_ranks("eval", argv)


def generate_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="megalite generate",
                                description="Sample text from a trained checkpoint (KV cache).")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory, a checkpoints directory (its latest is used), "
                        "a run directory (RUN_DIR/checkpoints) or hf:DIR (a Hugging Face "
                        "directory)")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=40, help="keep the k most likely tokens; 0 = all")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass; 1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    a = p.parse_args(argv)
    from megalite.serve.loading import LoadError, load_decoder
    from megalite.trainer.inference import sample_text

    try:  # refuses encoders with one line, as serve does
        loaded = load_decoder(a.checkpoint)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(sample_text(loaded.model, loaded.tokenizer, a.prompt, a.max_new_tokens,
                      a.temperature, a.top_k, a.top_p, a.seed))
    return 0


def bench_main(argv: List[str]) -> int:
    """``megalite bench kernels ...`` runs bench/kernels.py of this source checkout."""
    import importlib.util

    if not argv or argv[0] not in ("kernels",):
        print("usage: megalite bench kernels [options]   (megalite bench kernels --help)",
              file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "bench", f"{argv[0]}.py")
    if not os.path.isfile(path):
        print(f"error: {path} not found: benchmarks run from a source checkout (pip install -e .)",
              file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(f"megalite_bench_{argv[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv[1:])


# Commands whose code lives elsewhere, imported only when called ("module:function").
_ELSEWHERE = {"plan": "megalite.planner.cli:plan_main", "finetune": "megalite.finetune:main",
              "convert": "megalite.cli_files:convert_main",
              "checkpoint": "megalite.cli_files:checkpoint_main",
              "prepare-data": "megalite.data.prepare:main", "launch": "megalite.launcher.main:main",
              "serve": "megalite.serve.server:main"}


def _elsewhere(target: str):
    def run(argv: List[str]) -> int:
        import importlib

        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)(argv)
    return run


COMMANDS = {"train": train_main, "eval": eval_main, "generate": generate_main,
            "bench": bench_main,
            **{name: _elsewhere(target) for name, target in _ELSEWHERE.items()}}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(argv[1:])


def exit_process(code: int) -> None:
    """End the process with ``code``. A rank that started torch.distributed ends without the
    interpreter's finalisation (``os._exit``, after flushing stdout/stderr and finalising MPI):
    there gloo's threads and what its finished work holds are freed in an order that, now and
    then, aborts a run that succeeded ("terminate called without an active exception",
    SIGABRT after the last checkpoint; seen in CI). By then the process group is destroyed
    and every file the run writes is closed (checkpoints fsynced, metrics.jsonl closed)."""
    dims = sys.modules.get("megalite.parallel.dims")
    if dims is None or not dims.STARTED_PROCESS_GROUP:
        sys.exit(code)
    mpi = sys.modules.get("mpi4py.MPI")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


def entry(argv: Optional[List[str]] = None) -> None:
    """The process entry (``megalite`` console script, ``python -m megalite.cli`` and
    ``megalite.train``). A fatal signal (a rank's SIGABRT or SIGSEGV) prints its Python stack."""
    faulthandler.enable()
    exit_process(main(argv))


if __name__ == "__main__":
    entry()
