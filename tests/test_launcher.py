"""The launcher without a cluster: hostfile and include/exclude parsing, host-name validation,
environment forwarding, and the exact command each backend builds."""
from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

from megalite.launcher.hostfile import (HostfileError, parse_filter, parse_hostfile, rank_offset,
                                        select, validate_host)
from megalite.launcher.main import build_parser, exports, make_job, read_env_file
from megalite.launcher.runners import (Job, OpenMPIRunner, PDSHRunner, SlurmRunner, SSHRunner,
                                       decode_world_info, node_launcher_cmd)
from megalite.launcher.sbatch import render

HOSTFILE = """
# two GPU nodes
node1 slots=4
node2 slots=4   # trailing comment
"""


def test_hostfile_good_lines():
    hosts = parse_hostfile(HOSTFILE)
    assert list(hosts.items()) == [("node1", 4), ("node2", 4)]


@pytest.mark.parametrize("line, message", [
    ("node3 slots=four", r"hostfile:4: 'node3 slots=four': slots must be a positive integer"),
    ("node3 slots=0", r"hostfile:4: 'node3 slots=0': slots must be"),
    ("node3", r"hostfile:4: 'node3': expected 'HOST slots=N'"),
    ("node3 gpus=2", r"hostfile:4: 'node3 gpus=2': expected"),
    ("node1 slots=2", r"hostfile:4: 'node1 slots=2': host 'node1' is listed twice"),
    ("node;rm slots=2", r"hostfile:4: 'node;rm slots=2': 'node;rm' is not a valid host name"),
    ("-oProxy slots=2", r"'-oProxy' is not a valid host name"),
])
def test_hostfile_bad_line_is_named(line, message):
    with pytest.raises(HostfileError, match=message):
        parse_hostfile("node1 slots=4\n# c\n\n" + line + "\n")


def test_empty_hostfile():
    with pytest.raises(HostfileError, match="no hosts"):
        parse_hostfile("# nothing\n")


@pytest.mark.parametrize("name", ["node1", "gpu-03.cluster.local", "10.200.0.1", "a_b"])
def test_valid_host_names(name):
    assert validate_host(name) == name


@pytest.mark.parametrize("name", ["", "a b", "a;b", "$(id)", "a`b`", "a|b", "-x", "a'b", "a\nb",
                                  "a&b", "a>b", "a*"])
def test_host_names_with_shell_characters_are_refused(name):
    with pytest.raises(HostfileError, match="not a valid host name"):
        validate_host(name)


def test_filter_syntax():
    assert parse_filter("node1:0,2@node2") == {"node1": [0, 2], "node2": None}
    with pytest.raises(HostfileError, match="slots of 'node1' must be integers"):
        parse_filter("node1:a")
    with pytest.raises(HostfileError, match="named twice"):
        parse_filter("node1@node1")
    with pytest.raises(HostfileError, match="not a valid host name"):
        parse_filter("node1;reboot")


def test_include_exclude_num_nodes_num_gpus():
    hosts = parse_hostfile(HOSTFILE)
    assert select(hosts) == {"node1": [0, 1, 2, 3], "node2": [0, 1, 2, 3]}
    assert select(hosts, include="node2:1,3") == {"node2": [1, 3]}
    assert select(hosts, include="node2@node1:0") == {"node2": [0, 1, 2, 3], "node1": [0]}
    assert select(hosts, exclude="node1") == {"node2": [0, 1, 2, 3]}
    assert select(hosts, exclude="node1:0,1") == {"node1": [2, 3], "node2": [0, 1, 2, 3]}
    assert select(hosts, num_nodes=1, num_slots=2) == {"node1": [0, 1]}
    assert rank_offset(select(hosts), 1) == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(include="node3"), "host 'node3' is not in the hostfile"),
    (dict(include="node1:7"), r"'node1' has slots 0..3, not \[7\]"),
    (dict(include="node1", exclude="node2"), "cannot be used together"),
    (dict(exclude="node1@node2"), "no hosts left"),
    (dict(num_nodes=3), "only 2 host"),
    (dict(num_slots=5), "fewer slots"),
])
def test_selection_errors(kwargs, message):
    with pytest.raises(HostfileError, match=message):
        select(parse_hostfile(HOSTFILE), **kwargs)


def _job(**kw):
    base = dict(resources={"node1": [0, 1], "node2": [0, 1]},
                user_cmd=["/venv/bin/python", "-u", "-m", "megalite.train", "--config", "a b.yaml"],
                master_addr="node1", master_port=29500, exports={"NCCL_DEBUG": "INFO",
                                                                   "MEGALITE_X": "it's 100%"},
                cwd="/work/my repo", python="/venv/bin/python")
    base.update(kw)
    return Job(**base)


def test_node_launcher_command_carries_the_layout():
    job = _job(log_dir="/logs")
    cmd = node_launcher_cmd(job, "1")
    assert cmd[:6] == ["/venv/bin/python", "-u", "-m", "megalite.launcher", "--launcher", "local"]
    assert decode_world_info(cmd[cmd.index("--world_info") + 1]) == job.resources
    assert cmd[cmd.index("--node_rank") + 1] == "1"
    assert cmd[cmd.index("--log_dir") + 1] == "/logs"
    assert cmd[cmd.index("--no_python") + 1:] == job.user_cmd


def _pdsh_expand(remote: str, node: int) -> str:
    """What pdsh hands the remote shell: ONE left-to-right pass, %n -> node index, %% -> %."""
    return re.sub(r"%(.)", lambda m: {"%": "%", "n": str(node)}[m.group(1)], remote)


def test_pdsh_command_quotes_everything_and_escapes_percent():
    runner = PDSHRunner(_job(launcher_args=["-R", "ssh"], ssh_port=2222))
    cmd = runner.command()
    assert cmd[:7] == ["pdsh", "-S", "-f", "1024", "-w", "node1,node2", "-R"]
    remote = cmd[-1]
    assert remote.startswith("cd '/work/my repo' && exec /venv/bin/python -u -m "
                             "megalite.launcher.nodeenv --env ENV_FILE --launcher local ")
    # what the remote shell sees after pdsh replaced %n (node 1) and %% (a literal %)
    words = shlex.split(_pdsh_expand(remote, 1).split(" && ", 1)[1])
    assert "100%" not in remote and "INFO" not in remote  # forwarded variables: in the 0600 file
    assert words[words.index("--node_rank") + 1] == "1"
    assert words[-2:] == ["--config", "a b.yaml"]
    assert runner.env()["PDSH_RCMD_TYPE"] == "ssh"
    assert runner.env()["PDSH_SSH_ARGS_APPEND"].endswith("-p 2222")


def test_pdsh_user_arguments_are_never_taken_for_the_node_rank():
    """Arguments equal to the old placeholder (``NODE_RANK_TOKEN``) or to pdsh's own ``%n`` reach
    the ranks unchanged; only the launcher's --node_rank becomes the node index."""
    user = ["/venv/bin/python", "-u", "x.py", "NODE_RANK_TOKEN", "--tag=NODE_RANK_TOKEN", "%n",
            "%%n", "--node_rank", "%n"]
    job = _job(user_cmd=user, exports={"MEGALITE_T": "NODE_RANK_TOKEN %n"})
    remote = PDSHRunner(job).command()[-1]
    words = shlex.split(_pdsh_expand(remote, 1).split(" && ", 1)[1])
    assert words[words.index("--node_rank") + 1] == "1"
    assert words[words.index("--no_python") + 1:] == user
    # forwarded variables travel in the 0600 file, never through pdsh's expansion
    assert "MEGALITE_T" not in remote and job.node_env()["MEGALITE_T"] == "NODE_RANK_TOKEN %n"


def test_ssh_commands_one_per_node_with_its_rank():
    cmds = SSHRunner(_job(ssh_port=2222)).commands()
    assert [c[:5] for c in cmds] == [["ssh", "-p", "2222", "--", "node1"],
                                     ["ssh", "-p", "2222", "--", "node2"]]
    for node, c in enumerate(cmds):
        words = shlex.split(c[-1].split(" && ", 1)[1])
        assert words[words.index("--node_rank") + 1] == str(node)


def test_slurm_srun_command(monkeypatch):
    runner = SlurmRunner(_job(launcher_args=["--partition", "gpu"]))
    assert runner.command() == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks=4",
                                "--ntasks-per-node=2", "--nodelist=node1,node2", "--partition",
                                "gpu", *_job().user_cmd]
    env = runner.env()
    assert env["MASTER_ADDR"] == "node1" and env["MASTER_PORT"] == "29500"
    with pytest.raises(ValueError, match="same number of slots"):
        SlurmRunner(_job(resources={"a": [0], "b": [0, 1]})).command()


def test_sbatch_script_from_the_package_template():
    text = render(_job(log_dir="/logs"), nodes=2, tasks_per_node=2)
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n" in text
    assert "#SBATCH --output=/logs/slurm-%j.out" in text
    assert "cd '/work/my repo'" in text and "export MEGALITE_X='it'\"'\"'s 100%'" in text
    assert "#SBATCH --cpus-per-task=1\n" in text and "gpus" not in text  # a CPU job as before
    assert text.rstrip().endswith("srun --kill-on-bad-exit=1 --cpus-per-task=1 " +
                                  shlex.join(_job().user_cmd))


def test_openmpi_command(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    runner = OpenMPIRunner(_job(launcher_args=["--mca", "btl", "self,tcp"]))
    cmd = runner.command("/tmp/hosts")
    assert cmd[:5] == ["mpirun", "-np", "4", "--hostfile", "/tmp/hosts"]
    assert "--allow-run-as-root" not in cmd
    xs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-x"]
    assert xs == sorted(["MASTER_ADDR", "MASTER_PORT", "MEGALITE_X", "NCCL_DEBUG",
                         "OMP_NUM_THREADS", "PYTHONUNBUFFERED"])
    assert cmd[-len(_job().user_cmd) - 3:-len(_job().user_cmd)] == ["--mca", "btl", "self,tcp"]
    assert runner.hostfile_text() == "node1 slots=2\nnode2 slots=2\n"
    assert runner.env()["MASTER_ADDR"] == "node1"


def test_flags_build_the_job(tmp_path, monkeypatch):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(HOSTFILE)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".megalite_env").write_text("# comment\nHF_HOME=/data/hf\nMEGALITE_A=file\n")
    monkeypatch.setenv("MEGALITE_A", "environ")
    monkeypatch.setenv("NCCL_IB_DISABLE", "1")
    monkeypatch.setenv("SECRET_TOKEN", "x")
    args = build_parser().parse_args(
        ["-H", str(hostfile), "-i", "node2:0,1@node1:3", "--launcher", "pdsh",
         "--master_port", "1234", "--env", "K=v=w", "--module", "megalite.train", "--config",
         "c.yaml", "--local_rank=0"])
    job = make_job(args, attempt=1)
    assert job.resources == {"node2": [0, 1], "node1": [3]}
    assert job.master_addr == "node2" and job.master_port == 1236
    assert job.user_cmd == [sys.executable, "-u", "-m", "megalite.train", "--config", "c.yaml",
                            "--local_rank=0"]
    assert job.exports["MEGALITE_A"] == "file" and job.exports["HF_HOME"] == "/data/hf"
    assert job.exports["K"] == "v=w" and job.exports["NCCL_IB_DISABLE"] == "1"
    assert "SECRET_TOKEN" not in job.exports


def test_env_file_bad_line_is_named(tmp_path):
    path = tmp_path / ".megalite_env"
    path.write_text("A=1\nnot a pair\n")
    with pytest.raises(ValueError, match=r"\.megalite_env:2: expected KEY=VALUE.*'not a pair'"):
        read_env_file(str(path))
    args = build_parser().parse_args(["--env", "1X=2", "train.py"])
    with pytest.raises(ValueError, match="--env: expected KEY=VALUE"):
        exports(args, environ={})


def test_no_python_and_script_targets():
    assert make_job(build_parser().parse_args(["--no_python", "/bin/echo", "hi"])).user_cmd == \
        ["/bin/echo", "hi"]
    assert make_job(build_parser().parse_args(["train.py", "--x=1"])).user_cmd == \
        [sys.executable, "-u", "train.py", "--x=1"]


def test_cli_errors_exit_2(tmp_path, capsys):
    from megalite.cli import main

    bad = tmp_path / "hosts"
    bad.write_text("node1 slots=2\nnode 2 slots=2\n")
    assert main(["launch", "-H", str(bad), "--launcher", "pdsh", "train.py"]) == 2
    assert "hosts:2: 'node 2 slots=2'" in capsys.readouterr().err
    assert main(["launch", "--launcher", "slurm", "train.py"]) in (0, 2)  # 2 outside SLURM


def test_dry_run_prints_the_command(capsys, monkeypatch):
    from megalite.cli import main

    monkeypatch.setattr(OpenMPIRunner, "exists", lambda self: True)
    assert main(["launch", "--launcher", "openmpi", "--num_gpus", "3", "--dry_run",
                 "-m", "megalite.train"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mpirun -np 3 --hostfile HOSTFILE") and "-m megalite.train" in out


# ------------------------------------------------- --sbatch: what the script requests and runs

SINFO = "12 (null)\n64 gpu:h100:8(S:0-1)\n"  # a CPU node and an 8-GPU node


def _fake_slurm(tmp_path, monkeypatch):
    """sinfo/scontrol/srun stand-ins on PATH: sinfo reports SINFO and logs its arguments,
    scontrol names nodeA,nodeB with NodeAddr=$FAKE_NODEADDR, srun prints what a rank gets."""
    folder = tmp_path / "bin"
    folder.mkdir()
    tools = {
        "sinfo": f'echo "$@" >> {tmp_path}/sinfo.args; printf "{SINFO}"',
        "scontrol": 'case "$1 $2" in\n"show hostnames") printf "nodeA\\nnodeB\\n" ;;\n'
                    '"show node") echo "NodeName=$3 Arch=x86_64"; '
                    'echo "   NodeAddr=$FAKE_NODEADDR NodeHostName=$3" ;;\nesac',
        "srun": 'echo "srun $*"; echo "MASTER_ADDR=$MASTER_ADDR"; echo "MEGALITE_V=$MEGALITE_V"; '
                'echo "NCCL_ERRORS=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-unset}"',
        "sbatch": 'grep -q "^#SBATCH --gpus" "${@: -1}" || { echo 42; exit 0; }\n'
                  'echo "sbatch: error: Batch job submission failed: Requested node '
                  'configuration is not available" >&2; exit 1',  # a cluster without GPUs
    }
    for name, body in tools.items():
        path = folder / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)


def _submit(tmp_path, capsys, *argv):
    """``megalite launch --launcher slurm --sbatch --dry_run ...``: (exit code, script, err)."""
    from megalite.cli import main

    logs = tmp_path / f"logs{len(list(tmp_path.glob('logs*')))}"
    code = main(["launch", "--launcher", "slurm", "--sbatch", "--dry_run", "--log_dir",
                 str(logs), *argv])
    scripts = list(logs.glob("*.sbatch")) if logs.exists() else []
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in scripts)  # values may be secret
    return code, scripts[0].read_text() if scripts else "", capsys.readouterr().err


def test_sbatch_requests_gpus_only_for_gpu_jobs_and_the_nodes_cpus(tmp_path, monkeypatch,
                                                                   capsys):
    from helpers import REPO

    _fake_slurm(tmp_path, monkeypatch)
    tiny = os.path.join(REPO, "configs", "tiny.yaml")
    gpu_yaml = tmp_path / "gpu.yaml"  # the backend and tp come from the config file here
    with open(tiny) as f:
        gpu_yaml.write_text(f.read().replace("parallel:\n  tp: 1",
                                             "parallel:\n  backend: nccl\n  tp: 2"))
    train = ["-m", "megalite.train", "--config"]
    # a CPU job (gloo) submits as before: no GPUs, CPUs = 12 (fewest of any node) / 2 tasks
    code, cpu, err = _submit(tmp_path, capsys, "--num_nodes", "2", "--num_gpus", "2", *train,
                             tiny, "--parallel.backend=gloo")
    assert code == 0, err
    assert "#SBATCH --cpus-per-task=6\n" in cpu and "--cpus-per-task=6 " in cpu
    assert "--gpus" not in cpu and "--gres" not in cpu and "NCCL" not in cpu
    # nccl from the YAML, 8 ranks per node: 8 GPUs per node, CPUs of the nodes that have them
    code, gpu, err = _submit(tmp_path, capsys, "--num_nodes", "2", "--num_gpus", "8", *train,
                             str(gpu_yaml), "--parallel.dp=8")
    assert code == 0, err
    assert "#SBATCH --gpus-per-node=8\n" in gpu and "#SBATCH --cpus-per-task=8\n" in gpu
    assert "\nexport TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}" in gpu
    assert "\nexport CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}" in gpu  # tp 2
    live = [line for line in gpu.splitlines() if not line.lstrip().startswith("#")]
    for fabric in ("FI_", "NCCL_IB_HCA", "NCCL_SOCKET_IFNAME"):  # only as commented examples
        assert fabric in gpu and not any(fabric in line for line in live), fabric
    # exports carry one "why" comment each: every export line follows a comment
    for i, line in enumerate(gpu.splitlines()):
        if line.startswith(("export TORCH_NCCL", "export CUDA_DEVICE")):
            assert gpu.splitlines()[i - 1].startswith("#"), line
    # backend auto with --num_gpus is a GPU job unless --gpus_per_node 0; both overridable
    code, auto, err = _submit(tmp_path, capsys, "--num_gpus", "2", "--launcher_args", "-p cpu",
                              "--gpus_per_node", "0", "--cpus_per_task", "3", *train, tiny)
    assert code == 0, err
    assert "--gpus" not in auto and "#SBATCH --cpus-per-task=3\n" in auto
    code, auto, err = _submit(tmp_path, capsys, "--num_gpus", "2",
                              "--launcher_args=--partition=big", *train, tiny)
    assert code == 0 and "#SBATCH --gpus-per-node=2\n" in auto, err
    assert (tmp_path / "sinfo.args").read_text().splitlines()[-1].endswith("--partition=big")
    from megalite.launcher.sbatch import train_settings

    assert train_settings(["/v/bin/megalite", "train", "--config", str(gpu_yaml)], 2) == \
        ("nccl", 2)  # the `megalite train` entry point too
    assert train_settings(["/v/bin/python", "-u", "train.py", "--parallel.tp=2"], 2) == \
        ("auto", 1)  # not megalite.train: nothing is guessed from its arguments
    # fewer GPUs than NCCL ranks, and the flags outside --sbatch: one line, exit 2, no script
    code, script, err = _submit(tmp_path, capsys, "--num_gpus", "2", "--gpus_per_node", "1",
                                *train, tiny, "--parallel.backend=nccl")
    assert (code, script) == (2, "") and err.count("\n") == 1
    assert err.startswith("error: --gpus_per_node 1 with 2 ranks per node") and "gloo" in err
    from megalite.cli import main

    # submitted for real (a stand-in sbatch): a CPU job goes through; a GPU job refused by a
    # cluster without GPUs is one line that says how to submit a CPU job
    assert main(["launch", "--launcher", "slurm", "--sbatch", "--num_gpus", "2", *train, tiny,
                 "--parallel.backend=gloo"]) == 0
    assert "megalite: submitted job 42" in capsys.readouterr().out
    assert main(["launch", "--launcher", "slurm", "--sbatch", "--num_gpus", "2", *train,
                 tiny]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: sbatch failed: sbatch: error: Batch job submission failed")
    assert err.endswith("for a CPU job pass --parallel.backend=gloo or --gpus_per_node 0\n")
    assert err.count("\n") == 1
    assert main(["launch", "--num_gpus", "2", "--gpus_per_node", "2", "--dry_run", "x.py"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpus_per_node 2: only --launcher slurm --sbatch") and \
        err.count("\n") == 1


def test_sbatch_script_quotes_values_refuses_bad_names_and_finds_the_head(tmp_path,
                                                                           monkeypatch, capsys):
    _fake_slurm(tmp_path, monkeypatch)
    value = "$(touch pwned1); `touch pwned2` 'x\" \\ 100%"
    code, script, err = _submit(tmp_path, capsys, "--num_nodes", "2", "--num_gpus", "2",
                                "--env", f"MEGALITE_V={value}", "--no_python", "true")
    assert code == 0, err
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = dict(os.environ, SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_JOB_ID="7")
    for node_addr, master in (("10.1.2.3", "10.1.2.3"),  # NodeAddr an address: taken as is
                              ("localhost", "localhost")):  # loopback answers are skipped
        r = subprocess.run(["bash", str(path)], env=dict(env, FAKE_NODEADDR=node_addr),
                           capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"MASTER_ADDR={master}\n" in r.stdout, r.stdout
        assert f"MEGALITE_V={value}\n" in r.stdout and "srun --kill-on-bad-exit=1" in r.stdout
    assert not list(tmp_path.glob("pwned*"))
    # a forwarded variable whose NAME is not a name (it would run `touch x`): refused
    monkeypatch.setenv("MEGALITE_X;touch x", "1")
    code, script, err = _submit(tmp_path, capsys, "--num_gpus", "2", "--no_python", "true")
    assert (code, script) == (2, "") and err.count("\n") == 1
    assert err.startswith("error: environment variable 'MEGALITE_X;touch x'") and \
        "[A-Za-z_][A-Za-z0-9_]*" in err
    assert not (tmp_path / "x").exists()


def test_packaged_sbatch_scripts_split_the_nodes_cpus_and_set_nccl_env_only_with_gpus(
        tmp_path, monkeypatch):
    """launch/slurm/*.sbatch run by bash with SLURM's variables of a GPU and of a CPU node."""
    from helpers import REPO

    _fake_slurm(tmp_path, monkeypatch)
    base = dict(os.environ, SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_JOB_ID="1234",
                SLURM_NNODES="2", FAKE_NODEADDR="10.1.2.3")
    gpu_node = dict(base, SLURM_CPUS_ON_NODE="96", SLURM_NTASKS_PER_NODE="8",
                    SLURM_GPUS_ON_NODE="8")
    cpu_node = dict(base, SLURM_CPUS_ON_NODE="2", SLURM_NTASKS_PER_NODE="2")
    expect = [("train.sbatch", gpu_node, "--cpus-per-task=12 python3 -u -m megalite.train", "1"),
              ("train.sbatch", cpu_node, "--cpus-per-task=1 python3 -u -m megalite.train",
               "unset"),
              ("train-torchrun.sbatch", gpu_node, "--cpus-per-task=96 python3 -m "
               "torch.distributed.run --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d "
               "--rdzv-endpoint 10.1.2.3:21234", "1")]
    for script, env, srun, nccl in expect:
        path = os.path.join(REPO, "launch", "slurm", script)
        with open(path) as f:
            assert "#SBATCH --exclusive\n" in f.read()  # whole nodes: their CPUs are split
        r = subprocess.run(["bash", path, "--config", "x.yaml"], env=env, capture_output=True,
                           text=True, timeout=30, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"srun --kill-on-bad-exit=1 {srun}" in r.stdout, (script, r.stdout)
        assert "MASTER_ADDR=10.1.2.3\n" in r.stdout and f"NCCL_ERRORS={nccl}\n" in r.stdout
