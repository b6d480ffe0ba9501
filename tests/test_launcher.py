"""The launcher without a cluster: hostfile and include/exclude parsing, host-name validation,
environment forwarding, and the exact command each backend builds."""
from __future__ import annotations

import os
import shlex
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


def test_pdsh_command_quotes_everything_and_escapes_percent():
    runner = PDSHRunner(_job(launcher_args=["-R", "ssh"], ssh_port=2222))
    cmd = runner.command()
    assert cmd[:7] == ["pdsh", "-S", "-f", "1024", "-w", "node1,node2", "-R"]
    remote = cmd[-1]
    assert remote.startswith("cd '/work/my repo' && exec /venv/bin/python -u -m "
                             "megalite.launcher.nodeenv --env ENV_FILE --launcher local ")
    # what the remote shell sees after pdsh replaced %n (node 1) and %% (a literal %)
    words = shlex.split(remote.replace("%n", "1").replace("%%", "%").split(" && ", 1)[1])
    assert "100%" not in remote and "INFO" not in remote  # forwarded variables: in the 0600 file
    assert words[words.index("--node_rank") + 1] == "1"
    assert words[-2:] == ["--config", "a b.yaml"]
    assert runner.env()["PDSH_RCMD_TYPE"] == "ssh"
    assert runner.env()["PDSH_SSH_ARGS_APPEND"].endswith("-p 2222")


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
    assert text.rstrip().endswith("srun --kill-on-bad-exit=1 " + shlex.join(_job().user_cmd))


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
