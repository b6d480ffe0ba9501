"""The suite's own rules (tests/conftest.py): under MEGALITE_CI=1 a skip for a missing package
fails while a GPU or no-root skip stays a skip; tests that spawn process worlds carry the
`world` marker that `make test-fast` leaves out."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Tuple

import pytest

HERE = Path(__file__).resolve().parent

PROBE = '''
import pytest

def test_importorskip():
    pytest.importorskip("megalite_no_such_module")

def test_not_installed():
    pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")

@pytest.mark.skipif(True, reason="tensorboard is an optional extra (in [dev])")
def test_skipif_package():
    pass

@pytest.mark.skipif(True, reason="CUDA is not available (GPU tests run in bench/gpu_check.sh)")
def test_gpu():
    pass

@pytest.fixture
def cluster():
    pytest.skip("real-cluster tests need root on Linux (network namespaces, slurmd, sshd)")

def test_cluster(cluster):
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail():
    assert False

def test_ok():
    pass
'''
PROBE_MODULE = '''
import pytest
pytest.importorskip("megalite_no_such_module")

def test_never_collected():
    pass
'''


def _run_probe(tmp_path: Path, ci: bool) -> Tuple[int, Dict[str, str], str]:
    """Run pytest on the probe files under a copy of tests/conftest.py; outcome per test."""
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "test_probe_module.py").write_text(PROBE_MODULE)
    env = dict(os.environ, MEGALITE_CI="1" if ci else "0")
    xml = tmp_path / "report.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--continue-on-collection-errors",  # else the module error stops it
                        f"--junitxml={xml}", "--rootdir", str(tmp_path), str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        skipped = [c for c in case if c.tag == "skipped"]
        if skipped and skipped[0].get("type") == "pytest.xfail":
            kinds = ["xfail"]
        outcomes[case.get("name")] = kinds[0] if kinds else "passed"
    return r.returncode, outcomes, r.stdout + r.stderr


def test_ci_turns_missing_package_skips_into_failures(tmp_path: Path) -> None:
    rc, got, out = _run_probe(tmp_path, ci=True)
    assert rc != 0, out
    assert got["test_importorskip"] == "failure", out
    assert got["test_not_installed"] == "failure", out
    assert got["test_skipif_package"] in ("failure", "error"), out  # fails in setup
    assert got["test_probe_module"] == "error", out  # module skipped at import: collection error
    assert got["test_gpu"] == "skipped" and got["test_cluster"] == "skipped", out
    assert got["test_xfail"] == "xfail" and got["test_ok"] == "passed", out
    assert "MEGALITE_CI=1" in out and "CI_ALLOWED_SKIPS" in out, out


def test_without_ci_skips_stay_skips(tmp_path: Path) -> None:
    rc, got, out = _run_probe(tmp_path, ci=False)
    assert rc == 0, out
    for name in ("test_importorskip", "test_not_installed", "test_skipif_package", "test_gpu",
                 "test_cluster", "test_probe_module"):
        assert got[name] == "skipped", (name, out)


def _load_conftest():
    spec = importlib.util.spec_from_file_location("megalite_tests_conftest", HERE / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("has_mpi4py", [True, False])
def test_mpirun_skip_allowed_only_with_mpi4py(has_mpi4py: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/test_env.py skips for a missing mpirun (Debian's, root only) or mpi4py (pip's):
    under CI only the first may skip."""
    conftest = _load_conftest()
    monkeypatch.setattr(conftest, "_installed", lambda module: has_mpi4py)
    reason = "needs mpirun (apt install openmpi-bin) and mpi4py (pip install mpi4py)"
    assert (conftest.ci_skip_problem(reason) is None) == has_mpi4py
    assert conftest.ci_skip_problem("deepspeed is not installed (pip install ...)") is not None
    assert conftest.ci_skip_problem("could not import 'transformers': No module named "
                                    "'transformers'") is not None


def _collect(files, marks: str) -> set:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only",
                        "-p", "no:cacheprovider", "-m", marks, *files],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return {line.split("::", 1)[1] for line in r.stdout.splitlines() if "::" in line}


def test_world_marker_and_fast_tier() -> None:
    """Spawning tests (run_distributed in the test or a fixture, or listed in WORLD_TESTS) are
    `world`; the fast tier keeps exactly one small world. Also catches a renamed listed test."""
    files = ["test_cli.py", "test_env.py", "test_tp_layers.py", "test_zero.py",
             "test_tensorboard_torchrun.py"]
    world = _collect(files, "world")
    for name in ("test_bare_run_spawns_ranks_then_eval_and_generate",  # listed (subprocess)
                 "test_torchrun_launch",                               # listed (subprocess)
                 "test_real_mpirun_with_mpi4py",                       # listed (subprocess)
                 "test_tp_layers_match_single_device[4]",              # run_distributed in test
                 "test_stages_equal_plain_data_parallel",              # ... in its fixture
                 "test_zero_composes_with_tp_and_pp"):
        assert name in world, (name, sorted(world))
    rest = _collect(files, "not world")
    for name in ("test_tp_layers_match_single_device[2]",  # the fast tier's one world
                 "test_config_error_exits_2_before_anything_starts",
                 "test_no_group_is_plain_pytorch", "test_zero3_offload_fp16_in_one_process"):
        assert name in rest, (name, sorted(rest))
