"""Real-cluster tests: a two-node SLURM/ssh/MPI cluster made of network namespaces by
cluster.sh (root only). `pytest -m "not cluster"` leaves them out."""


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: starts a real two-node cluster (root, SLURM, "
                                       "pdsh, sshd, OpenMPI; tests/cluster/cluster.sh)")
