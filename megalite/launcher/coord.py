"""The launchers of a multi-node job watching each other, so one node's failure stops every node.

Node 0's launcher hosts a small key-value store (torch's ``TCPStore``) on ``MASTER_PORT + 1``,
listening on the advertised ``MASTER_ADDR`` only; every node's launcher connects to it and, each
time it polls its ranks:

* writes its heartbeat ``hb/<node>`` (a growing count);
* reads ``failed``: another node (or ``megalite launch`` itself, on Ctrl-C) reported a failure;
* checks that every other unfinished node's heartbeat moved in the last ``lost_after_s``
  (a launcher that was SIGKILLed or lost its network stops beating).

Losing the store (node 0's launcher gone) counts as a failure too. Node 0 keeps the store up
until every node has finished, so a slower node is not cut off.

The store has no authentication, so every value is signed: ``WRITER|COUNTER|MAC|PAYLOAD`` with
``MAC = HMAC-SHA256(k, key, writer, counter, payload)`` and ``k`` derived from the job's secret
(``MEGALITE_JOB_SECRET``, made by ``megalite launch``, never on a command line) and the store's
port, so a value from another job or an earlier attempt of this one does not verify. A value
that does not verify, or whose writer's counter went backwards (a replay), is ignored and
reported once per key. A reader prints what other nodes wrote only after :func:`sanitise`.
An outsider who can reach the port can still delete or flood keys (a denial of service, which
ends in a "stopped responding" failure, never in a forged one) and can read the values.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
import secrets
import sys
import time
import unicodedata
from typing import Callable, Dict, Mapping, Optional, Tuple

SECRET_ENV = "MEGALITE_JOB_SECRET"
MAX_REPORT = 4000  # characters of another node's failure report that are printed
_MISSING = "\x00missing"  # compare_set's answer for a key nobody wrote yet
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-_])")


def store_port(master_port: int) -> int:
    return master_port + 1


def new_secret() -> str:
    return secrets.token_hex(32)


def job_secret(environ: Mapping[str, str] = os.environ) -> str:
    secret = environ.get(SECRET_ENV, "")
    if len(secret) < 16:
        raise ValueError(
            f"{SECRET_ENV} is {'too short' if secret else 'not set'}: the node launchers sign "
            "what they tell each other with it. Start the nodes with --launcher pdsh/ssh (they "
            f"pass one on), or give every node the same {SECRET_ENV} of 16+ random characters "
            f"(e.g. `export {SECRET_ENV}=$(cat secret-file)` from a 0600 file)")
    return secret


def sanitise(text: str, limit: int = MAX_REPORT) -> str:
    """Printable text: terminal escape sequences dropped, other control and format characters
    (bidi overrides, zero-width ones) shown as ``\\xNN``/``\\uNNNN``, at most ``limit`` characters
    kept."""
    text = _ESCAPES.sub("", text)
    out = []
    for c in text:
        if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    text = "".join(out)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    return text


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class SignedStore:
    """A ``TCPStore`` whose values carry a MAC and a per-writer counter (see the module doc)."""

    def __init__(self, store, secret: str, port: int, writer: str,
                 warn: Callable[[str], None] = _warn):
        self.store, self.writer, self.warn = store, writer, warn
        self.key = hmac.new(secret.encode(), f"megalite coordination store, port {port}".encode(),
                            hashlib.sha256).digest()
        self.counter = time.time_ns()  # increasing across writers restarted in one store
        self._last: Dict[Tuple[str, str], Tuple[int, str]] = {}  # (key, writer) -> (count, value)
        self._reported = set()

    def _mac(self, key: str, writer: str, counter: int, payload: str) -> str:
        msg = "\0".join((key, writer, str(counter), payload)).encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def seal(self, key: str, payload: str) -> str:
        self.counter += 1
        mac = self._mac(key, self.writer, self.counter, payload)
        return f"{self.writer}|{self.counter}|{mac}|{payload}"

    def put(self, key: str, payload: str) -> None:
        self.store.set(key, self.seal(key, payload))

    def open(self, key: str, raw: str, writer: Optional[str] = None) -> Optional[str]:
        """The payload of ``raw`` read from ``key``, or None (and one warning) when it is not
        a genuine, fresh value (from ``writer`` only, when given)."""
        parts = raw.split("|", 3)
        if len(parts) != 4 or not parts[1].isdigit():
            return self._reject(key, "is not a signed value")
        who, count, mac, payload = parts[0], int(parts[1]), parts[2], parts[3]
        if not hmac.compare_digest(mac, self._mac(key, who, count, payload)):
            return self._reject(key, "carries a wrong MAC (not from this job)")
        if writer is not None and who != writer:
            return self._reject(key, f"was signed by {who!r}, not by its owner {writer!r}")
        last = self._last.get((key, who))
        if last is not None and count < last[0]:
            return self._reject(key, "is a replay (its counter went backwards)")
        self._last[(key, who)] = (count, payload)
        return payload

    def _reject(self, key: str, why: str) -> None:
        if (key, why) not in self._reported:
            self._reported.add((key, why))
            self.warn(f"megalite: warning: ignored a write to the coordination store's key "
                      f"{key!r} that {why}; someone else can reach its port")
        return None

    def get(self, key: str, writer: Optional[str] = None) -> Optional[str]:
        """The latest genuine payload of ``key`` (None when nothing genuine was written)."""
        raw = self.store.compare_set(key, _MISSING, _MISSING).decode(errors="replace")
        fresh = None if raw == _MISSING else self.open(key, raw, writer)
        if fresh is not None:
            return fresh
        # a forged or replayed value hides nothing: keep the last genuine one
        seen = [v for (k, w), v in self._last.items() if k == key and writer in (None, w)]
        return max(seen)[1] if seen else None


def _connect(master_addr: str, master_port: int, is_master: bool, timeout_s: float):
    from torch.distributed import TCPStore

    port = store_port(master_port)
    timeout = datetime.timedelta(seconds=timeout_s)
    if is_master:
        from megalite.parallel.store import serve

        return serve(master_addr, port, timeout, spans_nodes=True)
    return TCPStore(master_addr, port, is_master=False, timeout=timeout, wait_for_workers=False)


class NodeGroup:
    def __init__(self, master_addr: str, master_port: int, node_rank: int, num_nodes: int,
                 connect_timeout_s: float = 120.0, lost_after_s: float = 6.0,
                 secret: Optional[str] = None):
        secret = secret if secret is not None else job_secret()
        self.node_rank, self.num_nodes, self.lost_after_s = node_rank, num_nodes, lost_after_s
        store = _connect(master_addr, master_port, node_rank == 0, connect_timeout_s)
        self.store = SignedStore(store, secret, store_port(master_port), str(node_rank))
        self._beats = 0
        self.store.put(f"hb/{node_rank}", "0")  # joined
        now = time.time()
        self._seen: Dict[int, tuple] = {n: (None, now) for n in range(num_nodes) if n != node_rank}

    def _done(self, node: int) -> bool:
        return self.store.get(f"done/{node}", str(node)) is not None

    def fail(self, report: str) -> None:
        try:
            self.store.put("failed", report[:2 * MAX_REPORT])
        except Exception:  # the store is gone: the others find out by themselves
            pass

    def check(self) -> Optional[str]:
        """None while the job is healthy, else why this node must stop."""
        try:
            self._beats += 1
            self.store.put(f"hb/{self.node_rank}", str(self._beats))
            report = self.store.get("failed")
            if report is not None:
                return sanitise(report)
            now = time.time()
            for node, (beat, since) in self._seen.items():
                if self._done(node):
                    continue
                current = self.store.get(f"hb/{node}", str(node))
                if current != beat:
                    self._seen[node] = (current, now)
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
            self.store.put(f"done/{self.node_rank}", "1")
        except Exception:
            return 0  # node 0 already finished and left: it only leaves once all are done
        if self.node_rank != 0:
            return 0
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if all(self._done(n) for n in range(self.num_nodes)):
                return 0
            if self.check():
                return 1
            time.sleep(poll_s)
        return 1

    def close(self) -> None:
        self.store = None


def abort_job(master_addr: str, master_port: int, reason: str, secret: str,
              timeout_s: float = 3.0) -> bool:
    """From ``megalite launch`` (not a node): tell every node's launcher to stop its ranks."""
    try:
        store = _connect(master_addr, master_port, False, timeout_s)
        SignedStore(store, secret, store_port(master_port), "launch").put("failed", reason)
        return True
    except Exception:
        return False
