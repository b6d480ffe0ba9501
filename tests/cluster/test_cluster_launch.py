"""megalite trained through real cluster tools on two "hosts" (network namespaces node1/node2,
10.200.0.1/2, see cluster.sh): sbatch of launch/slurm/train.sbatch, `megalite launch` with pdsh
and with OpenMPI, and DeepSpeed's launcher. Each job is 2 nodes x 2 ranks, dp=2 x tp=2, and its
per-step losses must equal the same job run locally. A rank SIGKILLed on node2 stops both nodes.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from helpers import REPO
from launcher_helpers import (clean_env, losses, rank_pid, train_args, wait_for_step, wait_gone)

pytestmark = pytest.mark.cluster
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "cluster.sh")
STATE = "/tmp/megalite-cluster"
TOOLS = ["sbatch", "slurmctld", "slurmd", "pdsh", "mpirun", "ssh", "nsenter", "unshare", "ip"]
BIN = os.path.dirname(sys.executable)


def on(node, *cmd):
    return [SCRIPT, "on", node, *cmd]


def run(cmd, timeout=240, **env):
    r = subprocess.run(cmd, env=clean_env(PATH=BIN + os.pathsep + os.environ["PATH"], **env),
                       capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return r


@pytest.fixture(scope="module")
def cluster():
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("real-cluster tests need root on Linux (network namespaces, slurmd, sshd)")
    missing = [t for t in TOOLS if not shutil.which(t)] + \
        [p for p in ("/usr/sbin/sshd", "/usr/sbin/munged") if not os.path.exists(p)]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run `tests/cluster/cluster.sh install`")
    up = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, MEGALITE_CLUSTER_DIR=STATE))
    if up.returncode:
        subprocess.run([SCRIPT, "down"], capture_output=True, timeout=120)
        pytest.fail(f"cluster set-up failed:\n{up.stdout}\n{up.stderr}")
    hostfile = os.path.join(STATE, "hostfile")
    with open(hostfile, "w") as f:
        f.write("node1 slots=2\nnode2 slots=2\n")
    yield hostfile
    subprocess.run([SCRIPT, "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A run folder under the cluster's state dir: both nodes see the same files."""
    return tmp_path_factory.mktemp("cluster-runs")


@pytest.fixture(scope="module")
def local_losses(shared):
    """The reference: the same job, a bare local `megalite train` (it starts its 4 ranks)."""
    run_dir = str(shared / "local")
    r = run([sys.executable, "-m", "megalite.train", *train_args(run_dir, str(shared / "cache"))])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return losses(run_dir)


def _check(run_dir, reference, r):
    got = losses(run_dir)
    assert r.returncode == 0 and got, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    assert sorted(got) == sorted(reference)
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), (step, got, reference)


def test_sbatch_train_sbatch(cluster, shared, local_losses):
    run_dir = str(shared / "slurm")
    cmd = on("node1", "sbatch", "--wait", f"--output={shared}/slurm-%j.out",
             os.path.join(REPO, "launch", "slurm", "train.sbatch"),
             *train_args(run_dir, str(shared / "cache")))
    r = run(cmd, SLURM_CONF=f"{STATE}/slurm/slurm.conf", MEGALITE_PYTHON=sys.executable)
    outs = [open(shared / f).read() for f in os.listdir(shared) if f.startswith("slurm-")]
    r.stdout += "\n".join(outs)
    _check(run_dir, local_losses, r)


def test_megalite_launch_pdsh(cluster, shared, local_losses):
    run_dir, logs = str(shared / "pdsh"), shared / "pdsh-logs"
    r = run(on("node1", sys.executable, "-m", "megalite.launcher", "-H", cluster, "--launcher",
               "pdsh", "--log_dir", str(logs), "-m", "megalite.train",
               *train_args(run_dir, str(shared / "cache"))),
            PDSH_SSH_ARGS_APPEND=f"-F {STATE}/ssh/ssh_config")
    _check(run_dir, local_losses, r)
    assert sorted(os.listdir(logs)) == [f"rank_{i}.log" for i in range(4)]


def test_megalite_launch_ssh(cluster, shared, local_losses):
    run_dir = str(shared / "ssh")
    r = run(on("node1", sys.executable, "-m", "megalite.launcher", "-H", cluster, "--launcher",
               "ssh", "--launcher_args", f"-F {STATE}/ssh/ssh_config", "-m", "megalite.train",
               *train_args(run_dir, str(shared / "cache"))))
    _check(run_dir, local_losses, r)


def test_megalite_launch_slurm_inside_salloc(cluster, shared, local_losses):
    run_dir = str(shared / "salloc")
    r = run(on("node1", "salloc", "--nodes=2", "--ntasks-per-node=2", sys.executable, "-m",
               "megalite.launcher", "--launcher", "slurm", "--num_nodes", "2", "--num_gpus", "2",
               "-m", "megalite.train", *train_args(run_dir, str(shared / "cache"))),
            SLURM_CONF=f"{STATE}/slurm/slurm.conf")
    _check(run_dir, local_losses, r)


def test_megalite_launch_slurm_sbatch_from_the_template(cluster, shared, local_losses):
    run_dir, logs = str(shared / "launch-sbatch"), str(shared / "launch-sbatch-logs")
    conf = dict(SLURM_CONF=f"{STATE}/slurm/slurm.conf")
    r = run(on("node1", sys.executable, "-m", "megalite.launcher", "--launcher", "slurm",
               "--sbatch", "--num_nodes", "2", "--num_gpus", "2", "--log_dir", logs,
               "-m", "megalite.train", *train_args(run_dir, str(shared / "cache")),
               "--parallel.backend=gloo"), **conf)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 GPU(s) per node (backend gloo)" in r.stdout  # a CPU job requests no GPUs
    job_id = r.stdout.split("submitted job ")[1].split()[0]
    deadline = time.time() + 240
    while run(on("node1", "squeue", "-h", "-j", job_id), **conf).stdout.strip():
        assert time.time() < deadline, f"job {job_id} still queued/running after 240 s"
        time.sleep(0.5)
    with open(os.path.join(logs, f"slurm-{job_id}.out")) as f:
        r.stdout += f.read()
    _check(run_dir, local_losses, r)


def test_megalite_launch_slurm_sbatch_gpu_job_is_accepted_and_scheduled(cluster, shared):
    """The GPU sbatch (backend nccl, --num_gpus 2) on nodes that declare 2 GPUs each: real
    slurmctld accepts the request and starts the job on both nodes with 2 GPUs per node; the
    CPUs per task come from the real sinfo, rank 0's address from node1's NodeAddr. There is no
    CUDA here, so the ranks then fail: only the submission and the allocation are checked."""
    run_dir, logs = str(shared / "gpu-sbatch"), shared / "gpu-sbatch-logs"
    conf = dict(SLURM_CONF=f"{STATE}/slurm/slurm.conf")
    r = run(on("node1", sys.executable, "-m", "megalite.launcher", "--launcher", "slurm",
               "--sbatch", "--num_nodes", "2", "--num_gpus", "2", "--log_dir", str(logs),
               "-m", "megalite.train", *train_args(run_dir, str(shared / "cache")),
               "--parallel.backend=nccl"), **conf)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 CPU(s) per task (2 CPUs per node (sinfo) / 2 tasks), 2 GPU(s) per node " \
        "(backend nccl)" in r.stdout, r.stdout
    [script] = [f for f in os.listdir(logs) if f.endswith(".sbatch")]
    with open(logs / script) as f:
        text = f.read()
    assert "#SBATCH --gpus-per-node=2\n" in text and "#SBATCH --cpus-per-task=1\n" in text
    assert "\nexport CUDA_DEVICE_MAX_CONNECTIONS=" in text  # tp=2
    job_id = r.stdout.split("submitted job ")[1].split()[0]
    started, out = f"megalite: job {job_id} on ", ""
    deadline = time.time() + 60
    while started not in out:  # the script's first line: the allocation it got
        assert time.time() < deadline, f"job {job_id} did not start in 60 s: {out}"
        time.sleep(0.25)
        path = logs / f"slurm-{job_id}.out"
        out = path.read_text() if path.exists() else ""
    run(on("node1", "scancel", job_id), **conf)  # the ranks would only fail: no CUDA here
    assert f"{started}node[1-2], rank 0 at 10.200.0.1:29500, 2 CPUs and 2 GPUs per node" in out


def test_megalite_launch_openmpi(cluster, shared, local_losses):
    run_dir = str(shared / "openmpi")
    mpi_args = (f"--mca plm_rsh_args '-F {STATE}/ssh/ssh_config' --mca btl self,tcp "
                "--mca btl_tcp_if_include eth1 --mca oob_tcp_if_include eth1")
    r = run(on("node1", sys.executable, "-m", "megalite.launcher", "-H", cluster, "--launcher",
               "openmpi", "--launcher_args", mpi_args, "-m", "megalite.train",
               *train_args(run_dir, str(shared / "cache"))))
    _check(run_dir, local_losses, r)


def test_deepspeed_launcher(cluster, shared, local_losses):
    if not shutil.which("deepspeed", path=BIN):
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    run_dir = str(shared / "deepspeed")
    procs = []
    for node in (0, 1):  # --no_ssh: one deepspeed launcher per node, as on a real cluster
        cmd = on(f"node{node + 1}", os.path.join(BIN, "deepspeed"), "-H", cluster, "--no_ssh",
                 "--node_rank", str(node), "--master_addr", "node1", "--master_port", "29600",
                 "--num_gpus", "2", "--module", "megalite.train",
                 *train_args(run_dir, str(shared / "cache")))
        procs.append(subprocess.Popen(cmd, env=clean_env(PATH=BIN + os.pathsep +
                                                         os.environ["PATH"]),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, cwd=REPO))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    r = subprocess.CompletedProcess([], max(p.returncode for p in procs), "\n".join(outs), "")
    _check(run_dir, local_losses, r)


def test_pdsh_rank_killed_on_node2_stops_both_nodes(cluster, shared):
    tag, run_dir = uuid.uuid4().hex, str(shared / "pdsh-fail")
    cmd = on("node1", sys.executable, "-m", "megalite.launcher", "-H", cluster, "--launcher",
             "pdsh", "--env", f"MEGALITE_TEST_TAG={tag}", "-m", "megalite.train",
             *train_args(run_dir, str(shared / "cache"), 100000))
    proc = subprocess.Popen(cmd, env=clean_env(PATH=BIN + os.pathsep + os.environ["PATH"],
                                               PDSH_SSH_ARGS_APPEND=f"-F {STATE}/ssh/ssh_config"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        wait_for_step(run_dir, 2, proc)
        victim = rank_pid(tag, 3)  # node2's second rank
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        out = proc.communicate(timeout=60)[0]
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"two-node failure detected and job stopped in {elapsed:.2f} s")
    assert proc.returncode != 0
    assert elapsed < 10, f"{elapsed:.1f} s"
    expected = f"rank 3 (local rank 1, pid {victim}) was killed by SIGKILL on node 1 (node2)"
    assert expected in out, out
    assert "last " in out
    assert wait_gone(tag, 5) == {}, "processes outlived the job"
