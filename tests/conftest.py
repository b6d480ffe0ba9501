"""Suite-wide fixtures and two policies:

* Tiers. A test that starts a process world gets the ``world`` marker (registered in
  pyproject.toml): automatically when its body or any fixture it uses calls
  ``run_distributed(``, and through ``WORLD_TESTS`` below for worlds started by a subprocess
  (which a source scan cannot tell from a single-process CLI run); a new test can also carry
  ``@pytest.mark.world`` itself. ``make test-fast`` runs ``-m "not slow and not world and not
  cluster"`` plus ``FAST_TIER_WORLD``, one small world; ``make test`` (CI, README) runs all.
* CI. With ``MEGALITE_CI=1`` (``.ci/run`` exports it) a skip FAILS unless its reason is in
  ``CI_ALLOWED_SKIPS``: CI must never pass because a package it forgot to install made tests
  skip (``pytest.importorskip``, "not installed", a ``skipif`` on ``find_spec``, ...).
"""
import importlib.util
import inspect
import os
import re
import sys
from typing import Callable, List, Optional, Pattern, Tuple

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # a plain checkout without `pip install -e .` imports megalite too
    sys.path.insert(0, REPO)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One prepared-corpus cache for the whole session (the synthetic corpus is built once)."""
    return str(tmp_path_factory.mktemp("data-cache"))


# ---------------------------------------------------------------- tiers: the `world` marker

# "file::test" (every parametrization) of tests whose subprocess starts a process world.
WORLD_TESTS = {
    "test_cli.py::test_bare_run_spawns_ranks_then_eval_and_generate",  # bare dp=2 megalite train
    "test_tensorboard_torchrun.py::test_torchrun_launch",              # torchrun, 2 ranks
    "test_env.py::test_real_mpirun_with_mpi4py",                       # mpirun -np 2
}
# The one small world the fast tier keeps ("file::test[id]"): TP layers on 2 ranks, seconds.
FAST_TIER_WORLD = "test_tp_layers.py::test_tp_layers_match_single_device[2]"
_SPAWN = re.compile(r"\brun_distributed\(")
_SOURCES: dict = {}


def _calls_run_distributed(fn: Callable) -> bool:
    key = id(fn)
    if key not in _SOURCES:
        try:
            _SOURCES[key] = bool(_SPAWN.search(inspect.getsource(fn)))
        except (OSError, TypeError):  # builtins, C functions, generated code
            _SOURCES[key] = False
    return _SOURCES[key]


def spawns_world(item: pytest.Item) -> bool:
    """The test, or a fixture it uses (directly or through other fixtures), spawns a world."""
    if f"{item.path.name}::{getattr(item, 'originalname', item.name)}" in WORLD_TESTS:
        return True
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        funcs += [d.func for d in (info.name2fixturedefs.get(name, ()) if info else ())]
    return any(_calls_run_distributed(f) for f in funcs if f is not None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{item.path.name}::{item.name}" != FAST_TIER_WORLD and spawns_world(item):
            item.add_marker(pytest.mark.world)


# ---------------------------------------------------------------- CI: no silent skips

CI = os.environ.get("MEGALITE_CI") == "1"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# The only skips CI accepts: things a CI machine may lack for good. A reason matching a pattern
# is allowed when its condition (if any) holds; every other skip fails under MEGALITE_CI=1.
CI_ALLOWED_SKIPS: List[Tuple[Pattern, Optional[Callable[[], bool]]]] = [
    # GPU-only tests: no GPU on CI (bench/gpu_check.sh runs them on one)
    (re.compile(r"CUDA is not available"), None),
    (re.compile(r"nvcc is not on PATH"), None),
    # real-cluster tests (tests/cluster): root only; as root .ci/run installs the Debian tools
    # first and fails if it cannot
    (re.compile(r"need root"), None),
    (re.compile(r"missing .*cluster\.sh install"), None),
    # mpirun is Debian's (openmpi-bin, installed with the cluster tools as root); the same
    # skip also covers a missing mpi4py, which pip must have installed
    (re.compile(r"needs mpirun"), lambda: _installed("mpi4py")),
]


def ci_skip_problem(reason: str) -> Optional[str]:
    """None when a skip with this reason is allowed under CI, else the failure message."""
    for pattern, condition in CI_ALLOWED_SKIPS:
        if pattern.search(reason) and (condition is None or condition()):
            return None
    return (f"MEGALITE_CI=1: this would have skipped ({reason.strip()}); CI must run it. "
            "Install what it needs (.ci/run installs setup.py's [ci] extra), or, if no CI "
            "machine can ever have it, allow the reason in CI_ALLOWED_SKIPS (tests/conftest.py)")


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2])
    return str(longrepr)


def _fail_disallowed_skip(report) -> None:
    if not (CI and report.skipped) or hasattr(report, "wasxfail"):  # xfail is not a skip
        return
    problem = ci_skip_problem(_reason(report))
    if problem is not None:
        report.outcome = "failed"
        report.longrepr = problem


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Skips in setup (skipif marks, fixtures) and in the test body (pytest.skip,
    pytest.importorskip)."""
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Whole modules skipped while importing (a module-level importorskip): an error, so
    pytest stops with a non-zero exit."""
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())
