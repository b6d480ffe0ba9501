"""bench/checkpoint.py --quick runs end to end on a tiny model and prints every row: the
torch.save/load reference, megalite's DCP save/load, the async-save modes and hidden fraction,
and the HF export's peak memory (the full benchmark is run by hand; see its docstring)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(out: str, label: str) -> list:
    lines = [line for line in out.splitlines() if line.startswith(label)]
    assert len(lines) == 1, f"no single row {label!r} in:\n{out}"
    return lines[0][len(label):].split()


@pytest.mark.world  # one spawned 1-rank world and two subprocesses
def test_bench_checkpoint_quick_prints_every_row(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "checkpoint.py"), "--quick",
                        "--worlds", "1", "--async-world", "1", "--dir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    ref = _row(out, "torch.save/load, 1 process")
    dcp = _row(out, "megalite DCP, 1 rank")
    # MB, save MB/s, noise, load MB/s, noise, ratios: the same state's bytes on both sides
    assert float(ref[0]) > 0 and float(ref[1]) > 0 and float(ref[3]) > 0
    assert float(dcp[1]) > 0 and float(dcp[3]) > 0 and float(dcp[5]) > 0 and float(dcp[6]) > 0
    owned, written, extra = (float(x) for x in dcp[7:10])
    assert owned > 0 and written >= owned and extra >= 0  # one rank writes all it owns
    for mode in ("no save", "sync save", "async save"):
        assert float(_row(out, mode)[0]) > 0
    assert re.search(r"save time hidden by checkpoint\.async_save: -?\d+%", out), out
    hf = _row(out, "megalite convert --to hf")
    assert float(hf[0]) > 0 and int(hf[2]) >= 1 and float(hf[4]) > 0  # s, shards, peak RSS
    assert not os.listdir(tmp_path)  # the benchmark removed its checkpoints
