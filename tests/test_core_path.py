"""The shape of the core, checked statically: one step path, parameter facts in one record,
ZeRO internals read only inside ``megalite/zero``, small files.

These read the source; they fail when someone re-introduces a second step path, a parameter
attribute, or a god file."""
from __future__ import annotations

import inspect
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources(*roots, exts=(".py",)):
    for root in roots:
        for folder, _, files in os.walk(os.path.join(REPO, root)):
            for name in files:
                if name.endswith(exts):
                    path = os.path.join(folder, name)
                    yield os.path.relpath(path, REPO), open(path, encoding="utf-8").read()


def test_no_parameter_attributes_remain():
    """Parameter facts live in ``ParamTable`` (by name), never on the tensors."""
    pattern = re.compile(r"""getattr\([^)]*['"](tp_sharded|tp_partial_grad|pp_tied_copy|tp_dim)"""
                         r"""['"]|\.(tp_sharded|tp_partial_grad|pp_tied_copy)\b""")
    hits = [(path, m.group(0)) for path, text in _sources("megalite", "bench")
            for m in pattern.finditer(text)]
    assert not hits, hits


def test_engine_internals_stay_in_zero():
    """Nobody outside megalite/zero branches on the ZeRO stage or gradient mode."""
    pattern = re.compile(r"engine\.(stage|grad_mode|shards)\b")
    hits = [(path, m.group(0)) for path, text in _sources("megalite")
            if not path.startswith(os.path.join("megalite", "zero"))
            for m in pattern.finditer(text)]
    assert not hits, hits


def test_one_step_path():
    """The trainer calls the executor for every layout, never a schedule by name, and
    ``train_step`` fits on a screen."""
    from megalite.trainer.loop import Trainer

    source = inspect.getsource(Trainer)
    assert "executor.run(" in source
    for name in ("zb-h1", "1f1b", "gpipe", "interleaved", "zero_stage", "pp > 1", "pp == 1"):
        assert name not in inspect.getsource(Trainer.train_step), name
    assert "if self.executor" not in source
    lines = inspect.getsource(Trainer.train_step).splitlines()
    assert len(lines) <= 40, len(lines)


def test_models_do_not_import_parallel_packages():
    for path, text in _sources(os.path.join("megalite", "models")):
        assert not re.search(r"megalite\.(tensor_parallel|pipeline|zero)", text), path


@pytest.mark.parametrize("root", ["megalite", "csrc"])
def test_files_stay_small(root):
    sizes = {path: text.count("\n") for path, text in
             _sources(root, exts=(".py", ".cpp", ".cu", ".cuh", ".h"))}
    big = {path: n for path, n in sizes.items() if n > 400}
    assert not big, big
