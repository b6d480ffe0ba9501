"""Tests of the data inputs a field user brings: compressed and binary files, bad jsonl lines
found before any worker starts, Megatron indexed datasets, cut prepared datasets, and a sample
order that does not depend on train.steps."""
from __future__ import annotations

import gzip
import importlib
import json
import os
import sys

import numpy as np
import pytest

from megalite.config.schema import DataConfig
from megalite.data import (DataError, IndexedTokens, PackedSamples, build_datasets,
                           ensure_dataset, prepare, prepare_data_main)

prepare_mod = importlib.import_module("megalite.data.prepare")


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megalite prepare-data: error: "), err
    for n in needles:
        assert n in err, err
    return err


def test_compressed_inputs_and_text_key(tmp_path, monkeypatch) -> None:
    """.jsonl.gz and .txt.zst are read as text (explicitly and from a directory), the jsonl
    field is --text_key; the dataset decodes back to the documents, in input order."""
    import zstandard

    src = tmp_path / "in"
    src.mkdir()
    docs = ["première ligne ☕", "second doc", "third\nwith lines"]
    with gzip.open(src / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[:2]:
            f.write(json.dumps({"content": d, "text": 7}) + "\n")
    # two zstd frames, as pzstd or a concatenation of shards writes them
    body = (docs[2] + " ünï").encode()
    (src / "b.txt.zst").write_bytes(zstandard.compress(body[:9]) + zstandard.compress(body[9:]))
    (src / "c.md").write_text("plain")
    out = str(tmp_path / "ds")
    assert prepare_data_main(["--input", str(src), "--output", out, "--text_key", "content",
                              "--workers", "2"]) == 0
    t = IndexedTokens(out)
    got = [t.tokenizer.decode(t.doc(i)[:-1].tolist()) for i in range(t.num_docs)]
    assert got == docs[:2] + [docs[2] + " ünï", "plain"]
    r = prepare([str(src / "b.txt.zst")], str(tmp_path / "one"), "bytes", 1)  # named explicitly
    assert r["num_docs"] == 1 and r["num_tokens"] == len(body) + 1
    # the default key 'text' holds an int in a.jsonl.gz: named by file:line and field
    with pytest.raises(DataError, match=r"a\.jsonl\.gz:1: field 'text' is a int"):
        prepare([str(src)], str(tmp_path / "x"), "bytes", 1)
    # a truncated .gz is named, not a traceback
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(gzip.compress(b"x" * 5000)[:20])
    with pytest.raises(DataError, match="cut.txt.gz: cannot read"):
        prepare([str(cut)], str(tmp_path / "x"), "bytes", 1)
    # without the optional zstandard package: one line that names the extra
    monkeypatch.setitem(sys.modules, "zstandard", None)
    assert prepare_data_main(["--input", str(src), "--output", out, "--text_key",
                              "content"]) == 2


def test_binary_and_bad_input_refused_before_workers(tmp_path, monkeypatch, capsys) -> None:
    """Binary files are refused by name; bad jsonl lines and missing inputs are found in this
    process before the tokenizer pool starts, and no output file is written."""
    def no_pool(*a, **k):
        raise AssertionError("the worker pool was started before the input was checked")
    monkeypatch.setattr(prepare_mod, "_pool", no_pool)
    rand = tmp_path / "random.txt"
    rand.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    good = tmp_path / "good.txt"
    good.write_text("fine text\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    out = str(tmp_path / "out" / "ds")
    cases = [([str(good), str(rand)], ["random.txt: not a text file"]),
             ([str(good), sys.executable], [f"{sys.executable}: not a text file", "NUL"]),
             ([str(good), str(bad)], ["bad.jsonl:3: expected a JSON object"]),
             ([str(good), str(tmp_path / "typo.txt")], ["typo.txt: no such file"])]
    for inputs, needles in cases:
        for tok in ("bytes", "bpe:300"):  # bpe: the training pass finds it, before the pool
            assert prepare_data_main(["--input", *inputs, "--output", out, "--tokenizer", tok,
                                      "--workers", "2"]) == 2
            _one_error_line(capsys, *needles)
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    (tmp_path / "z.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    assert prepare_data_main(["--input", str(tmp_path / "z.txt.zst"), "--output", out]) == 2
    _one_error_line(capsys, "z.txt.zst", "megalite[zstd]")


def test_sample_order_is_a_stable_prefix(tmp_path) -> None:
    """The first k steps see the same samples whatever train.steps is: a 10-step run's samples
    are the first samples of a 20-step run's, for one dataset and for a blend of two."""
    (prefix,) = ensure_dataset(DataConfig(source="synthetic", cache_dir=str(tmp_path)))
    gbs = 64  # 20 steps * 64 samples * 32 tokens spans several epochs of the 1350-doc split
    for paths, weights in (([prefix], []), ([prefix, prefix], [3.0, 1.0])):
        cfg = DataConfig(source="prepared", paths=paths, weights=weights, seq_len=32,
                         split="90,10")
        short, _, _ = build_datasets(cfg, 5, 10 * gbs, 0)
        long, _, _ = build_datasets(cfg, 5, 20 * gbs, 0)
        assert len(short) == 10 * gbs and len(long) == 20 * gbs
        for i in range(len(short)):
            assert np.array_equal(short[i], long[i]), f"{paths}: sample {i} differs"
    t = IndexedTokens(prefix)
    a = PackedSamples(t, np.arange(100), 32, 2000, seed=1)
    assert a.num_epochs > 1 and a.block_size < len(a)
    # each block is a permutation of its own samples: every sample of the stream is seen once
    b = a.block_size
    assert sorted(a.sample_order[:b].tolist()) == list(range(b))
    rest = a.sample_order[b:].tolist()  # the partial last block: distinct samples of block 1
    assert len(set(rest)) == len(rest) == 2000 - b and b <= min(rest) and max(rest) < 2 * b
