"""The README's "Using it" block, run as a new user would: every command, top to bottom, in one
fresh directory holding only what the repository ships (configs/, examples/).

The block says how to shorten it in a ``# fewer steps: append ARGS to every train line``
comment; this test appends those ARGS to each training command (``megalite train``, ``torchrun
... megalite.train``; not ``--help``) and nothing else: the rest runs verbatim, lines continued
with ``\\`` joined and comments dropped (``shlex``, no shell). Each command must exit 0, and each
training command must have trained its own run directory: config.yaml, one metrics row per
step 1..N (so nothing resumed another run's checkpoint) and a checkpoint at step N.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import List, Tuple

import pytest
import yaml

from helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.world]

SECTION = "## Using it"


def readme_block() -> Tuple[List[List[str]], List[str]]:
    """(commands of the "Using it" fenced block as argv lists, the fewer-steps ARGS)."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    fewer = re.search(r"^# fewer steps: append (.+?) to every train line$", block, re.M)
    assert fewer, "the block must say how to run it with fewer steps"
    joined = re.sub(r"\\\n", " ", block)
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [c for c in commands if c], shlex.split(fewer.group(1))


def trains(argv: List[str]) -> bool:
    if argv[0] == "torchrun":
        return "megalite.train" in argv
    return argv[:2] == ["megalite", "train"] and "--help" not in argv


def option(argv: List[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{' '.join(argv)}: no {name}")


def test_readme_commands_run_top_to_bottom(tmp_path):
    commands, fewer = readme_block()
    steps = int(option(fewer, "--train.steps"))
    for shipped in ("configs", "examples"):  # a fresh clone: only what the repository ships
        shutil.copytree(os.path.join(REPO, shipped), tmp_path / shipped)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    # `megalite` and `torchrun` of this environment, importing this checkout
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    run_dirs = []
    timings = []
    for argv in commands:
        if trains(argv):  # on the CPU even where a GPU is (the README's auto: nccl there)
            argv = argv + fewer + ["--parallel.backend=gloo"]
            run_dirs.append(option(argv, "--run.dir"))
        start = time.perf_counter()
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        timings.append(f"{time.perf_counter() - start:5.1f} s  {' '.join(argv)[:90]}")
        assert r.returncode == 0, f"{' '.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, f"{' '.join(argv)}\n{r.stderr[-3000:]}"
    print("\n".join(timings))
    assert len(run_dirs) == len(set(run_dirs)) >= 8, run_dirs  # every run its own directory
    for run_dir in run_dirs:
        path = tmp_path / run_dir
        rows = [json.loads(line) for line in open(path / "metrics.jsonl")]
        assert [row["step"] for row in rows] == list(range(1, steps + 1)), run_dir
        assert "val_loss" in rows[-1], run_dir
        assert (path / "config.yaml").exists(), run_dir
        assert open(path / "checkpoints" / "latest").read().strip() == f"step_{steps:08d}"
    # under torchrun parallel.dp=auto became the launcher's world size / (tp x pp)
    torchrun = next(c for c in commands if c[0] == "torchrun")
    saved = yaml.safe_load(open(tmp_path / option(torchrun, "--run.dir") / "config.yaml"))
    assert saved["parallel"]["dp"] == int(option(torchrun, "--nproc_per_node"))
