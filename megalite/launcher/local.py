"""Start the ranks of one node as child processes (what a bare ``megalite train`` does when its
config asks for more than one rank). If any rank fails, the others are stopped; SIGINT/SIGTERM
are forwarded to every rank; no child outlives the launcher."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, threads: int,
             base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def launch_local(module_args: List[str], world_size: int, grace_s: float = 10.0) -> int:
    """Run ``python -m <module_args>`` as ``world_size`` ranks; return the job's exit code."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [subprocess.Popen([sys.executable, "-m", *module_args],
                              env=rank_env(r, world_size, port, threads))
             for r in range(world_size)]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                r = failed[0]
                print(f"megalite: rank {r} exited with code {codes[r]}; stopping the other ranks",
                      file=sys.stderr, flush=True)
                _stop(procs, grace_s)
                return codes[r] if codes[r] > 0 else 128 - codes[r]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        _stop(procs, grace_s)
        for s, h in previous.items():
            signal.signal(s, h)


def _stop(procs: List[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
