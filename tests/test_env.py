"""Rank discovery precedence and ParallelDims arithmetic (no processes needed)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO
from megalite.parallel.dims import LayoutError, ParallelDims
from megalite.parallel.env import LaunchEnv, discover, first_slurm_host, tasks_on_node


def test_torchrun_style_env_wins_over_mpi_and_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
           "MASTER_PORT": "1234", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8",
           "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}
    e = discover(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == \
        (3, 4, 1, "h0", 1234, "env")


def test_openmpi():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
           "MASTER_ADDR": "node1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}
    e = discover(env)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.source) == \
        (5, 8, 1, 4, "openmpi")


def test_slurm_only_inside_an_srun_step():
    batch_shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
                   "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[03-04]"}
    assert discover(batch_shell) is None  # the batch script's shell is not a rank
    step = dict(batch_shell, SLURM_STEP_ID="0", SLURM_PROCID="6", SLURM_LOCALID="2",
                SLURM_STEP_NODELIST="gpu[03-04]", SLURM_STEP_TASKS_PER_NODE="4(x2)")
    e = discover(step)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr,
            e.master_port, e.source) == (6, 8, 2, 4, "gpu03", 20077, "slurm")


def test_no_launcher():
    assert discover({}) is None


@pytest.mark.parametrize("nodelist, first", [("n1", "n1"), ("gpu[03-05,9]", "gpu03"),
                                             ("a[7],b[1-2]", "a7"), ("login1,login2", "login1")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("dp, tp, pp", [(2, 2, 2), (4, 1, 2), (1, 4, 1), (3, 2, 1)])
def test_rank_layout_tp_fastest_then_dp_then_pp(dp, tp, pp):
    seen = set()
    for rank in range(dp * tp * pp):
        d = ParallelDims(dp=dp, tp=tp, pp=pp, rank=rank)
        coords = (d.pp_rank, d.dp_rank, d.tp_rank)
        assert d.rank_of(*coords) == rank
        assert rank == (d.pp_rank * dp + d.dp_rank) * tp + d.tp_rank
        seen.add(coords)
    assert len(seen) == dp * tp * pp


def test_world_mismatch_names_the_numbers():
    with pytest.raises(LayoutError, match=r"world size 6 != dp\*pp\*tp = 2\*2\*2 = 8"):
        ParallelDims(dp=2, tp=2, pp=2).check_world(6)


def test_deepspeed_launcher_env_uses_local_size():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
           "MASTER_ADDR": "node1", "MASTER_PORT": "29500", "CROSS_RANK": "1"}
    e = discover(env)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.source) == \
        (3, 4, 1, 2, "env")


def test_torchrun_env():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "4000", "TORCHELASTIC_RUN_ID": "x"}
    assert discover(env) == LaunchEnv(1, 2, 1, 2, "127.0.0.1", 4000, "env")


def test_slurm_uneven_tasks_per_node_and_job_nodelist():
    env = {"SLURM_PROCID": "8", "SLURM_NTASKS": "9", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
           "SLURM_STEPID": "0", "SLURM_JOB_ID": "20001", "SLURM_JOB_NODELIST": "node[1-3]",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2),1"}
    e = discover(env)
    assert (e.rank, e.local_world_size, e.master_addr, e.master_port) == (8, 1, "node1", 20001)
    assert tasks_on_node("4(x2),1", 1) == 4 and tasks_on_node("garbage", 0) is None


def test_bad_integer_names_the_variable():
    with pytest.raises(RuntimeError, match="RANK='x' is not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


class _FakeComm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind):
        return _FakeComm(self.rank % 2, 2)

    def bcast(self, value, root):
        return ("head-node", 31000)  # what rank 0 sent


def _fake_mpi4py(monkeypatch, rank, size):
    import sys
    import types

    mpi = types.SimpleNamespace(COMM_WORLD=_FakeComm(rank, size), COMM_TYPE_SHARED=1)
    package = types.ModuleType("mpi4py")
    package.MPI = mpi
    monkeypatch.setitem(sys.modules, "mpi4py", package)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)


def test_mpi4py_last_resort_under_an_mpich_style_launcher(monkeypatch):
    _fake_mpi4py(monkeypatch, rank=3, size=4)
    e = discover({"PMI_RANK": "3", "PMI_SIZE": "4"})
    assert e == LaunchEnv(3, 4, 1, 2, "head-node", 31000, "mpi4py")
    assert discover({}) is None  # no MPI trace: mpi4py is not even imported


def test_multi_node_mpirun_without_master_addr_asks_mpi(monkeypatch):
    _fake_mpi4py(monkeypatch, rank=2, size=4)
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert discover(env) == LaunchEnv(2, 4, 0, 2, "head-node", 31000, "openmpi")


@pytest.mark.skipif(not (shutil.which("mpirun") and importlib.util.find_spec("mpi4py")),
                    reason="needs mpirun (apt install openmpi-bin) and mpi4py (pip install mpi4py)")
def test_real_mpirun_with_mpi4py(tmp_path):
    """Real OpenMPI processes with the OMPI_COMM_WORLD_* variables removed: mpi4py answers."""
    code = ("import os\nfor k in [k for k in os.environ if k.startswith('OMPI_COMM_WORLD')]:\n"
            "    del os.environ[k]\nfrom megalite.parallel.env import discover\n"
            "e = discover()\nimport sys\n"
            "open(f'{sys.argv[1]}/rank{e.rank}', 'w').write("
            "f'found {e.rank} {e.world_size} {e.local_rank} {e.source} {e.master_port > 0}')\n")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    env = dict(os.environ, OMPI_MCA_btl="self,tcp", OMPI_MCA_btl_tcp_if_include="lo",
               OMPI_MCA_oob_tcp_if_include="lo", PYTHONPATH=REPO)
    r = subprocess.run(["mpirun", *root, "--oversubscribe", "-np", "2", sys.executable, "-c", code,
                        str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    found = sorted((tmp_path / f).read_text() for f in os.listdir(tmp_path))  # mpirun mixes stdout
    assert found == ["found 0 2 0 mpi4py True", "found 1 2 1 mpi4py True"], r.stdout
