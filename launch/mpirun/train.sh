#!/bin/bash
# megalite with OpenMPI's mpirun: one MPI process per rank, found from OMPI_COMM_WORLD_* (no
# mpi4py needed when MASTER_ADDR is passed as below).
#
#   launch/mpirun/train.sh HOSTFILE --config configs/gpt2-124m.yaml --parallel.dp=2 --parallel.tp=8
#
# HOSTFILE has "HOST slots=N" lines (launch/hostfile.example). The same through megalite:
#   megalite launch -H HOSTFILE --launcher openmpi -m megalite.train --config ...
# Add "--mca btl_tcp_if_include IFACE --mca oob_tcp_if_include IFACE" to pick the network.
set -euo pipefail
hostfile=$1; shift
master=$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')
np=$(grep -v '^\s*#' "$hostfile" | sed -n 's/.*slots=\([0-9]*\).*/\1/p' | awk '{s += $1} END {print s}')
exec mpirun -np "$np" --hostfile "$hostfile" \
    -x MASTER_ADDR="$master" -x MASTER_PORT="${MASTER_PORT:-29500}" -x OMP_NUM_THREADS=1 \
    -x PYTHONUNBUFFERED=1 -x PATH -x LD_LIBRARY_PATH \
    "${MEGALITE_PYTHON:-python3}" -u -m megalite.train "$@"
