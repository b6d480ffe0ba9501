"""The launchers of a multi-node job watching each other, so one node's failure stops every node.

Node 0's launcher hosts a small key-value store (torch's ``TCPStore``) on ``MASTER_PORT + 1``;
every node's launcher connects to it and, each time it polls its ranks:

* bumps its heartbeat counter ``hb/<node>``;
* reads ``failed``: another node (or ``megalite launch`` itself, on Ctrl-C) reported a failure;
* checks that every other unfinished node's heartbeat moved in the last ``lost_after_s``
  (a launcher that was SIGKILLed or lost its network stops beating).

Losing the store (node 0's launcher gone) counts as a failure too. Node 0 keeps the store up
until every node has finished, so a slower node is not cut off.
"""
from __future__ import annotations

import datetime
import time
from typing import Dict, Optional


def store_port(master_port: int) -> int:
    return master_port + 1


class NodeGroup:
    def __init__(self, master_addr: str, master_port: int, node_rank: int, num_nodes: int,
                 connect_timeout_s: float = 120.0, lost_after_s: float = 6.0):
        from torch.distributed import TCPStore

        self.node_rank, self.num_nodes, self.lost_after_s = node_rank, num_nodes, lost_after_s
        self.store = TCPStore(master_addr, store_port(master_port), is_master=node_rank == 0,
                              timeout=datetime.timedelta(seconds=connect_timeout_s),
                              wait_for_workers=False)
        self.store.set(f"hb/{node_rank}", "0")  # joined
        now = time.time()
        self._seen: Dict[int, tuple] = {n: (-1, now) for n in range(num_nodes) if n != node_rank}

    def _read(self, key: str) -> int:
        return self.store.add(key, 0)

    def fail(self, report: str) -> None:
        try:
            self.store.set("failed_report", report)
            self.store.add("failed", 1)
        except Exception:  # the store is gone: the others find out by themselves
            pass

    def check(self) -> Optional[str]:
        """None while the job is healthy, else why this node must stop."""
        try:
            self.store.add(f"hb/{self.node_rank}", 1)
            if self._read("failed"):
                return self.store.get("failed_report").decode(errors="replace")
            now = time.time()
            for node, (count, since) in self._seen.items():
                if self._read(f"done/{node}"):
                    continue
                beat = self._read(f"hb/{node}")
                if beat != count:
                    self._seen[node] = (beat, now)
                elif now - since > self.lost_after_s:
                    return (f"node {node}'s launcher stopped responding for "
                            f"{now - since:.0f} s (killed, or its host is unreachable)")
        except Exception as e:  # node 0's launcher (the store) is gone
            return f"lost contact with node 0's launcher ({type(e).__name__}: {e})"
        return None

    def finish(self, wait_s: float = 600.0, poll_s: float = 0.2) -> int:
        """This node's ranks all succeeded. Node 0 keeps the store up until the other nodes are
        done too; 0 when the whole job succeeded, 1 when another node failed meanwhile."""
        try:
            self.store.add(f"done/{self.node_rank}", 1)
        except Exception:
            return 0  # node 0 already finished and left: it only leaves once all are done
        if self.node_rank != 0:
            return 0
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if all(self._read(f"done/{n}") for n in range(self.num_nodes)):
                return 0
            if self.check():
                return 1
            time.sleep(poll_s)
        return 1

    def close(self) -> None:
        self.store = None


def abort_job(master_addr: str, master_port: int, reason: str, timeout_s: float = 3.0) -> bool:
    """From ``megalite launch`` (not a node): tell every node's launcher to stop its ranks."""
    try:
        from torch.distributed import TCPStore

        store = TCPStore(master_addr, store_port(master_port), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        store.set("failed_report", reason)
        store.add("failed", 1)
        return True
    except Exception:
        return False
