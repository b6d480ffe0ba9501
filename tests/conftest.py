import os
import sys

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
