"""The rendezvous store the ranks meet at (torch's ``TCPStore`` on ``MASTER_PORT``), listening on
the one address the job advertises instead of on every interface.

``init_process_group("env://")`` makes rank 0 listen on ``*:MASTER_PORT`` even when
``MASTER_ADDR=127.0.0.1``, with no authentication: anyone who can reach the machine can read and
write the store the process groups are built from. So rank 0 binds the listening socket itself,
to ``MASTER_ADDR``'s address, and hands it to ``TCPStore`` (``master_listen_fd``); the store goes
to ``init_process_group(store=...)``. A one-machine job (``MASTER_ADDR`` a loopback address, as
the bare run and ``megalite launch`` on one node use) also keeps gloo's and NCCL's own sockets on
the loopback interface. torch's store cannot carry a MAC: binding is the protection here (the
node launchers' store, :mod:`megalite.launcher.coord`, signs its values).
"""
from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import socket
import sys
from typing import Mapping, MutableMapping, Tuple

from torch.distributed import Store, TCPStore

from megalite.parallel.env import LaunchEnv

LOOPBACK_IFNAME = "lo0" if sys.platform == "darwin" else "lo"


def resolve(addr: str) -> Tuple[int, str]:
    """(address family, numeric address) of a host name or address; IPv4 first."""
    infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return infos[0][0], infos[0][4][0]


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(resolve(addr)[1]).is_loopback
    except (OSError, ValueError):
        return False


def listen_socket(addr: str, port: int) -> socket.socket:
    """A listening socket on ``addr``'s address only. An address that is not this machine's (a
    NAT or a load balancer in front of it) falls back to every interface, with one warning."""
    family, host = resolve(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            sock.close()
            raise
        print(f"megalite: warning: MASTER_ADDR={addr} ({host}) is not an address of this "
              f"machine; the rendezvous store listens on every interface", file=sys.stderr)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    sock.listen(1024)
    return sock


def confine_to_loopback(environ: MutableMapping[str, str] = os.environ) -> None:
    """gloo and NCCL open their own listening sockets on an interface they pick (the host
    name's address, the first non-loopback NIC): on one machine, the loopback one. A value the
    user set wins."""
    environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_IFNAME)
    environ.setdefault("NCCL_SOCKET_IFNAME", LOOPBACK_IFNAME)


def rendezvous_store(env: LaunchEnv, timeout_s: float,
                     environ: Mapping[str, str] = os.environ) -> Store:
    """Rank 0 hosts the store on ``env.master_addr``'s address; the others connect to it. Under
    torchrun its agent already hosts one on ``MASTER_PORT`` (its own listener): every rank
    connects to it, with the prefix torch's ``env://`` uses there."""
    timeout = datetime.timedelta(seconds=timeout_s)
    one_machine = env.local_world_size == env.world_size
    if one_machine and is_loopback(env.master_addr):
        confine_to_loopback()
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        from torch.distributed import PrefixStore

        client = TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                          timeout=timeout)
        return PrefixStore(f"/worker/attempt_{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                           client)
    if env.rank != 0:
        return TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                        timeout=timeout)
    return serve(env.master_addr, env.master_port, timeout, env.world_size,
                 spans_nodes=not one_machine)


def serve(addr: str, port: int, timeout: datetime.timedelta, world_size=None,
          spans_nodes: bool = False) -> TCPStore:
    """A master ``TCPStore`` listening on ``addr``'s address only (see :func:`listen_socket`).
    ``spans_nodes`` with a host name that resolves to loopback here (``127.0.1.1 node1`` in a
    Debian /etc/hosts) cannot be what the other nodes reach: every interface, with a warning."""
    try:
        literal = ipaddress.ip_address(addr) is not None
    except ValueError:
        literal = False
    if spans_nodes and not literal and is_loopback(addr):
        print(f"megalite: warning: {addr} resolves to a loopback address on this machine but "
              f"the job spans several nodes; the store on port {port} listens on every "
              "interface (set the master address to this node's network address)",
              file=sys.stderr)
        addr_to_bind = "0.0.0.0"
    else:
        addr_to_bind = addr
    sock = listen_socket(addr_to_bind, port)
    fd = sock.detach()  # the store owns (and closes) the descriptor from here on
    spare = os.dup(fd)  # for a second try on the non-libuv server
    kwargs = dict(is_master=True, timeout=timeout, wait_for_workers=False)
    try:
        try:
            return TCPStore(addr, port, world_size, master_listen_fd=fd, **kwargs)
        except TypeError:  # a torch without master_listen_fd
            os.close(fd)
            print("megalite: warning: this torch's TCPStore takes no listening socket; the "
                  f"store on port {port} listens on every interface", file=sys.stderr)
            return TCPStore(addr, port, world_size, **kwargs)
        except (RuntimeError, ValueError):  # older libuv servers refuse a given socket
            fd, spare = spare, -1
            return TCPStore(addr, port, world_size, master_listen_fd=fd, use_libuv=False,
                            **kwargs)
    finally:
        if spare >= 0:
            os.close(spare)
