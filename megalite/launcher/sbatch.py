"""The sbatch script ``megalite launch --launcher slurm --sbatch`` writes and submits: one SLURM
task per rank, ``srun`` starts them, each finds its rank from ``SLURM_PROCID``."""
from __future__ import annotations

import shlex
from string import Template

from megalite.launcher.runners import Job

TEMPLATE = Template("""\
#!/bin/bash
# Written by `megalite launch --launcher slurm --sbatch`; submit again with `sbatch $$0`.
#SBATCH --job-name=megalite
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks_per_node
#SBATCH --cpus-per-task=1
#SBATCH --output=$output
set -euo pipefail
cd $cwd
$exports
export MASTER_ADDR=$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=$master_port
export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
srun --kill-on-bad-exit=1 $command
""")


def render(job: Job, nodes: int, tasks_per_node: int) -> str:
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(job.exports.items()))
    output = f"{job.log_dir}/slurm-%j.out" if job.log_dir else "megalite-%j.out"
    if any(c.isspace() for c in output):  # #SBATCH lines are not parsed by a shell
        raise ValueError(f"--log_dir {job.log_dir!r}: no spaces allowed with --sbatch")
    return TEMPLATE.substitute(nodes=nodes, tasks_per_node=tasks_per_node, output=output,
                               cwd=shlex.quote(job.cwd), exports=exports,
                               master_port=job.master_port, command=shlex.join(job.user_cmd))
