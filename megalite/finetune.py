"""``megalite finetune --task classification``: fine-tune an encoder (bert) checkpoint or an HF
BERT directory as a sequence classifier on labelled JSON lines, in any layout, then report
accuracy and F1 on the evaluation file.

It is ``megalite train`` with the model section read from the source (``checkpoint.init_from``:
weights only, fresh optimizer; a pooler and classifier the source lacks are seed-initialised),
``model.num_labels`` from the training labels, the source's tokenizer, and the ``finetune``
section naming the files; every other ``--section.field`` override passes through. After
training, rank 0 (or the bare process) scores the final checkpoint on ``--eval`` in one process
and writes ``RUN_DIR/finetune_eval.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List

import numpy as np
import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite finetune", description=__doc__.split("\n\n")[0],
        epilog="Other options are config overrides, e.g. --train.lr=5e-5 --parallel.tp=2 "
               "--run.dir=runs/sst2 (megalite train --help lists them).")
    p.add_argument("--task", required=True, choices=["classification"])
    p.add_argument("--train", required=True, help="training examples, JSON lines")
    p.add_argument("--eval", help="evaluation examples, JSON lines (accuracy and F1)")
    p.add_argument("--init_from", required=True,
                   help="a bert checkpoint (or run directory) or hf:DIR (BertForMaskedLM or "
                        "BertForSequenceClassification, safetensors)")
    p.add_argument("--glue_task", help="GLUE task whose field names the files use (sst2, mrpc, "
                                       "qnli, mnli, ...)")
    p.add_argument("--text_field")
    p.add_argument("--text_pair_field")
    p.add_argument("--label_field")
    p.add_argument("--num_labels", type=int, help="classes (default: largest train label + 1)")
    p.add_argument("--epochs", type=float, default=3.0,
                   help="passes over the training file (unless --train.steps is given)")
    return p


def build_argv(a: argparse.Namespace, rest: List[str]) -> List[str]:
    """The ``megalite train`` arguments of this fine-tuning run (raises ValueError, one line)."""
    from megalite.data.classification import load_classification_jsonl
    from megalite.interop.init_from import read_source
    from megalite.models import same_model_fields

    args, _, tokenizer = read_source(a.init_from)  # the weights are read lazily: none here
    if args.family != "bert":
        raise ValueError(f"--init_from {a.init_from}: a {args.family} model; classification "
                         "fine-tuning takes a bert encoder")
    if args.type_vocab_size != 2:
        raise ValueError(f"--init_from {a.init_from}: type_vocab_size={args.type_vocab_size}; "
                         "megalite's bert has 2 segments")
    if tokenizer is None:
        raise ValueError(f"--init_from {a.init_from}: no tokenizer.json beside the weights; "
                         "save the tokenizer there (tokenizer.save_pretrained(DIR))")
    train = load_classification_jsonl(a.train, a.text_field, a.text_pair_field, a.label_field,
                                      a.glue_task)
    if train.regression:
        raise ValueError(f"--train {a.train}: {a.glue_task} is a regression task; "
                         "--task classification needs integer labels")
    labels = a.num_labels or train.num_labels
    out = ["--model.family=bert", f"--model.num_labels={labels}",
           *(f"--model.{n}={getattr(args, n)}" for n in same_model_fields("bert", labels)
             if n != "family" and getattr(args, n) is not None),  # init_from compares them
           f"--checkpoint.init_from={a.init_from}", f"--data.tokenizer={tokenizer}",
           f"--data.seq_len={min(128, args.max_seq_len)}", f"--finetune.train={a.train}",
           "--run.dir=runs/finetune", "--run.sample_tokens=0", "--data.source=synthetic",
           "--train.lr=5e-5", "--train.min_lr=0", "--train.lr_schedule=linear",
           "--train.weight_decay=0.01", "--train.micro_batch_size=32"]
    for flag, value in (("eval", a.eval), ("task", a.glue_task), ("text_field", a.text_field),
                        ("text_pair_field", a.text_pair_field),
                        ("label_field", a.label_field)):
        if value is not None:
            out.append(f"--finetune.{flag}={value}")
    if not any(x.startswith("--train.steps") for x in rest):
        gbs = _global_batch(out + rest)
        steps = max(1, math.ceil(a.epochs * len(train) / gbs))
        out += [f"--train.steps={steps}", f"--train.warmup_steps={steps // 10}"]
    return out + rest


def _global_batch(argv: List[str]) -> int:
    """The global batch these train arguments resolve to (config files, overrides, dp=auto
    under a launcher), as ``megalite train`` will resolve it."""
    from megalite.config import parse_args
    from megalite.parallel.env import discover

    env = discover()
    cfg, _ = parse_args([*argv, "--train.steps=1", "--train.warmup_steps=0"], verbose=False,
                        world_size=env.world_size if env is not None else None)
    return cfg.train.global_batch_size


def evaluate(run_dir: str, cfg_argv: List[str]) -> Dict[str, float]:
    """Accuracy and F1 (binary: of class 1; else macro) of the run's final checkpoint on the
    evaluation file, in one process."""
    from megalite.config import parse_args
    from megalite.data.tokenizer import load_tokenizer
    from megalite.trainer import objective
    from megalite.trainer.inference import load_for_inference

    cfg, _ = parse_args(cfg_argv, verbose=False)
    model, _ = load_for_inference(run_dir)
    model.eval()
    val = objective.labelled_examples(cfg, load_tokenizer(cfg.data.tokenizer), 1,
                                      training=False)  # the training file is not read
    preds, gold = [], []
    with torch.no_grad():
        for lo in range(0, val.n, 64):
            rows = val.rows(np.arange(lo, min(lo + 64, val.n)))
            logits = model(rows["tokens"], attention_mask=rows["attention_mask"],
                           token_types=rows["token_types"])
            preds.append(logits.argmax(-1))
            gold.append(rows["labels"])
    p, g = torch.cat(preds), torch.cat(gold)
    return {"examples": int(g.numel()), "accuracy": (p == g).float().mean().item(),
            "f1": _f1(p, g, cfg.model.num_labels)}


def _f1(pred: torch.Tensor, gold: torch.Tensor, classes: int) -> float:
    def f1_of(c: int) -> float:
        tp = ((pred == c) & (gold == c)).sum().item()
        denom = (pred == c).sum().item() + (gold == c).sum().item()
        return 2 * tp / denom if denom else 0.0
    return f1_of(1) if classes == 2 else sum(f1_of(c) for c in range(classes)) / classes


def main(argv: List[str]) -> int:
    from megalite.cli import run_ranks
    from megalite.data.inputs import DataError
    from megalite.parallel.env import discover

    a, rest = _parser().parse_known_args(argv)
    try:
        train_argv = build_argv(a, rest)
    except (ValueError, OSError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = run_ranks("train", train_argv)
    env = discover()
    if code != 0 or not a.eval or (env is not None and env.rank != 0):
        return code
    run_dir = [x.split("=", 1)[1] for x in train_argv if x.startswith("--run.dir=")][-1]
    scores = evaluate(run_dir, train_argv)
    print(f"eval {a.eval}: accuracy {scores['accuracy']:.4f}, f1 {scores['f1']:.4f} "
          f"({scores['examples']} examples)", flush=True)
    with open(os.path.join(run_dir, "finetune_eval.json"), "w") as f:
        json.dump({"eval": a.eval, **scores}, f, indent=1)
    return 0
