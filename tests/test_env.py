"""Rank discovery precedence and ParallelDims arithmetic (no processes needed)."""
from __future__ import annotations

import pytest

from megalite.parallel.dims import LayoutError, ParallelDims
from megalite.parallel.env import discover, first_slurm_host


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
