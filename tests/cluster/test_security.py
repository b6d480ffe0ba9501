"""An outsider on a second address against a real two-node job: two network namespaces (node 0
at 10.200.0.1, node 1 at 10.200.0.2, like cluster.sh's, but their own, so this runs beside the
SLURM cluster), one `megalite launch --launcher local --node_rank N` per node. Every listener
of node 0 is bound to 10.200.0.1 (none on 0.0.0.0/::), and from node 1's address a forged
`failed`, a forged `done/1` and forged and replayed heartbeats of node 1, written into the node
launchers' store, are ignored: the job ends normally with the losses of an unattacked run, and
each node prints one warning line per kind of write, without the attacker's escape sequences."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest

from helpers import REPO
from launcher_helpers import clean_env, losses, train_args, wait_for_step

pytestmark = pytest.mark.cluster
NS = ("mgsecA", "mgsecB")
ADDR = ("10.200.0.1", "10.200.0.2")
PORT = 29700
STEPS = 20  # the job outlasts the attack (about 2 s from the store's start)

ATTACK = r"""
import datetime, sys, time
from torch.distributed import TCPStore
deadline = time.time() + 120
while True:  # node 0's launcher opens the store before its ranks start
    try:
        s = TCPStore("10.200.0.1", PORT + 1, is_master=False, timeout=datetime.timedelta(seconds=2))
        break
    except Exception:
        assert time.time() < deadline, "no store"
        time.sleep(0.1)
while s.compare_set("hb/1", "\0", "\0") == b"\0":  # node 1 joined
    time.sleep(0.05)
old = s.get("hb/1")
time.sleep(0.5)  # node 1 has beaten since: `old` is stale
bad = "0" * 64
s.set("failed", f"launch|99999999999999999999|{bad}|\x1b[31mPWNED\x1b[0m: stop the job")
s.set("done/1", f"1|99999999999999999999|{bad}|1")
end, n = time.time() + 1.5, 0
while time.time() < end:  # the node polls at 10 Hz: it reads both kinds
    s.set("hb/1", old if n % 2 else f"1|99999999999999999999|{bad}|{n}")
    n += 1
    time.sleep(0.005)
print("attack done", n, flush=True)
""".replace("PORT", str(PORT))


def _sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _down():
    for ns in NS:
        if os.path.exists(f"/run/netns/{ns}"):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:  # only what this test started in its own namespaces
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def two_hosts():
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("network-namespace tests need root on Linux")
    missing = [t for t in ("ip", "nsenter", "ss") if not shutil.which(t)]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run `tests/cluster/cluster.sh install`")
    _down()
    for ns in NS:
        _sh("ip", "netns", "add", ns)
    _sh("ip", "link", "add", "msecA", "type", "veth", "peer", "name", "msecB")
    for ns, dev, addr in zip(NS, ("msecA", "msecB"), ADDR):
        _sh("ip", "link", "set", dev, "netns", ns)
        _sh("ip", "-n", ns, "link", "set", dev, "name", "eth1")
        _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth1")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "link", "set", "eth1", "up")
    yield
    _down()


def _in(node, *cmd):
    return ["nsenter", f"--net=/run/netns/{NS[node]}", *cmd]


def test_outsider_on_a_second_address_cannot_steer_a_two_node_job(two_hosts, tmp_path,
                                                                   data_cache):
    args = train_args(str(tmp_path / "ref"), data_cache, STEPS)
    args[args.index("--parallel.tp=2")] = "--parallel.tp=1"
    ref = subprocess.run([sys.executable, "-m", "megalite.train", *args], env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]

    run_dir = str(tmp_path / "job")
    args[args.index(f"--run.dir={tmp_path / 'ref'}")] = f"--run.dir={run_dir}"
    env = clean_env(MEGALITE_JOB_SECRET=secrets.token_hex(32), GLOO_SOCKET_IFNAME="eth1")
    nodes = [subprocess.Popen(
        _in(n, sys.executable, "-m", "megalite.launcher", "--launcher", "local", "--num_nodes",
            "2", "--num_gpus", "1", "--node_rank", str(n), "--master_addr", ADDR[0],
            "--master_port", str(PORT), "-m", "megalite.train", *args),
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for n in (0, 1)]
    attacker = subprocess.Popen(_in(1, sys.executable, "-c", ATTACK), env=clean_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run_dir, 1, nodes[0])  # every listener of the job is open
        listeners = subprocess.run(_in(0, "ss", "-ltnH"), capture_output=True, text=True,
                                   timeout=30).stdout
        out, err = attacker.communicate(timeout=150)
        attack = subprocess.CompletedProcess([], attacker.returncode, out, err)
        running = [p.poll() is None for p in nodes]
        print(f"attack ended at step {max(losses(run_dir))} of {STEPS}")
        outs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in [*nodes, attacker]:
            if p.poll() is None:
                p.kill()
    assert attack.returncode == 0 and "attack done" in attack.stdout, attack.stderr[-2000:]
    assert running == [True, True], "the job ended before the attack did: lengthen it"
    bound = [line.split()[3] for line in listeners.splitlines() if line.strip()]
    assert f"{ADDR[0]}:{PORT}" in bound and f"{ADDR[0]}:{PORT + 1}" in bound, bound
    assert all(b.startswith((ADDR[0] + ":", "127.")) for b in bound), bound  # no 0.0.0.0, ::

    for node, (p, out) in enumerate(zip(nodes, outs)):
        assert p.returncode == 0, (node, out[-3000:])
        assert "PWNED" not in out and "\x1b" not in out, out[-3000:]
        warned = [line for line in out.splitlines() if "ignored a write" in line]
        print(f"node {node}:", *warned, sep="\n  ")
        assert len(warned) == len(set(warned)), warned  # once per key and reason
        assert any("key 'failed' that carries a wrong MAC" in w for w in warned), out[-3000:]
    warned0 = outs[0]
    # node 0 sees only the latest value of hb/1, which node 1's own beats also overwrite: under
    # load its 10 Hz poll may catch one kind of forged beat and not the other (both kinds are
    # checked deterministically in tests/test_launcher_security.py)
    assert ("key 'hb/1' that carries a wrong MAC" in warned0
            or "key 'hb/1' that is a replay" in warned0), warned0[-3000:]
    assert "key 'done/1' that carries a wrong MAC" in warned0, warned0[-3000:]
    expected, got = losses(str(tmp_path / "ref")), losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1)), (got, expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), (step, got, expected)
