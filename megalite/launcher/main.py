"""``megalite launch``: the deepspeed launcher's flags with their meaning, plus restarts, per-rank
logs and environment forwarding. See ``megalite launch --help``."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from megalite.launcher.checks import (LaunchError, check_options, check_target, count,
                                      non_negative, port)
from megalite.launcher.hostfile import HostfileError, rank_offset, read_hostfile, select
from megalite.launcher.runners import RUNNERS, Job, decode_world_info

FORWARDED_PREFIXES = ("NCCL_", "PYTHON", "MEGALITE_", "OMP_", "GLOO_", "TORCH_")
ENV_FILE = ".megalite_env"
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

DESCRIPTION = """Start a multi-process job on this machine or on several nodes.

  megalite launch --num_gpus 4 -m megalite.train --config configs/tiny.yaml --parallel.dp=4
  megalite launch -H hostfile --launcher pdsh -m megalite.train --config ...
  megalite launch --launcher slurm --sbatch --num_nodes 2 --num_gpus 8 -m megalite.train ...

Every rank gets RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Variables
named NCCL_*, PYTHON*, MEGALITE_*, OMP_*, GLOO_*, TORCH_*, those in a .megalite_env file (home
directory, then the current one; KEY=VALUE lines) and each --env KEY=VALUE reach every rank on
every node. When a rank fails, the whole job stops and the failing rank's log tail is printed.
Before anything starts, the script, -m module or --no_python program is looked up on this
machine: every backend runs it with this machine's Python from this directory, so the nodes are
expected to share the file system."""


class _Parser(argparse.ArgumentParser):
    """A usage error is one ``error:`` line (not argparse's usage block), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message}; see megalite launch --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="megalite launch", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("-H", "--hostfile", default=None,
      help="lines 'HOST slots=N' ('#' comments); default: this machine only")
    a("-i", "--include", default="", help="only these NODE[:SLOT[,SLOT]][@NODE...]")
    a("-e", "--exclude", default="", help="all but these NODE[:SLOT[,SLOT]][@NODE...]")
    a("--num_nodes", "--nnodes", type=count, default=-1, help="use the first N hosts")
    a("--num_gpus", "--nproc_per_node", type=count, default=-1,
      help="ranks per node (slots 0..N-1); default: the hostfile's slots, else the GPU count, "
           "else 1")
    a("--node_rank", default=None,
      help="this node's rank, for a node started by hand or by pdsh/ssh/srun (--launcher local); "
           "nodes started by hand share a secret: export the same MEGALITE_JOB_SECRET on each")
    a("--world_info", default=None, help=argparse.SUPPRESS)  # hosts+slots, from pdsh/ssh
    a("--master_addr", default=None, help="rank 0's address; default: the first host")
    a("--master_port", type=port, default=None,
      help="rendezvous port (29500); node launchers also use the next one")
    a("--launcher", default="local", choices=sorted(RUNNERS), help="how to start the ranks")
    a("--launcher_args", default="", help="extra arguments for pdsh/ssh/srun/mpirun/sbatch")
    a("--ssh_port", type=port, default=None, help="ssh port of the nodes (pdsh, ssh)")
    a("--sbatch", action="store_true",
      help="slurm outside an allocation: write an sbatch script and submit it")
    a("--gpus_per_node", type=non_negative, default=None,
      help="--sbatch: GPUs to request per node (0: a CPU job); default: one per rank for "
           "backend nccl, or backend auto with --num_gpus, else none")
    a("--cpus_per_task", type=count, default=None,
      help="--sbatch: CPUs per rank; default: the node's CPUs (sinfo) / ranks per node")
    a("-m", "--module", action="store_true", help="the target is a Python module (python -m)")
    a("--no_python", action="store_true", help="the target is a program, run without python")
    a("--max_restarts", type=non_negative, default=0,
      help="restart the whole job up to N times after a failure (it resumes from its latest "
           "checkpoint)")
    a("--log_dir", default=None, help="one log file per rank: LOG_DIR/rank_<RANK>.log")
    a("--env", action="append", default=[], metavar="KEY=VALUE", help="set on every rank")
    a("--dry_run", action="store_true", help="print the command and exit")
    a("user_script", help="script, module (-m) or program (--no_python)")
    a("user_args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def parse_env_pairs(pairs: List[Tuple[str, str]]) -> Dict[str, str]:
    """(where, "KEY=VALUE") pairs -> dict; a bad pair is an error naming where it came from."""
    out: Dict[str, str] = {}
    for where, pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise LaunchError(f"{where}: expected KEY=VALUE with KEY a variable name, "
                              f"got {pair!r}")
        out[key] = value
    return out


def read_env_file(path: str) -> Dict[str, str]:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                pairs.append((f"{path}:{number}", line))
    return parse_env_pairs(pairs)


def exports(args, environ=os.environ) -> Dict[str, str]:
    """What every rank on every node receives, in increasing precedence."""
    out = {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES)}
    for folder in (os.path.expanduser("~"), os.getcwd()):
        path = os.path.join(folder, ENV_FILE)
        if os.path.isfile(path):
            out.update(read_env_file(path))
    out.update(parse_env_pairs([("--env", e) for e in args.env]))
    return out


def default_slots() -> int:
    try:
        import torch

        return torch.cuda.device_count() or 1
    except ImportError:
        return 1


def resources(args) -> "OrderedDict[str, List[int]]":
    if args.world_info:
        return OrderedDict(decode_world_info(args.world_info))
    if args.hostfile:
        return select(read_hostfile(args.hostfile), args.include, args.exclude,
                      args.num_nodes, args.num_gpus)
    slots = args.num_gpus if args.num_gpus > 0 else default_slots()
    if args.launcher == "local" and args.num_nodes > 1:  # nodes started by hand, torchrun-style
        return OrderedDict((f"node{n}", list(range(slots))) for n in range(args.num_nodes))
    if args.launcher == "slurm" and args.num_nodes > 0:
        return OrderedDict((f"node{n}", list(range(slots))) for n in range(args.num_nodes))
    hosts = {"localhost": slots}
    return select(hosts, args.include, args.exclude)


def user_command(args) -> List[str]:
    if args.no_python:
        return [args.user_script, *args.user_args]
    if args.module:
        return [sys.executable, "-u", "-m", args.user_script, *args.user_args]
    return [sys.executable, "-u", args.user_script, *args.user_args]


def make_job(args, attempt: int = 0) -> Job:
    res = resources(args)
    multi = len(res) > 1 or args.launcher != "local"
    addr = args.master_addr or (next(iter(res)) if multi and args.hostfile else "127.0.0.1")
    if args.master_port is None and not multi:
        from megalite.launcher.local import free_port

        port = free_port()
    else:
        port = (args.master_port or 29500) + 2 * attempt  # +1 is the node launchers' store
    launcher_args = shlex.split(args.launcher_args)
    return Job(resources=res, user_cmd=user_command(args), master_addr=addr, master_port=port,
               exports=exports(args), launcher_args=launcher_args, ssh_port=args.ssh_port,
               log_dir=args.log_dir, named_hosts=bool(args.hostfile or args.world_info))


def run_node_share(args, job: Job) -> int:
    """--launcher local with several nodes: start this node's ranks and join the others."""
    from megalite.launcher.coord import NodeGroup
    from megalite.launcher.local import NodePlan, run_node

    if args.node_rank is None:
        raise LaunchError(f"{len(job.resources)} nodes with --launcher local: pass --node_rank "
                          "(or use --launcher pdsh/ssh/slurm/openmpi to start every node)")
    node = int(args.node_rank)
    if not 0 <= node < len(job.resources):
        raise LaunchError(f"--node_rank {node}: must be in 0..{len(job.resources) - 1}")
    plan = NodePlan(cmd=job.user_cmd, world_size=job.world_size, master_addr=job.master_addr,
                    master_port=job.master_port, slots=list(job.resources.values())[node],
                    first_rank=rank_offset(job.resources, node), node_rank=node,
                    log_dir=job.log_dir)
    group = NodeGroup(job.master_addr, job.master_port, node, len(job.resources))
    return run_node(plan, group=group)


def submit_sbatch(args, job: Job) -> int:
    import subprocess

    from megalite.launcher import sbatch

    tasks = len(next(iter(job.resources.values())))
    backend, tp = sbatch.train_settings(job.user_cmd, job.world_size)
    gpus = sbatch.gpus_per_node(args.gpus_per_node, args.num_gpus > 0, tasks, backend)
    cpus, why = sbatch.cpus_per_task(args.cpus_per_task, sbatch.partition(job.launcher_args),
                                     gpus, tasks)
    script = sbatch.render(job, nodes=len(job.resources), tasks_per_node=tasks,
                           res=sbatch.Resources(cpus_per_task=cpus, gpus_per_node=gpus, tp=tp))
    folder = args.log_dir or os.getcwd()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"megalite-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    # 0600: the script carries the forwarded variables' values
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w",
              encoding="utf-8") as f:
        f.write(script)
    cmd = ["sbatch", "--parsable", *job.launcher_args, path]
    print(f"megalite: {len(job.resources)} node(s) x {tasks} task(s), {cpus} CPU(s) per task "
          f"({why}), {gpus} GPU(s) per node (backend {backend})", flush=True)
    print(f"megalite: submitting {path}: {shlex.join(cmd)}", flush=True)
    if args.dry_run:
        return 0
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        hint = (f"; it asked for {gpus} GPU(s) per node: for a CPU job pass "
                "--parallel.backend=gloo or --gpus_per_node 0") if gpus else ""
        print(f"error: sbatch failed: {' '.join(r.stderr.split())}{hint}", file=sys.stderr)
        return r.returncode
    print(f"megalite: submitted job {r.stdout.strip()}", flush=True)
    return 0


def launch(args) -> int:
    runner_cls = RUNNERS[args.launcher]
    for attempt in range(args.max_restarts + 1):
        job = make_job(args, attempt)
        if args.launcher == "local" and len(job.resources) > 1:
            code = run_node_share(args, job)
        else:
            runner = runner_cls(job)
            if args.launcher == "slurm" and (args.sbatch or "SLURM_JOB_ID" not in os.environ):
                if not args.sbatch:
                    raise LaunchError("--launcher slurm outside a SLURM allocation: add --sbatch "
                                      "to submit a batch job, or run inside salloc/sbatch")
                return submit_sbatch(args, job)
            if not runner.exists():
                raise LaunchError(f"--launcher {args.launcher}: {runner.tool!r} is not on PATH")
            if args.dry_run:
                print(shlex.join(runner.command()))
                return 0
            code = runner.run()
        if code == 0 or attempt == args.max_restarts:
            return code
        print(f"megalite: job failed (exit code {code}); restart {attempt + 1} of "
              f"{args.max_restarts}", file=sys.stderr, flush=True)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its line already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        check_options(args)  # everything before any process starts: options, hosts, target
        for flag in ("gpus_per_node", "cpus_per_task"):
            if getattr(args, flag) is not None and not (args.launcher == "slurm" and args.sbatch):
                raise LaunchError(f"--{flag} {getattr(args, flag)}: only --launcher slurm "
                                  "--sbatch uses it; drop it, or add those options")
        resources(args)
        check_target(args, exports(args))
        return launch(args)
    except (LaunchError, HostfileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
