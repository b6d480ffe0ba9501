"""Tests of the data inputs a field user brings: compressed and binary files, bad jsonl lines
found before any worker starts, Megatron indexed datasets, cut prepared datasets, and a sample
order that does not depend on train.steps."""
from __future__ import annotations

import gzip
import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megalite.config.schema import DataConfig
from megalite.data import (ByteTokenizer, DataError, IndexedTokens, MegatronTokens,
                           PackedSamples, build_datasets, check_data, ensure_dataset, prepare,
                           prepare_data_main, read_index, synthetic_texts)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    zstandard = pytest.importorskip("zstandard")  # setup.py's `zstd` extra (in `ci`)
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
    cases = [([str(good), str(rand)], ["random.txt: not a UTF-8 text file"]),
             ([str(good), sys.executable], [f"{sys.executable}: not a UTF-8", "NUL"]),
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


def _copy_dataset(src: str, dst: str) -> str:
    for s in (".bin", ".idx.npy", ".meta.json", ".tokenizer.json"):
        shutil.copyfile(src + s, dst + s)
    return dst


def test_cut_or_missing_data_is_one_line(tmp_path) -> None:
    """Each broken dataset file is named by a DataError (one line) from check_data, the check
    the CLI runs before any rank starts; no numpy/json error escapes."""
    (good,) = ensure_dataset(DataConfig(source="synthetic", cache_dir=str(tmp_path / "c")))
    check_data(DataConfig(source="prepared", paths=[good]))  # a complete dataset passes

    def refused(cfg: DataConfig, *needles: str) -> None:
        with pytest.raises(DataError) as e:
            check_data(cfg)
        assert "\n" not in str(e.value)
        for n in needles:
            assert n in str(e.value), str(e.value)

    missing = str(tmp_path / "nope" / "ds")
    refused(DataConfig(source="prepared", paths=[good, missing]), f"prefix {missing}",
            "does not exist", "prepare-data")
    half = _copy_dataset(good, str(tmp_path / "half"))
    os.remove(half + ".meta.json")  # a .bin alone: Megatron's .idx or our meta.json is missing
    refused(DataConfig(source="prepared", paths=[half]), f"{half}.bin exists", f"{half}.idx")
    refused(DataConfig(source="stdlib", tokenizer=str(tmp_path / "tok.json")),
            "data.tokenizer", "tok.json", "no such file")
    cases = [  # (file, how it is broken, expected words)
        (".meta.json", lambda b: b[:len(b) // 2], "not valid JSON"),
        (".idx.npy", lambda b: b"garbage" * 20, "not a .npy file"),
        (".idx.npy", lambda b: b[:len(b) - 16], "not a readable .npy index"),
        (".bin", lambda b: b[:-3], "the dataset is cut"),
        (".tokenizer.json", lambda b: b[:10], "cannot load tokenizer"),
    ]
    for k, (suffix, cut, words) in enumerate(cases):
        p = _copy_dataset(good, str(tmp_path / f"cut{k}"))
        with open(p + suffix, "rb") as f:
            data = f.read()
        with open(p + suffix, "wb") as f:
            f.write(cut(data))
        refused(DataConfig(source="prepared", paths=[p]), p + suffix, words)
    # an index holding pickled objects is refused, never unpickled
    p = _copy_dataset(good, str(tmp_path / "objects"))
    np.save(p + ".idx.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused(DataConfig(source="prepared", paths=[p]), p + ".idx.npy", "never loads")


def test_cli_data_errors_before_ranks(tmp_path) -> None:
    """`megalite train` with a missing prefix (1 process), with a cut meta.json (dp=2, the
    parent checks before spawning) and as launched ranks 0 and 1 of 2 (each checks before its
    process group starts, only rank 0 speaks): exit 2, one `error:` line, no traceback."""
    (good,) = ensure_dataset(DataConfig(source="synthetic", cache_dir=str(tmp_path / "c")))
    cut = _copy_dataset(good, str(tmp_path / "cut"))
    with open(cut + ".meta.json", "w") as f:
        f.write('{"format": "megalite-indexed-v1", "dty')
    env = dict(os.environ, PYTHONPATH=REPO)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    launched = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # never reached
    for paths, extra, rank, words in (
            (str(tmp_path / "missing"), [], None, "no dataset at prefix"),
            (cut, ["--parallel.dp=2"], None, "cut.meta.json: not valid JSON"),
            (cut, ["--parallel.dp=2"], "0", "cut.meta.json: not valid JSON"),
            (cut, ["--parallel.dp=2"], "1", None)):
        r = subprocess.run([sys.executable, "-m", "megalite.cli", "train", "--config",
                            os.path.join(REPO, "configs", "tiny.yaml"), "--data.source=prepared",
                            "--parallel.backend=gloo",
                            f"--data.paths={paths}", f"--run.dir={tmp_path / 'run'}", *extra],
                           capture_output=True, text=True, timeout=120,
                           env=env if rank is None else dict(env, RANK=rank, **launched))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        if words is None:
            assert lines == [], r.stderr
            continue
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "run")


def _megatron_builder():
    pytest.importorskip("megatron.core")  # setup.py's `ci` extra (megatron-core)
    import torch  # noqa: F401  (the builder takes tensors)
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    return IndexedDataset, IndexedDatasetBuilder


def test_megatron_index_header_and_dtypes(tmp_path) -> None:
    """read_index parses what IndexedDatasetBuilder writes, for every integer token dtype,
    several sequences per document and the multimodal layout, as megatron-core reads it;
    float tokens, a cut .idx and a cut .bin are refused by name."""
    import torch

    IndexedDataset, IndexedDatasetBuilder = _megatron_builder()
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64):
        for multimodal in (False, True):
            prefix = str(tmp_path / f"m_{np.dtype(dtype).name}_{int(multimodal)}")
            b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype, multimodal=multimodal)
            for d in range(5):
                for _ in range(d % 3 + 1):  # 1-3 sequences per document, one of them empty
                    n = int(rng.integers(0, 9)) if d else 0
                    b.add_item(torch.from_numpy(rng.integers(0, 100, n).astype(dtype)), mode=1)
                b.end_document()
            b.finalize(prefix + ".idx")
            ref = IndexedDataset(prefix, multimodal=multimodal)
            idx = read_index(prefix + ".idx")
            assert idx.dtype == np.dtype(dtype)
            assert np.array_equal(idx.sequence_lengths, ref.sequence_lengths)
            assert np.array_equal(idx.document_indices, ref.document_indices)
            t = MegatronTokens(prefix, _bytes_tokenizer(tmp_path), append_eod=False)
            for d in range(5):
                seqs = range(ref.document_indices[d], ref.document_indices[d + 1])
                # a multimodal dataset returns (tokens, mode) per sequence
                want = np.concatenate([ref[s][0] if multimodal else ref[s] for s in seqs])
                assert np.array_equal(t.doc(d), want), (dtype, multimodal, d)
    prefix = str(tmp_path / "big")  # ids beyond the byte tokenizer's 257: another tokenizer's
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    b.add_item(torch.tensor([5, 300, 7]))
    b.end_document()
    b.finalize(prefix + ".idx")
    with pytest.raises(DataError, match=r"big\.bin: token id 300 .* vocabulary \(size 257\)"):
        MegatronTokens(prefix, _bytes_tokenizer(tmp_path), append_eod=False)
    prefix = str(tmp_path / "f")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.float32)
    b.add_item(torch.ones(3))
    b.end_document()
    b.finalize(prefix + ".idx")
    with pytest.raises(DataError, match=r"f\.idx: tokens of dtype float32"):
        read_index(prefix + ".idx")
    good = str(tmp_path / "m_uint16_0")
    for suffix, words in ((".idx", "needs"), (".bin", "cut")):
        bad = str(tmp_path / f"cut{suffix}")
        for s in (".idx", ".bin"):
            shutil.copyfile(good + s, bad + s)
        with open(bad + suffix, "rb+") as f:
            f.truncate(os.path.getsize(bad + suffix) - 2)
        with pytest.raises(DataError, match=re.escape(bad + suffix) + ".*" + words):
            MegatronTokens(bad, _bytes_tokenizer(tmp_path), append_eod=False)


def _bytes_tokenizer(tmp_path) -> str:
    path = str(tmp_path / "bytes.tokenizer.json")
    ByteTokenizer().save(path)
    return path


def test_megatron_dataset_trains_like_prepared(tmp_path, data_cache) -> None:
    """The same documents tokenized by prepare-data (eod after each) and written with
    IndexedDatasetBuilder (without eod, data.megatron_append_eod=true; and with eod in the
    tokens, as preprocess_data.py --append-eod) give the same samples, and a 1-process tiny
    model the same 10 losses; without data.tokenizer the Megatron data is refused."""
    import torch

    from helpers import tiny_config, train

    _, IndexedDatasetBuilder = _megatron_builder()
    jsonl = tmp_path / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for t in synthetic_texts()[:300]:
            f.write(json.dumps({"text": t}) + "\n")
    ours = str(tmp_path / "ours")
    prepare([str(jsonl)], ours, "bpe:400", 1)
    tok_file = ours + ".tokenizer.json"
    tok = IndexedTokens(ours).tokenizer
    for name, with_eod in (("meg", False), ("meg_eod", True)):
        b = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.uint16)
        for t in synthetic_texts()[:300]:
            ids = tok.encode(t) + ([tok.eod_id] if with_eod else [])
            b.add_item(torch.tensor(ids, dtype=torch.int64))
            b.end_document()
        b.finalize(str(tmp_path / f"{name}.idx"))
    meg, meg_eod = str(tmp_path / "meg"), str(tmp_path / "meg_eod")
    common = dict(source="prepared", tokenizer=tok_file, seq_len=64, split="95,5")
    ref_train, ref_val, _ = build_datasets(DataConfig(paths=[ours], **common), 7, 200, 20)
    for prefix, append in ((meg, True), (meg_eod, False)):
        cfg = DataConfig(paths=[prefix], megatron_append_eod=append, **common)
        tr, va, mtok = build_datasets(cfg, 7, 200, 20)
        assert mtok.eod_id == tok.eod_id and mtok.vocab_size == tok.vocab_size
        assert all(np.array_equal(tr[i], ref_train[i]) for i in range(200))
        assert all(np.array_equal(va[i], ref_val[i]) for i in range(20))
    with pytest.raises(DataError, match="Megatron dataset, which carries no tokenizer"):
        check_data(DataConfig(source="prepared", paths=[meg]))  # data.tokenizer left bpe:4096
    losses = []
    for paths, extra in ((ours, []), (meg, ["--data.megatron_append_eod=true",
                                            f"--data.tokenizer={tok_file}"])):
        cfg = tiny_config(str(tmp_path / f"run-{len(losses)}"), data_cache, "--train.steps=10",
                          "--train.eval_iters=1", "--data.source=prepared",
                          f"--data.paths={paths}", *extra)
        losses.append(train(cfg, distributed=False)[1].losses)
    assert len(losses[0]) == 10 and losses[0] == losses[1]  # same samples: bit-identical
