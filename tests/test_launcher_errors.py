"""``megalite launch`` refuses bad options and missing targets with one ``error:`` line and exit
code 2, before it starts any process (no rank, no pdsh/ssh/srun/mpirun)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megalite.launcher import main as launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_process(monkeypatch):
    """Starting any process during the test fails it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize("argv, needle", [
    (["--max_restarts", "-1", "-m", "megalite.train"], "--max_restarts: -1: must be 0 or more"),
    (["--nproc_per_node", "-3", "-m", "megalite.train"],
     "--num_gpus/--nproc_per_node: -3: must be 1 or more"),
    (["--num_gpus", "0", "-m", "megalite.train"], "--nproc_per_node: 0: must be 1 or more"),
    (["--num_nodes", "-2", "-m", "megalite.train"], "--num_nodes/--nnodes: -2: must be 1"),
    (["--master_port", "70000", "-m", "megalite.train"],
     "--master_port: 70000: a TCP port is in 1..65535"),
    (["--master_port", "0", "-m", "megalite.train"], "--master_port: 0: a TCP port"),
    (["--ssh_port", "x", "-m", "megalite.train"], "--ssh_port: 'x': expected an integer"),
    (["--master_port", "65535", "--max_restarts", "1", "-m", "megalite.train"],
     "use a port of at most 65532"),
    (["--node_rank", "one", "-m", "megalite.train"], "--node_rank 'one': must be an integer"),
    (["-m", "--no_python", "megalite.train"], "-m and --no_python exclude each other"),
    (["--launcher", "rsh", "x.py"], "argument --launcher: invalid choice: 'rsh'"),
    (["--max_restarts", "2"], "the following arguments are required: user_script"),
    (["missing_train.py", "--config", "c.yaml"], "missing_train.py: no such script (in "),
    (["megalite.train"], "no such script (in {cwd}); for a module add -m"),
    (["-m", "megalite.no_such_module"], "-m megalite.no_such_module: no module of that name"),
    (["-m", "no_such_package_xyz.train"], "-m no_such_package_xyz.train: no module"),
    (["--launcher", "pdsh", "-m", "no_such_package_xyz"], "-m no_such_package_xyz: no module"),
    (["--no_python", "/nonexistent"], "--no_python /nonexistent: no such program file"),
    (["--no_python", "no_such_program_xyz"], "--no_python no_such_program_xyz: no such program "
                                             "on PATH"),
    (["--no_python", "./data.txt"], "--no_python ./data.txt: the file is not executable"),
])
def test_bad_launch_is_one_line_exit_2(argv, needle, tmp_path, monkeypatch, capsys,
                                       no_process):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("not a program\n")
    assert launcher.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert needle.format(cwd=tmp_path) in lines[0]
    assert captured.out == ""


def test_good_targets_pass_the_checks(tmp_path, monkeypatch, capsys, no_process):
    """The checks refuse nothing that runs: a script, a module found through the working
    directory or PYTHONPATH, a program on PATH or by path (--dry_run prints the command)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    (tmp_path / "pkg" / "job.py").write_text("")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "other_mod.py").write_text("")
    for argv in (["train.py", "--x=1"], ["-m", "pkg.job"], ["-m", "megalite.train"],
                 ["-m", "json.tool"],
                 ["--env", f"PYTHONPATH={tmp_path / 'elsewhere'}", "-m", "other_mod"],
                 ["--no_python", "echo", "hi"], ["--no_python", sys.executable, "-V"]):
        assert launcher.main(["--num_gpus", "2", "--dry_run", *argv]) == 0, argv
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.count("--no_python") == 7
    assert "pkg" not in sys.modules  # the module check ran no package code


def test_cli_entry_point_has_no_traceback(tmp_path):
    """Through ``python -m megalite.cli launch``: what a user types (these once raised
    UnboundLocalError, or started one rank per slot before failing)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    for argv in (["--max_restarts", "-1", "x.py"], ["--num_gpus", "2", "missing.py"]):
        r = subprocess.run([sys.executable, "-m", "megalite.cli", "launch", *argv], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == "", r
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
