"""Tests of the data pipeline: tokenizers, prepare-data, corpora, splits, packing, batching."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from collections import Counter
from typing import List

import numpy as np
import pytest

from megalite.config.schema import DataConfig  # noqa: E402
from megalite.data import (BlendedSamples, ByteTokenizer, IndexedTokens,  # noqa: E402
                           PackedSamples, build_datasets, ensure_dataset, eval_batch,
                           load_tokenizer, micro_batch, prepare, prepare_data_main,
                           split_documents, synthetic_texts, train_tokenizer)
# the package re-exports the function `prepare`, which shadows the submodule's name
prepare_mod = importlib.import_module("megalite.data.prepare")

TEXTS = ["hello world", "naïve café ☕ — ünïcødé", "def f(x):\n    return x + 1\n", ""]


def _write_corpus(root: str) -> List[str]:
    """3 docs from .txt/.md files and 3 from a .jsonl, plus a file that must be ignored."""
    os.makedirs(os.path.join(root, "sub"))
    with open(os.path.join(root, "a.txt"), "w", encoding="utf-8") as f:
        f.write("alpha document\nline two\n")
    with open(os.path.join(root, "sub", "b.md"), "w", encoding="utf-8") as f:
        f.write("# beta ☕\n")
    with open(os.path.join(root, "sub", "c.jsonl"), "w", encoding="utf-8") as f:
        for t in ["gamma one", "gamma two", "gamma three ü"]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
        f.write("\n")
    with open(os.path.join(root, "z.py"), "w", encoding="utf-8") as f:
        f.write("print('zeta')\n")
    with open(os.path.join(root, "ignored.bin"), "wb") as f:
        f.write(b"\x00\x01")
    # sorted relative paths: a.txt, sub/b.md, sub/c.jsonl (3 lines), z.py
    return ["alpha document\nline two\n", "# beta ☕\n", "gamma one", "gamma two",
            "gamma three ü", "print('zeta')\n"]


def test_bytes_round_trip(tmp_path) -> None:
    tok = train_tokenizer("bytes", [])
    assert (tok.vocab_size, tok.eod_id) == (257, 256)
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    assert tok.decode([0xE2, 0x98]) == "\ufffd"  # a cut multi-byte char must not raise
    tok.save(str(tmp_path / "t.json"))
    assert isinstance(load_tokenizer(str(tmp_path / "t.json")), ByteTokenizer)


def test_bpe_train_round_trip(tmp_path) -> None:
    texts = synthetic_texts()[:200]
    tok = train_tokenizer("bpe:350", iter(texts))
    assert tok.vocab_size == 350
    assert len(tok.encode(texts[0])) < len(texts[0].encode())  # merges actually compress
    for t in TEXTS + texts[:5]:
        assert tok.decode(tok.encode(t)) == t
    p = str(tmp_path / "bpe.json")
    tok.save(p)
    again = load_tokenizer(p)
    assert again.eod_id == tok.eod_id and again.encode(texts[1]) == tok.encode(texts[1])
    tok2 = train_tokenizer("bpe:350", texts)
    tok2.save(str(tmp_path / "bpe2.json"))
    assert (tmp_path / "bpe.json").read_bytes() == (tmp_path / "bpe2.json").read_bytes()
    # a foreign tokenizer.json is usable as a spec; one without an eod token is refused by name
    assert train_tokenizer(p, []).vocab_size == 350
    data = json.loads((tmp_path / "bpe.json").read_text())
    data["added_tokens"] = []
    del data["model"]["vocab"]["<|endoftext|>"]
    (tmp_path / "noeod.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="noeod.json"):
        load_tokenizer(str(tmp_path / "noeod.json"))


@pytest.mark.parametrize("spec", ["bpe", "bpe:x", "bpe:10", "gpt2", "missing/tokenizer.json"])
def test_bad_tokenizer_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="tokenizer spec") as e:
        train_tokenizer(spec, [])
    assert repr(spec) in str(e.value) and "bytes" in str(e.value)


def test_prepare_corpus(tmp_path, monkeypatch) -> None:
    docs = _write_corpus(str(tmp_path / "in"))
    monkeypatch.setattr(prepare_mod, "_CHUNK_DOCS", 2)  # several chunks -> order really tested
    out2 = str(tmp_path / "out" / "two")
    r = prepare([str(tmp_path / "in")], out2, "bytes", num_workers=2)
    assert (r["num_docs"], r["files"]) == (6, 4)
    t = IndexedTokens(out2)
    assert t.num_docs == 6 and t.tokens.dtype == np.uint16 and t.meta["tokenizer"] == "bytes"
    for i, d in enumerate(docs):
        assert t.doc(i)[-1] == 256 and (t.doc(i)[:-1] != 256).all()
        assert t.tokenizer.decode(t.doc(i)[:-1].tolist()) == d
    assert t.offsets.dtype == np.int64 and t.offsets[-1] == t.tokens.size == r["num_tokens"]
    out1 = str(tmp_path / "out" / "one")
    prepare([str(tmp_path / "in")], out1, "bytes", num_workers=1)
    for s in (".bin", ".idx.npy", ".tokenizer.json"):
        assert open(out1 + s, "rb").read() == open(out2 + s, "rb").read()
    # no temp files left behind; glob inputs work and select by pattern
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"{n}{s}" for n in ("one", "two") for s in (".bin", ".idx.npy", ".meta.json",
                                                      ".tokenizer.json"))
    r = prepare([str(tmp_path / "in" / "**" / "*.jsonl")], str(tmp_path / "g"), "bytes", 1)
    assert r["num_docs"] == 3


def test_prepare_bpe_dtype_and_worker_equivalence(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i, t in enumerate(synthetic_texts()[:60]):
        (src / f"d{i:03d}.txt").write_text(t)
    a = prepare([str(src)], str(tmp_path / "a"), "bpe:300", num_workers=2)
    prepare([str(src)], str(tmp_path / "b"), "bpe:300", num_workers=1)
    assert a["dtype"] == "uint16" and a["vocab_size"] == 300 and a["num_docs"] == 60
    assert open(tmp_path / "a.bin", "rb").read() == open(tmp_path / "b.bin", "rb").read()
    t = IndexedTokens(str(tmp_path / "a"))
    assert t.tokenizer.decode(t.doc(3)[:-1].tolist()) == synthetic_texts()[3]


def test_prepare_is_atomic(tmp_path, monkeypatch) -> None:
    _write_corpus(str(tmp_path / "in"))
    prefix = str(tmp_path / "ds")
    prepare([str(tmp_path / "in")], prefix, "bytes", 1)
    old_bin = open(prefix + ".bin", "rb").read()

    def boom(*a, **k):
        raise RuntimeError("crash while writing the index")
    monkeypatch.setattr(prepare_mod.np, "save", boom)
    with pytest.raises(RuntimeError):
        prepare([str(tmp_path / "in" / "sub")], prefix, "bytes", 1)
    # the old complete dataset is untouched and no temp file is left
    assert open(prefix + ".bin", "rb").read() == old_bin
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_cli_errors(tmp_path, capsys) -> None:
    assert prepare_data_main(["--input", str(tmp_path / "nothing*.txt"), "--output",
                              str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nothing*.txt: no such file" in err
    assert prepare_data_main(["--input", str(tmp_path), "--output", str(tmp_path / "x"),
                              "--tokenizer", "bpe:abc"]) == 2
    assert "bpe:abc" in capsys.readouterr().err
    assert prepare_data_main(["--help"]) == 0
    assert "megalite prepare-data" in capsys.readouterr().out
    _write_corpus(str(tmp_path / "in"))
    assert prepare_data_main(["--input", str(tmp_path / "in"), "--output",
                              str(tmp_path / "ok"), "--workers", "1"]) == 0
    assert "6 docs" in capsys.readouterr().out


def test_split_documents() -> None:
    tr, va = split_documents(100, "98,2", seed=1)
    assert len(va) == 2 and len(tr) == 98
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    assert np.array_equal(split_documents(100, "98,2", 1)[1], va)
    assert not np.array_equal(split_documents(100, "50,50", 1)[1],
                              split_documents(100, "50,50", 2)[1])
    assert len(split_documents(3, "99,1", 0)[1]) == 1  # val never empty when asked for
    assert len(split_documents(1, "99,1", 0)[0]) == 1
    assert len(split_documents(10, "1,0", 0)[1]) == 0
    for bad in ["", "a,b", "1,-1", "0,0", "1,2,3"]:
        with pytest.raises(ValueError, match="data.split"):
            split_documents(10, bad, 0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> IndexedTokens:
    cache = str(tmp_path_factory.mktemp("cache"))
    (prefix,) = ensure_dataset(DataConfig(source="synthetic", cache_dir=cache))
    assert ensure_dataset(DataConfig(source="synthetic", cache_dir=cache)) == [prefix]  # reused
    return IndexedTokens(prefix)


def test_packed_samples(synth: IndexedTokens) -> None:
    docs = np.arange(40)
    ds = PackedSamples(synth, docs, seq_len=32, num_samples=600, seed=3)
    assert ds.num_epochs > 1 and len(ds) == 600 and ds[0].dtype == np.int64
    stream = np.concatenate([synth.doc(int(d)) for d in ds.doc_order]).astype(np.int64)
    raw = np.concatenate([ds.raw(j)[:-1] for j in range(len(ds))])
    assert np.array_equal(raw, stream[:raw.size])
    assert np.array_equal(ds.raw(599), stream[599 * 32:600 * 32 + 1])  # overlap of one token
    assert np.array_equal(ds[5], ds.raw(int(ds.sample_order[5])))
    assert sorted(ds.doc_order[:40].tolist()) == docs.tolist()  # each epoch is a permutation
    other = PackedSamples(synth, docs, seq_len=32, num_samples=600, seed=4)
    assert not np.array_equal(ds[0], other[0])
    same = PackedSamples(synth, docs, seq_len=32, num_samples=600, seed=3)
    assert all(np.array_equal(ds[i], same[i]) for i in range(0, 600, 37))
    # one epoch worth of samples: a new seed reorders the documents, not their tokens
    n = int(synth.doc_lengths[docs].sum() - 1) // 32
    a, b = (PackedSamples(synth, docs, 32, n, s) for s in (3, 4))
    assert Counter(np.concatenate([a.raw(j)[:-1] for j in range(n)]).tolist()) == \
        Counter(np.concatenate([b.raw(j)[:-1] for j in range(n)]).tolist())
    with pytest.raises(ValueError, match="fewer than one sample"):
        PackedSamples(synth, [0], seq_len=4096, num_samples=1, seed=0)


def test_micro_batch_layouts(synth: IndexedTokens) -> None:
    ds = PackedSamples(synth, np.arange(synth.num_docs), 16, 64, seed=0)
    mbs, g = 2, 8

    def step_samples(dp: int, ga: int, step: int) -> List[bytes]:
        got = []
        for r in range(dp):
            for m in range(ga):
                x, y = micro_batch(ds, step, m, r, mbs, ga, dp)
                assert x.shape == (mbs, 16) and x.dtype.is_floating_point is False
                assert (x[:, 1:] == y[:, :-1]).all()
                got += [np.concatenate([row.numpy(), yr[-1:].numpy()]).tobytes()
                        for row, yr in zip(x, y)]
        return sorted(got)

    for step in range(3):
        ref = step_samples(1, 4, step)
        assert ref == sorted(ds[i].tobytes() for i in range(step * g, (step + 1) * g))
        assert step_samples(2, 2, step) == ref == step_samples(4, 1, step)
    with pytest.raises(IndexError):
        micro_batch(ds, 8, 0, 0, mbs, 4, 1)
    # start (a run resumed with another global batch): the step's batch begins at that sample
    x, _ = micro_batch(ds, 5, 1, 1, mbs, 2, 2, start=13)
    assert [row.tolist() for row in x] == [ds[i][:-1].tolist() for i in (13 + 6, 13 + 7)]
    assert micro_batch(ds, 2, 1, 0, mbs, 4, 1, start=2 * g)[0].equal(
        micro_batch(ds, 2, 1, 0, mbs, 4, 1)[0])  # the default start is step x global batch
    x, _ = eval_batch(ds, 40, 1, 2, 2)  # wraps around the end
    assert np.array_equal(x[0].numpy(), ds[(40 * 2 + 1) * 2 % 64][:-1])


def test_blending_exact() -> None:
    class Fake:
        def __init__(self, tag: int) -> None:
            self.tag = tag

        def __len__(self) -> int:
            return 10_000

        def __getitem__(self, i: int) -> np.ndarray:
            return np.array([self.tag, i])

    w = [0.5, 0.3, 0.2]
    b = BlendedSamples([Fake(0), Fake(1), Fake(2)], [5, 3, 2], 1000)
    counts = np.zeros(3)
    for i in range(1000):
        counts[b.dataset_index[i]] += 1
        assert np.all(np.abs(counts - np.array(w) * (i + 1)) < 1.0)
    assert counts.tolist() == [500, 300, 200]
    assert b[7].tolist() == [b.dataset_index[7], b.sample_index[7]]
    assert [b[i][1] for i in range(1000) if b[i][0] == 1] == list(range(300))


def test_build_datasets(synth: IndexedTokens, tmp_path) -> None:
    p = synth.prefix
    cfg = DataConfig(source="prepared", paths=[p, p], weights=[3, 1], seq_len=32, split="90,10")
    train, val, tok = build_datasets(cfg, seed=1, num_train_samples=100, num_val_samples=20)
    assert len(train) == 100 and len(val) == 20 and tok.vocab_size == 257
    assert train.counts == [75, 25] and train[0].shape == (33,)
    with pytest.raises(ValueError, match="data.weights.*data.paths"):
        build_datasets(DataConfig(source="prepared", paths=[p], weights=[1, 2]), 1, 10, 1)
    with pytest.raises(ValueError, match="missing.bin"):
        ensure_dataset(DataConfig(source="prepared", paths=[str(tmp_path / "missing")]))
    docs = _write_corpus(str(tmp_path / "in"))
    other = str(tmp_path / "bpe")
    prepare([str(tmp_path / "in")] * 3, other, "bpe:300", 1)
    assert IndexedTokens(other).num_docs == len(docs)  # repeated input is read once
    with pytest.raises(ValueError, match="different tokenizers"):
        build_datasets(DataConfig(source="prepared", paths=[p, other], seq_len=4), 1, 10, 1)


def test_synthetic_corpus_is_pinned() -> None:
    texts = synthetic_texts()
    assert len(texts) == 1500 and all(100 <= len(t) <= 600 for t in texts)
    # Pinned once: the corpus is generated with integer SplitMix64, so this hash must be the same
    # on every machine, OS and Python version. Changing the generator means bumping
    # SYNTHETIC_VERSION and this hash together.
    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    assert digest == "b438ce5449689efb14fa8c9ff08ba2afa98a8a98b40b51970a95e8e2ae222fa0"


def test_ensure_dataset_concurrent(tmp_path) -> None:
    import multiprocessing as mp
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        got = pool.map(ensure_dataset, [DataConfig(source="synthetic", cache_dir=cache)] * 2)
    assert got[0] == got[1]
    t = IndexedTokens(got[0][0])
    assert t.num_docs == 1500
    assert not [f for f in os.listdir(cache) if ".tmp-" in f]


def test_stdlib_source(tmp_path) -> None:
    cfg = DataConfig(source="stdlib", tokenizer="bytes", stdlib_max_bytes=60_000,
                     cache_dir=str(tmp_path), num_workers=2)
    (prefix,) = ensure_dataset(cfg)
    assert "py%d.%d" % sys.version_info[:2] in prefix and "60000" in prefix
    t = IndexedTokens(prefix)
    assert t.num_docs >= 1 and t.meta["num_tokens"] <= 60_000 + t.num_docs
    with pytest.raises(ValueError, match="data.source"):
        ensure_dataset(DataConfig(source="web"))
