"""The launcher against an outsider: the node launchers' store accepts only signed, fresh values
(a forged, foreign or replayed write is ignored and reported once), prints another node's text
only sanitised, keeps the job secret off every command line, and a one-machine job listens on
loopback only. (From a second network namespace: tests/cluster/test_security.py.)"""
from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import sys
import time
import uuid

import pytest

from launcher_helpers import clean_env, tagged, train_args, wait_for_step, wait_gone
from megalite.launcher import coord
from megalite.launcher.coord import NodeGroup, SignedStore, abort_job, sanitise
from megalite.launcher.local import free_port
from megalite.launcher.main import main as launch_main
from megalite.launcher.nodeenv import read_env
from megalite.launcher.runners import Job, PDSHRunner, SSHRunner

SECRET = "s" * 32


class DictStore:
    """The two TCPStore calls SignedStore makes, on a dict."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def compare_set(self, key, expected, desired):
        return self.data.get(key, expected.encode())


def test_signed_values_forged_foreign_replayed_and_impersonated_are_ignored_once():
    raw, warnings = DictStore(), []
    node1 = SignedStore(raw, SECRET, 29501, "1")
    reader = SignedStore(raw, SECRET, 29501, "0", warn=warnings.append)
    assert reader.get("hb/1", "1") is None  # nothing written yet: no warning
    node1.put("hb/1", "1")
    old = raw.data["hb/1"]
    node1.put("hb/1", "2")
    assert reader.get("hb/1", "1") == "2" and reader.get("hb/1", "1") == "2"  # re-read is fine
    raw.data["hb/1"] = old  # an outsider replays a genuine, older value
    assert reader.get("hb/1", "1") == "2"  # ignored: the last genuine value stays
    node1.put("hb/1", "3")
    assert reader.get("hb/1", "1") == "3"
    forged = [b"1", b"launch|99999999999999999999|" + b"0" * 64 + b"|stop",
              SignedStore(raw, "another job's secret!", 29501, "launch").seal("failed", "x"),
              SignedStore(raw, SECRET, 29503, "launch").seal("failed", "x"),  # earlier attempt
              node1.seal("hb/1", "x")]  # signed for another key
    for value in forged:
        raw.data["failed"] = value.encode() if isinstance(value, str) else value
        assert reader.get("failed") is None
        assert reader.get("failed") is None
    raw.data["hb/1"] = SignedStore(raw, SECRET, 29501, "0").seal("hb/1", "9").encode()
    assert reader.get("hb/1", "1") == "3"  # node 0 may not beat for node 1
    assert len(warnings) == 4, warnings  # one line per key and reason, not one per read
    assert all(w.startswith("megalite: warning: ignored a write to the coordination store's "
                            "key ") and "\n" not in w for w in warnings)
    assert ["not a signed value" in w for w in warnings].count(True) == 1
    assert ["wrong MAC" in w for w in warnings].count(True) == 1
    assert any("replay" in w and "'hb/1'" in w for w in warnings)
    assert any("not by its owner '1'" in w for w in warnings)
    node1.put("failed", "rank 3 died")
    assert reader.get("failed") == "rank 3 died"


def test_sanitise_drops_escapes_shows_controls_and_caps_length():
    text = ("\x1b[2J\x1b[31mred\x1b[0m \x1b]0;title\x07ok\nline\ttab \x00nul \x07bel "
            "\u202egnp.exe \u200bzw \x9bcsi")
    assert sanitise(text) == ("red ok\nline\ttab \\x00nul \\x07bel \\u202egnp.exe \\u200bzw "
                              "\\x9bcsi")
    long = sanitise("é" * 5000, limit=100)
    assert long == "é" * 100 + "... (4900 more characters)"


def _listeners(pids):
    """(address, port) of every listening TCP socket the processes hold (what `ss -ltnp`
    shows), read from /proc."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    addr, port = local.split(":")
                    raw = bytes.fromhex(addr)
                    if width == 4:
                        ip = ".".join(str(b) for b in raw[::-1])
                    else:  # four little-endian 32-bit words
                        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                        ip = ":".join(words[i:i + 2].hex() for i in range(0, 16, 2))
                    found.append((ip, int(port, 16)))
    return found


def _loopback(ip):
    return ip.startswith("127.") or ip == "0000:0000:0000:0000:0000:0000:0000:0001"


def test_node_group_on_a_real_store_ignores_an_outsider(capsys):
    from torch.distributed import TCPStore

    port = free_port()
    node0 = NodeGroup("127.0.0.1", port, 0, 2, secret=SECRET)
    node1 = NodeGroup("127.0.0.1", port, 1, 2, secret=SECRET)
    assert _listeners([os.getpid()]).count(("127.0.0.1", port + 1)) == 1  # not 0.0.0.0
    outsider = TCPStore("127.0.0.1", port + 1, is_master=False,
                        timeout=datetime.timedelta(seconds=5))
    outsider.set("failed", "0|1|" + "f" * 64 + "|\x1b[31mforged")
    assert node0.check() is None and node1.check() is None
    assert abort_job("127.0.0.1", port, "stop", secret="wrong secret, 32 characters...")
    assert node0.check() is None  # written, but not signed with this job's secret
    assert abort_job("127.0.0.1", port, "stop \x1b[1mnow", secret=SECRET)
    assert node0.check() == "stop now" and node1.check() == "stop now"
    node1.fail("rank 3 was killed\n    \x1b]0;pwned\x07last line \u202e")
    assert node0.check() == "rank 3 was killed\n    last line \\u202e"
    err = capsys.readouterr().err
    assert err.count("key 'failed' that carries a wrong MAC") == 2, err  # once per node
    assert "\x1b" not in err
    node1.close()
    node0.close()


def test_hand_started_node_without_a_secret_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.delenv(coord.SECRET_ENV, raising=False)
    code = launch_main(["--launcher", "local", "--num_nodes", "2", "--node_rank", "1",
                        "--master_port", str(free_port()), "--no_python", "true"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert f"{coord.SECRET_ENV} is not set" in err


def _job(tmp_path):
    return Job(resources={"node1": [0], "node2": [0]}, user_cmd=["prog", "--x"],
               master_addr="node1", master_port=29500, exports={"NCCL_DEBUG": "INFO"},
               cwd=str(tmp_path), python="/venv/bin/python")


def test_ssh_and_pdsh_pass_the_secret_on_stdin_or_a_0600_file(tmp_path, monkeypatch):
    from megalite.launcher import runners

    seen = {}

    def fake_run(commands, env, on_signal=None, stdin=None):
        seen.update(commands=commands, env=env, stdin=stdin,
                    files={f: (stat.S_IMODE(os.stat(tmp_path / f).st_mode),
                               json.loads((tmp_path / f).read_text()))
                           for f in os.listdir(tmp_path)})
        return 0

    monkeypatch.setattr(runners, "run_forwarding_signals", fake_run)
    job = _job(tmp_path)
    assert SSHRunner(job).run() == 0
    sent = [json.loads(s) for s in seen["stdin"]]
    assert sent == [{"NCCL_DEBUG": "INFO", coord.SECRET_ENV: job.secret}] * 2
    assert len(job.secret) == 64 and seen["files"] == {}
    for cmd in seen["commands"]:
        assert job.secret not in " ".join(cmd) and "INFO" not in " ".join(cmd)
        assert "megalite.launcher.nodeenv --env - --launcher local" in cmd[-1]
    assert job.secret not in seen["env"].values()  # not even in ssh's own environment

    assert PDSHRunner(job).run() == 0
    (name, (mode, content)), = seen["files"].items()
    assert mode == 0o600 and content == sent[0]
    assert f"--env {tmp_path / name} " in seen["commands"][0][-1]
    assert job.secret not in " ".join(seen["commands"][0]) and seen["stdin"] is None
    assert os.listdir(tmp_path) == []  # removed when the job ended
    path = tmp_path / "env.json"
    path.write_text(json.dumps({"A": "1"}))
    path.chmod(0o644)
    with pytest.raises(ValueError, match="mode 0644.*must be 0600"):
        read_env(str(path))
    path.chmod(0o600)
    assert read_env(str(path)) == {"A": "1"}


@pytest.mark.world
def test_one_machine_job_listens_on_loopback_only(tmp_path, data_cache):
    """A bare dp=2 run: its launcher and ranks hold listening sockets (the rendezvous store on
    MASTER_PORT, gloo's pairs) on 127.0.0.1 only."""
    tag, run_dir = uuid.uuid4().hex, str(tmp_path / "run")
    env = clean_env(MEGALITE_TEST_TAG=tag)
    env.pop("GLOO_SOCKET_IFNAME", None)
    env.pop("NCCL_SOCKET_IFNAME", None)
    args = train_args(run_dir, data_cache, 100000)
    args[args.index("--parallel.tp=2")] = "--parallel.tp=1"
    proc = subprocess.Popen([sys.executable, "-m", "megalite.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 1, proc)  # training: every listener is open
        procs = tagged(tag)
        listening = _listeners(procs)
        master_port = {int(e["MASTER_PORT"]) for e in procs.values() if "MASTER_PORT" in e}
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    print(listening)
    assert len(procs) == 3, procs.keys()  # the launcher and its two ranks
    assert len(master_port) == 1 and ("127.0.0.1", master_port.pop()) in listening, listening
    assert len(listening) >= 3, listening  # the store and each rank's gloo listener
    assert all(_loopback(ip) for ip, _ in listening), (listening, out[-2000:])
    assert wait_gone(tag, 10) == {}


FAKE_SSH = """#!/bin/sh
# ssh [options] -- HOST COMMAND: run COMMAND here, stdin passed through
printf '%s\\n' "$*" >> "$FAKE_LOG"; env >> "$FAKE_LOG"
while [ "$1" != "--" ]; do shift; done
exec sh -c "$3"
"""
FAKE_PDSH = """#!PYTHON
# pdsh -S -f N -w HOSTS [args] COMMAND: COMMAND once per host here, %n its index (no stdin)
import os, re, subprocess, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(sys.argv) + "\\n" + "\\n".join(f"{k}={v}" for k, v in os.environ.items()))
hosts = sys.argv[sys.argv.index("-w") + 1].split(",")
procs = [subprocess.Popen(["sh", "-c", re.sub("%(.)", lambda m: str(i) if m[1] == "n" else m[1],
                                              sys.argv[-1])], stdin=subprocess.DEVNULL)
         for i in range(len(hosts))]
sys.exit(max(p.wait() for p in procs))
"""


@pytest.mark.world
def test_ssh_and_pdsh_node_launchers_get_the_variables_and_secret_off_the_command_line(
        tmp_path):
    """Two node launchers (one rank each) started through stand-ins for ssh and pdsh that run
    the remote command on this machine: the forwarded variable reaches every rank, the nodes'
    signed store works (the job succeeds), and the secret is in no argv or ssh/pdsh env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "pdsh").write_text(FAKE_PDSH.replace("PYTHON", sys.executable))
    for tool in ("ssh", "pdsh"):
        (bin_dir / tool).chmod(0o755)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    for launcher in ("ssh", "pdsh"):
        log = tmp_path / f"{launcher}.log"
        env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log))
        env.pop(coord.SECRET_ENV, None)
        r = subprocess.run(
            [sys.executable, "-m", "megalite.launcher", "-H", str(hostfile), "--launcher",
             launcher, "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
             "--env", "MEGALITE_X=it's 100%", "--no_python", "sh", "-c",
             'echo "rank $RANK: $MEGALITE_X, secret=$MEGALITE_JOB_SECRET."'],
            env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
        assert r.returncode == 0, (launcher, r.stdout[-2000:], r.stderr[-2000:])
        secrets_seen = {line.split("secret=")[1].split(".")[0]
                        for line in r.stdout.splitlines() if "secret=" in line}
        assert "rank 0: it's 100%, secret=" in r.stdout, r.stdout
        assert "rank 1: it's 100%, secret=" in r.stdout, r.stdout
        secret, = secrets_seen  # one secret, shared by both nodes
        assert len(secret) == 64
        text = log.read_text()
        assert "nodeenv --env" in text and secret not in text  # in no argv, not in ssh's env
        assert "100%" not in text.split("\n")[0]
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".megalite-env-")]
