"""What ``megalite launch`` checks before it starts anything: option values argparse cannot
judge alone, and that the target (script, ``-m`` module or ``--no_python`` program) exists.

A wrong value found here costs one ``error:`` line and exit code 2; found later, it costs a
process per rank, each failing with its own traceback. The target is looked up on this machine
for every backend: pdsh/ssh/slurm/openmpi run it with this machine's Python from this machine's
working directory (``cd CWD && exec PYTHON ...``), which presumes the nodes share that file
system. A node launcher (what pdsh/ssh start on each node) checks its ``--no_python`` program
again on its own node.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import shutil
import sys
from typing import Dict, List, Optional

MAX_PORT = 65535


class LaunchError(ValueError):
    """A launch option or target that cannot work; the message names it, its value and the fix."""


def count(text: str) -> int:
    """argparse type of --num_gpus/--num_nodes: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more (omit the option for the "
                                         "default)")
    return value


def non_negative(text: str) -> int:
    """argparse type of --max_restarts: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more (0: no restart)")
    return value


def port(text: str) -> int:
    """argparse type of --master_port/--ssh_port: a TCP port."""
    value = _int(text)
    if not 1 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text}: a TCP port is in 1..{MAX_PORT}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None


def check_options(args: argparse.Namespace) -> None:
    """Cross-option checks (each option alone was checked by its argparse type)."""
    if args.master_port is not None:
        # node launchers rendezvous on port+1; restart k moves both up by 2k
        top = args.master_port + 1 + 2 * args.max_restarts
        if top > MAX_PORT:
            raise LaunchError(f"--master_port {args.master_port}: with --max_restarts "
                              f"{args.max_restarts} the job would use ports up to {top}; "
                              f"use a port of at most {MAX_PORT - 1 - 2 * args.max_restarts}")
    if args.node_rank is not None and not str(args.node_rank).isdigit():
        raise LaunchError(f"--node_rank {args.node_rank!r}: must be an integer >= 0 (this "
                          "node's position in the hostfile)")
    if args.module and args.no_python:
        raise LaunchError("-m and --no_python exclude each other: -m runs a Python module, "
                          "--no_python a program")


def check_target(args: argparse.Namespace, exports: Dict[str, str],
                 cwd: Optional[str] = None) -> None:
    """The script, module or program exists here (see the module docstring for remote nodes)."""
    cwd = cwd or os.getcwd()
    target = args.user_script
    if args.no_python:
        search = exports.get("PATH", os.environ.get("PATH", os.defpath))
        if shutil.which(target, path=search) is not None:
            return
        where = os.path.join(cwd, target) if os.sep in target else None
        if where and os.path.isfile(where):
            raise LaunchError(f"--no_python {target}: the file is not executable; chmod +x it")
        raise LaunchError(f"--no_python {target}: no such program "
                          f"{'file' if where else 'on PATH'}; give an executable's path or a "
                          "command on PATH")
    if args.module:
        if not module_exists(target, _python_path(exports, cwd)):
            raise LaunchError(f"-m {target}: no module of that name for {_python()} (looked in "
                              f"{cwd} and its sys.path); check the name, install the package "
                              "or add its folder to PYTHONPATH")
        return
    path = os.path.join(cwd, target)
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "__main__.py")):
        return
    hint = "; for a module add -m" if _looks_like_module(target) else ""
    raise LaunchError(f"{target}: no such script (in {cwd}){hint}; for a program use "
                      "--no_python")


def module_exists(name: str, path: List[str]) -> bool:
    """Whether ``python -m name`` finds it, without running any package's ``__init__``:
    the top-level name through every finder, each submodule in its parent's folders only."""
    parts = name.split(".")
    if not all(p.isidentifier() for p in parts):
        return False
    spec = importlib.machinery.PathFinder.find_spec(parts[0], path)
    if spec is None:
        spec = importlib.util.find_spec(parts[0])  # builtins, frozen, editable-install finders
    for depth in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return False
        spec = importlib.machinery.PathFinder.find_spec(
            ".".join(parts[:depth + 1]), list(spec.submodule_search_locations))
    return spec is not None


def _python_path(exports: Dict[str, str], cwd: str) -> List[str]:
    """Roughly a rank's sys.path: its working directory (``python -m`` puts it first), the
    PYTHONPATH it receives, then this interpreter's own path."""
    extra = [p for p in exports.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [cwd, *extra, *sys.path]


def _python() -> str:
    return sys.executable


def _looks_like_module(target: str) -> bool:
    return "." in target and not target.endswith(".py") and os.sep not in target and all(
        p.isidentifier() for p in target.split("."))
