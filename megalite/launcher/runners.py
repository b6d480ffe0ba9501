"""One class per way of starting a multi-process job. Each says whether its tool is installed
(``exists()``) and builds its command as an argument list (``command()``); nothing is built by
joining user input into a string except the one remote-shell string for pdsh/ssh, where every
piece goes through ``shlex.quote``. No forwarded variable is on a remote command line (see
:mod:`megalite.launcher.nodeenv`): they carry the job's secret (:mod:`megalite.launcher.coord`).

=========  ==================================================================================
local      this machine's ranks, in this process's launcher (:mod:`megalite.launcher.local`)
pdsh       ``pdsh -w HOSTS`` runs one node launcher per host; ``%n`` is its node rank
ssh        one ``ssh HOST`` per node, each a node launcher with an explicit node rank
slurm      inside an allocation: ``srun`` one task per rank; outside: ``sbatch`` a script
openmpi    ``mpirun`` one process per rank over a converted hostfile, ``-x`` per variable
=========  ==================================================================================
"""
from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from megalite.launcher.coord import SECRET_ENV, new_secret
from megalite.launcher.hostfile import world_size


@dataclass
class Job:
    """Everything a backend needs; built once by ``megalite launch`` from its flags."""
    resources: Dict[str, List[int]]  # ordered {host: [slots]}
    user_cmd: List[str]  # one rank's command, e.g. [python, -u, -m, megalite.train, --config, x]
    master_addr: str
    master_port: int
    exports: Dict[str, str] = field(default_factory=dict)  # forwarded to every rank
    launcher_args: List[str] = field(default_factory=list)  # extra args for pdsh/ssh/srun/mpirun
    ssh_port: Optional[int] = None
    log_dir: Optional[str] = None
    named_hosts: bool = True  # False: placeholder names (no hostfile); SLURM picks the nodes
    python: str = sys.executable
    cwd: str = field(default_factory=os.getcwd)
    secret: str = field(default_factory=new_secret, repr=False)  # signs the node launchers' store

    @property
    def world_size(self) -> int:
        return world_size(self.resources)

    @property
    def hosts(self) -> List[str]:
        return list(self.resources)

    def node_env(self) -> Dict[str, str]:
        """What node launchers receive (on stdin or in a 0600 file): the forwarded variables
        and the job's secret (one the user exported wins)."""
        return {SECRET_ENV: self.secret, **self.exports}

    def world_info(self) -> str:
        """The resources as a URL-safe base64 JSON token (passes through any shell untouched)."""
        raw = json.dumps(list(self.resources.items())).encode()
        return base64.urlsafe_b64encode(raw).decode()


def decode_world_info(token: str) -> Dict[str, List[int]]:
    return dict((h, s) for h, s in json.loads(base64.urlsafe_b64decode(token.encode())))


class Runner:
    name = ""
    tool = ""

    def __init__(self, job: Job):
        self.job = job

    def exists(self) -> bool:
        return shutil.which(self.tool) is not None

    def command(self) -> List[str]:
        raise NotImplementedError

    def env(self) -> Dict[str, str]:
        """The environment of the launching tool itself."""
        return dict(os.environ, **self.job.exports)

    def run(self) -> int:
        return run_forwarding_signals([self.command()], self.env())

    def abort_nodes(self) -> None:
        """On Ctrl-C/SIGTERM: tell the node launchers (pdsh/ssh) to stop their ranks, since a
        remote command does not die with the local ssh client."""
        from megalite.launcher.coord import abort_job

        abort_job(self.job.master_addr, self.job.master_port,
                  "megalite launch was interrupted (SIGINT/SIGTERM)",
                  self.job.node_env()[SECRET_ENV])


class LocalRunner(Runner):
    """One node: the ranks are children of this process."""
    name = "local"

    def exists(self) -> bool:
        return True

    def command(self) -> List[str]:
        return node_launcher_cmd(self.job, "0")

    def run(self) -> int:
        from megalite.launcher.local import NodePlan, run_node

        plan = NodePlan(cmd=self.job.user_cmd, world_size=self.job.world_size,
                        master_addr=self.job.master_addr, master_port=self.job.master_port,
                        slots=next(iter(self.job.resources.values())), env=self.env(),
                        log_dir=self.job.log_dir)
        return run_node(plan)


def node_launcher_cmd(job: Job, node_rank: str) -> List[str]:
    """The command one node runs: ``megalite launch --launcher local`` for its share of ranks."""
    cmd = [job.python, "-u", "-m", "megalite.launcher", "--launcher", "local",
           "--world_info", job.world_info(), "--node_rank", node_rank,
           "--master_addr", job.master_addr, "--master_port", str(job.master_port)]
    if job.log_dir:
        cmd += ["--log_dir", job.log_dir]
    return cmd + ["--no_python", *job.user_cmd]


def remote_shell_cmd(job: Job, node_rank: str, env_source: str = "-") -> str:
    """The string a remote shell runs: cd, then the node launcher, which reads the forwarded
    variables from ``env_source`` (stdin ``-`` or a 0600 file). Every piece quoted."""
    cmd = node_launcher_cmd(job, node_rank)
    launcher = [*cmd[:3], "megalite.launcher.nodeenv", "--env", env_source, *cmd[4:]]
    return f"cd {shlex.quote(job.cwd)} && exec " + " ".join(shlex.quote(a) for a in launcher)


_RANK_SLOT = "\0"  # see PDSHRunner.command


class PDSHRunner(Runner):
    name, tool = "pdsh", "pdsh"

    env_file = "ENV_FILE"  # run() writes the real one

    def command(self) -> List[str]:
        # pdsh expands %h/%u/%n in the command: escape every '%', then put pdsh's %n where the
        # node rank goes. The placeholder is a NUL byte, which no argument, variable or path
        # can contain, so no user text is ever taken for it.
        remote = remote_shell_cmd(self.job, _RANK_SLOT, self.env_file).replace("%", "%%")
        assert remote.count(shlex.quote(_RANK_SLOT)) == 1
        remote = remote.replace(shlex.quote(_RANK_SLOT), "%n")
        return ["pdsh", "-S", "-f", "1024", "-w", ",".join(self.job.hosts),
                *self.job.launcher_args, remote]

    def run(self) -> int:
        from megalite.launcher.nodeenv import write_env_file

        self.env_file = write_env_file(self.job.cwd, self.job.node_env())
        try:
            return run_forwarding_signals([self.command()], self.env(), self.abort_nodes)
        finally:
            os.remove(self.env_file)

    def env(self) -> Dict[str, str]:
        env = super().env()
        env.setdefault("PDSH_RCMD_TYPE", "ssh")
        if self.job.ssh_port:
            env["PDSH_SSH_ARGS_APPEND"] = " ".join(
                [env.get("PDSH_SSH_ARGS_APPEND", ""), "-p", str(self.job.ssh_port)]).strip()
        return env


class SSHRunner(Runner):
    name, tool = "ssh", "ssh"

    def commands(self) -> List[List[str]]:
        port = ["-p", str(self.job.ssh_port)] if self.job.ssh_port else []
        return [["ssh", *port, *self.job.launcher_args, "--", host,
                 remote_shell_cmd(self.job, str(node))]
                for node, host in enumerate(self.job.hosts)]

    def command(self) -> List[str]:
        return self.commands()[0]

    def run(self) -> int:
        stdin = json.dumps(self.job.node_env()).encode()
        return run_forwarding_signals(self.commands(), self.env(), self.abort_nodes,
                                      stdin=[stdin] * len(self.job.hosts))


class SlurmRunner(Runner):
    """Inside an allocation (``SLURM_JOB_ID`` set): ``srun`` one task per rank; the ranks find
    their rank from ``SLURM_PROCID`` (see :mod:`megalite.parallel.env`)."""
    name, tool = "slurm", "srun"

    def command(self) -> List[str]:
        job = self.job
        per_node = {len(s) for s in job.resources.values()}
        if len(per_node) != 1:
            raise ValueError("--launcher slurm needs the same number of slots on every node, got "
                             + ", ".join(f"{h}={len(s)}" for h, s in job.resources.items()))
        cmd = ["srun", "--kill-on-bad-exit=1", f"--nodes={len(job.hosts)}",
               f"--ntasks={job.world_size}", f"--ntasks-per-node={per_node.pop()}"]
        if job.named_hosts:  # a hostfile named the nodes
            cmd.append(f"--nodelist={','.join(job.hosts)}")
        return cmd + list(job.launcher_args) + job.user_cmd

    def env(self) -> Dict[str, str]:
        env = super().env()
        env.update(MASTER_PORT=str(self.job.master_port), PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")
        if self.job.master_addr not in ("127.0.0.1", "localhost"):
            env["MASTER_ADDR"] = self.job.master_addr
        return env


class OpenMPIRunner(Runner):
    name, tool = "openmpi", "mpirun"

    def hostfile_text(self) -> str:
        return "".join(f"{h} slots={len(s)}\n" for h, s in self.job.resources.items())

    def command(self, hostfile: str = "HOSTFILE") -> List[str]:
        job = self.job
        cmd = ["mpirun", "-np", str(job.world_size), "--hostfile", hostfile]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        forwarded = sorted(set(job.exports) | {"MASTER_ADDR", "MASTER_PORT", "PYTHONUNBUFFERED",
                                               "OMP_NUM_THREADS"})
        for key in forwarded:
            cmd += ["-x", key]
        return cmd + list(job.launcher_args) + job.user_cmd

    def env(self) -> Dict[str, str]:
        env = super().env()
        env.update(MASTER_ADDR=self.job.master_addr, MASTER_PORT=str(self.job.master_port),
                   PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def run(self) -> int:
        import tempfile

        with tempfile.NamedTemporaryFile("w", prefix="megalite-hosts-", suffix=".txt") as f:
            f.write(self.hostfile_text())
            f.flush()
            return run_forwarding_signals([self.command(f.name)], self.env())


RUNNERS = {r.name: r for r in (LocalRunner, PDSHRunner, SSHRunner, SlurmRunner, OpenMPIRunner)}


def run_forwarding_signals(commands: List[List[str]], env: Dict[str, str],
                           on_signal: Optional[Callable[[], None]] = None,
                           after_failure_s: float = 15.0,
                           stdin: Optional[List[bytes]] = None) -> int:
    """Run the commands side by side; SIGINT/SIGTERM go to each. When one fails, the others get
    ``after_failure_s`` to end by themselves (node launchers stop when a peer fails), then are
    terminated. ``stdin``: what each command reads on its stdin (else nothing). The first
    non-zero exit code, else 0."""
    procs = [subprocess.Popen(c, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
             for c in commands]
    for p, data in zip(procs, stdin or []):
        try:
            p.stdin.write(data)
            p.stdin.close()
        except BrokenPipeError:  # it ended already; its exit code tells
            pass

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
        if on_signal is not None and frame is not None:  # a real signal, not our own stop
            on_signal()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed_at: Optional[Tuple[float, int]] = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if bad and failed_at is None:
                failed_at = (time.time(), bad[0])
            if failed_at and time.time() - failed_at[0] > after_failure_s:
                forward(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    first = failed_at[1] if failed_at else next((c for c in codes if c), 0)
    return first if first >= 0 else 128 - first
