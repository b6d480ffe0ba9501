"""The ranks of one node as child processes, watched until they end.

This is what a bare ``megalite train`` runs, what ``megalite launch --launcher local`` runs, and
what pdsh/ssh start on every node. Guarantees:

* each rank gets ``RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT`` and one
  thread (``OMP_NUM_THREADS=1``) unless told otherwise;
* a rank that dies or exits non-zero stops every other rank within a few seconds (SIGTERM, then
  SIGKILL after ``grace_s``); the launcher names the rank and prints the tail of its log;
* on several nodes a :class:`~megalite.launcher.coord.NodeGroup` spreads that failure to the other
  nodes' launchers, so nobody waits in a collective for a peer that is gone;
* a one-machine job (``MASTER_ADDR=127.0.0.1``) listens on loopback only: the ranks' rendezvous
  store and gloo's/NCCL's sockets (:mod:`megalite.parallel.store`); this launcher listens on none;
* SIGINT/SIGTERM are forwarded to every rank; ranks die with their launcher (``PR_SET_PDEATHSIG``)
  so no rank outlives it, even when the launcher itself is SIGKILLed.
"""
from __future__ import annotations

import collections
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

TAIL_LINES = 25


def _ephemeral_range() -> Tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(span: int = 2) -> int:
    """A port P with P .. P+span-1 free (the job's stores take MASTER_PORT and MASTER_PORT+1),
    drawn below the kernel's ephemeral range: a port the kernel hands out itself (bind to 0) can
    be taken by any process's next outgoing connection before our listener binds it."""
    lo, _ = _ephemeral_range()
    if lo > 10000 + span:
        rng = random.SystemRandom()
        for _ in range(64):
            port = rng.randrange(10000, lo - span)
            if all(_bindable(port + k) for k in range(span)):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NodePlan:
    """What one node's launcher starts."""
    cmd: List[str]  # one rank's command line, e.g. [python, -u, -m, megalite.train, ...]
    world_size: int
    master_addr: str
    master_port: int
    slots: List[int]  # the node's slots (GPU indices); len(slots) ranks run here
    first_rank: int = 0  # global rank of local rank 0
    node_rank: int = 0
    env: Dict[str, str] = field(default_factory=lambda: dict(os.environ))
    log_dir: Optional[str] = None  # one file per rank: rank_<RANK>.log


def rank_env(plan: NodePlan, local_rank: int) -> Dict[str, str]:
    env = dict(plan.env)
    env.update(RANK=str(plan.first_rank + local_rank), WORLD_SIZE=str(plan.world_size),
               LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(len(plan.slots)),
               NODE_RANK=str(plan.node_rank), MASTER_ADDR=plan.master_addr,
               MASTER_PORT=str(plan.master_port), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    if plan.slots != list(range(len(plan.slots))):  # --include node:1,3 picks those GPUs
        env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(map(str, plan.slots)))
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL me when my launcher dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Rank:
    """One child process, its output copied to the launcher's stdout and its log file."""

    def __init__(self, plan: NodePlan, local_rank: int):
        self.rank = plan.first_rank + local_rank
        self.local_rank = local_rank
        self.tail: Deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.log_path = (os.path.join(plan.log_dir, f"rank_{self.rank}.log")
                         if plan.log_dir else None)
        self.proc = subprocess.Popen(plan.cmd, env=rank_env(plan, local_rank),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=(_die_with_parent if sys.platform == "linux"
                                                 else None))
        self.reader = threading.Thread(target=self._copy_output, daemon=True)
        self.reader.start()

    def _copy_output(self) -> None:
        prefix = b"" if self.rank == 0 else f"[rank {self.rank}] ".encode()
        log = open(self.log_path, "ab") if self.log_path else None
        try:
            for line in iter(self.proc.stdout.readline, b""):
                self.tail.append(line.decode(errors="replace").rstrip("\n"))
                if log:
                    log.write(line)
                    log.flush()
                try:
                    sys.stdout.buffer.write(prefix + line)
                    sys.stdout.flush()
                except (BrokenPipeError, ValueError):
                    pass
        finally:
            if log:
                log.close()

    def signal(self, signum: int, group_too: bool = False) -> None:
        """Signal the rank's process group (``group_too``: even when the rank itself has ended,
        for what it left behind)."""
        if group_too or self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signum)  # the rank and anything it started
            except (ProcessLookupError, PermissionError):
                pass

    def describe_exit(self) -> str:
        code = self.proc.returncode
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with code {code}")
        return f"rank {self.rank} (local rank {self.local_rank}, pid {self.proc.pid}) {how}"

    def tail_text(self) -> str:
        self.reader.join(timeout=1.0)  # let the last lines arrive
        where = f" ({self.log_path})" if self.log_path else ""
        lines = "\n".join("    " + line for line in self.tail) or "    (no output)"
        return f"last {len(self.tail)} lines of its log{where}:\n{lines}"


def exit_code(returncode: int) -> int:
    return returncode if returncode > 0 else 128 - returncode


def run_node(plan: NodePlan, grace_s: float = 3.0, group=None, poll_s: float = 0.1) -> int:
    """Start the node's ranks and watch them; the node's exit code (0 when every rank succeeded).
    ``group`` (a NodeGroup) connects this node's launcher with the other nodes' launchers."""
    if plan.log_dir:
        os.makedirs(plan.log_dir, exist_ok=True)
    ranks = [Rank(plan, i) for i in range(len(plan.slots))]
    received: List[int] = []

    def forward(signum, frame):
        received.append(signum)
        for r in ranks:
            r.signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            failed = [r for r in ranks if r.proc.poll() not in (None, 0)]
            if failed and not received:
                first = min(failed, key=lambda r: r.rank)
                host = socket.gethostname()
                message = f"{first.describe_exit()} on node {plan.node_rank} ({host})"
                report = f"{message}; stopping the job.\n{first.tail_text()}"
                print(f"megalite: {report}", file=sys.stderr, flush=True)
                if group:
                    group.fail(report)
                stop(ranks, grace_s)
                return exit_code(first.proc.returncode)
            if all(r.proc.poll() is not None for r in ranks):
                if received:
                    codes = [r.proc.returncode for r in ranks]
                    return max((exit_code(c) for c in codes if c), default=128 + received[0])
                return group.finish() if group else 0
            peer = group.check() if group else None
            if peer:
                print(f"megalite: node {plan.node_rank}: stopping its ranks: {peer}",
                      file=sys.stderr, flush=True)
                stop(ranks, grace_s)
                return 1
            time.sleep(poll_s)
    finally:
        stop(ranks, grace_s)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if group:
            group.close()


def stop(ranks: List[Rank], grace_s: float) -> None:
    """SIGTERM every live rank, SIGKILL what is left after ``grace_s``, reap them all."""
    for r in ranks:
        r.signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for r in ranks:
        try:
            r.proc.wait(timeout=max(0.05, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for r in ranks:
        r.signal(signal.SIGKILL, group_too=True)
        r.proc.wait()


def launch_local(module_args: List[str], world_size: int, grace_s: float = 3.0) -> int:
    """Run ``python -m <module_args>`` as ``world_size`` ranks on this machine; the job's exit
    code. (A bare multi-rank ``megalite train`` lands here.)"""
    # this process already printed the config's conflict and warning lines: rank 0 says
    # them again only under a launcher that parsed nothing (torchrun, megalite launch)
    env = dict(os.environ, MEGALITE_CONFIG_SHOWN="1")
    plan = NodePlan(cmd=[sys.executable, "-u", "-m", *module_args], world_size=world_size,
                    master_addr="127.0.0.1", master_port=free_port(),
                    slots=list(range(world_size)), env=env)
    return run_node(plan, grace_s)
