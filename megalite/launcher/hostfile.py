"""Which hosts and slots a job runs on: the DeepSpeed hostfile (``host slots=N``), the
``--include``/``--exclude`` filters (``NODE[:SLOT[,SLOT]][@NODE...]``), ``--num_nodes`` and
``--num_gpus``. Every host name is validated here, once, so nothing later can pass a shell
metacharacter to a remote shell.

The result is an ordered ``{host: [slot, ...]}``: node rank = position, global ranks are numbered
host by host, slot by slot.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Optional

# RFC 1123 host names and IPv4 addresses: letters, digits, '-', '.', '_' (common in practice);
# never starting with '-' (it would read as an option to ssh/pdsh/mpirun).
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")


class HostfileError(ValueError):
    """A hostfile line, filter or host name that cannot be used; the message names it."""


def validate_host(name: str, where: str = "host name") -> str:
    if not _HOST.fullmatch(name or ""):
        raise HostfileError(f"{where}: {name!r} is not a valid host name (letters, digits, "
                            "'.', '-', '_' only; no spaces or shell characters)")
    return name


def parse_hostfile(text: str, source: str = "hostfile") -> "OrderedDict[str, int]":
    """``host slots=N`` lines, ``#`` comments and blank lines; a bad or duplicate line is an error
    naming the file, the line number and the line."""
    hosts: "OrderedDict[str, int]" = OrderedDict()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}: {raw.strip()!r}"
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\S+)", line)
        if not m:
            raise HostfileError(f"{where}: expected 'HOST slots=N'")
        host, slots = m.group(1), m.group(2)
        validate_host(host, where)
        if not slots.isdigit() or int(slots) < 1:
            raise HostfileError(f"{where}: slots must be a positive integer, got {slots!r}")
        if host in hosts:
            raise HostfileError(f"{where}: host {host!r} is listed twice")
        hosts[host] = int(slots)
    if not hosts:
        raise HostfileError(f"{source}: no hosts (expected lines like 'node1 slots=8')")
    return hosts


def read_hostfile(path: str) -> "OrderedDict[str, int]":
    try:
        with open(path, encoding="utf-8") as f:
            return parse_hostfile(f.read(), path)
    except FileNotFoundError:
        raise HostfileError(f"hostfile {path!r} does not exist") from None


def parse_filter(spec: str, flag: str = "--include") -> "OrderedDict[str, Optional[List[int]]]":
    """``node1:0,2@node2`` -> {node1: [0, 2], node2: None (every slot)}."""
    out: "OrderedDict[str, Optional[List[int]]]" = OrderedDict()
    for part in spec.split("@"):
        host, _, slots = part.partition(":")
        validate_host(host, f"{flag} {spec!r}")
        if host in out:
            raise HostfileError(f"{flag} {spec!r}: host {host!r} is named twice")
        if not _:
            out[host] = None
            continue
        items = slots.split(",")
        if not all(s.isdigit() for s in items):
            raise HostfileError(f"{flag} {spec!r}: slots of {host!r} must be integers, "
                                f"got {slots!r}")
        out[host] = sorted({int(s) for s in items})
    return out


def select(hosts: "Dict[str, int]", include: str = "", exclude: str = "",
           num_nodes: int = -1, num_slots: int = -1) -> "OrderedDict[str, List[int]]":
    """Apply include/exclude (mutually exclusive), then keep the first ``num_nodes`` hosts and the
    first ``num_slots`` slots of each."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be used together")
    active = OrderedDict((h, list(range(n))) for h, n in hosts.items())
    flag, spec = ("--include", include) if include else ("--exclude", exclude)
    chosen = parse_filter(spec, flag) if spec else OrderedDict()
    for host, slots in chosen.items():
        if host not in active:
            raise HostfileError(f"{flag} {spec!r}: host {host!r} is not in the hostfile "
                                f"(hosts: {', '.join(active)})")
        bad = [s for s in slots or [] if s not in active[host]]
        if bad:
            raise HostfileError(f"{flag} {spec!r}: {host!r} has slots 0..{len(active[host]) - 1}, "
                                f"not {bad}")
    if include:
        active = OrderedDict((h, s if s is not None else active[h]) for h, s in chosen.items())
    elif exclude:
        for host, slots in chosen.items():
            active[host] = [] if slots is None else [s for s in active[host] if s not in slots]
        active = OrderedDict((h, s) for h, s in active.items() if s)
    if num_nodes > 0:
        if num_nodes > len(active):
            raise HostfileError(f"--num_nodes {num_nodes}: only {len(active)} host(s) available")
        active = OrderedDict(list(active.items())[:num_nodes])
    if num_slots > 0:
        short = [h for h, s in active.items() if len(s) < num_slots]
        if short:
            raise HostfileError(f"--num_gpus {num_slots}: host(s) {', '.join(short)} have fewer "
                                "slots")
        active = OrderedDict((h, s[:num_slots]) for h, s in active.items())
    if not active:
        raise HostfileError("no hosts left after --include/--exclude")
    return active


def world_size(resources: "Dict[str, List[int]]") -> int:
    return sum(len(s) for s in resources.values())


def rank_offset(resources: "Dict[str, List[int]]", node_rank: int) -> int:
    """Global rank of the first rank on node ``node_rank``."""
    return sum(len(s) for s in list(resources.values())[:node_rank])
