"""Masked-LM and classification data (issue 17): the WordPiece tokenizer, BERT samples from one
document each, masked-LM collation statistics, layout independence, GLUE-format loading."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List

import numpy as np
import pytest
import torch

from megalite.config.schema import DataConfig
from megalite.data import (DataError, IndexedTokens, MegatronTokens, load_tokenizer,
                           prepare_documents, split_documents, synthetic_texts, train_tokenizer)
from megalite.data.classification import (GLUE_FIELDS, encode_examples, encode_pair,
                                          load_classification_jsonl, truncate_pair)
from megalite.data.mlm import (IGNORE_INDEX, KEYS, MLMSamples, build_mlm_datasets,
                               check_mlm_data, content_lengths, mlm_eval_batch, mlm_micro_batch)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "glue")
SEQ = 64
SENTENCE = "the quick dog chases the red bird"


def _bert_tokenizer_json(path: str) -> None:
    """A BERT-style tokenizer.json as Hugging Face ships them (uncased, WordPiece, specials
    declared as added tokens, [CLS] A [SEP] B [SEP] post-processor), ids not 0-4 in order."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    words = ("the quick dog chase ##s red bird hello world a cat sat on mat , . ? ##ing "
             "play run fast slow big small house tree").split()
    specials = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz") + words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 3), ("[SEP]", 4)])
    tok.save(path)


def test_wordpiece_train_save_load(tmp_path) -> None:
    texts = synthetic_texts()[:300]
    tok = train_tokenizer("wordpiece:300", iter(texts))
    assert tok.vocab_size == 300
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
    assert tok.eod_id == tok.sep_id and tok.special_ids() == [0, 1, 2, 3, 4]  # [UNK] = 1
    ids = tok.encode(SENTENCE)
    assert len(ids) < len(SENTENCE.split()) + 3 and tok.decode(ids) == SENTENCE
    assert tok.encode("Ω") == [1]  # outside the learnt alphabet: [UNK]
    p = str(tmp_path / "wp.json")
    tok.save(p)
    again = load_tokenizer(p)
    assert (again.vocab_size, again.eod_id, again.special_ids()) == (300, 3, [0, 1, 2, 3, 4])
    assert [again.encode(t) for t in texts[:20]] == [tok.encode(t) for t in texts[:20]]
    train_tokenizer("wordpiece:300", texts).save(str(tmp_path / "wp2.json"))  # deterministic
    assert (tmp_path / "wp.json").read_bytes() == (tmp_path / "wp2.json").read_bytes()
    for bad in ("wordpiece:10", "wordpiece:x", "wordpiece"):
        with pytest.raises(ValueError, match="tokenizer spec"):
            train_tokenizer(bad, [])
    # GPT tokenizers have no BERT specials: masked-LM refuses them by name, before any data
    assert train_tokenizer("bytes", []).special_ids() == [256]
    bpe = train_tokenizer("bpe:300", texts)
    assert (bpe.pad_id, bpe.cls_id, bpe.sep_id, bpe.mask_id) == (None,) * 4
    assert bpe.special_ids() == [bpe.eod_id]
    bpe.save(str(tmp_path / "bpe.json"))
    for spec, where in (("bpe:4096", "data.tokenizer=bpe:4096"), ("bytes", "data.tokenizer=bytes"),
                        (str(tmp_path / "bpe.json"), "bpe.json")):
        with pytest.raises(DataError, match=where) as e:
            check_mlm_data(DataConfig(source="stdlib", tokenizer=spec))
        assert "wordpiece:VOCAB" in str(e.value) and "\n" not in str(e.value)


def test_bert_tokenizer_json_and_prepared_documents(tmp_path) -> None:
    """An existing BERT tokenizer.json: its specials found by name, [SEP] ends each prepared
    document, and masked-LM samples of the prepared data cut at document boundaries."""
    path = str(tmp_path / "bert.json")
    _bert_tokenizer_json(path)
    tok = load_tokenizer(path)
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.eod_id) == (0, 3, 4, 5, 4)
    assert tok.special_ids() == [0, 2, 3, 4, 5]  # [unused0] is no special token
    assert tok.decode(tok.encode("Hello World")) == "hello world"
    docs = ["the quick dog chases the red bird . " * 3, "hello world", "a", "",
            "a cat sat on the mat , playing . " * 4]
    prepare_documents(lambda: docs, str(tmp_path / "d"), path, num_workers=1)
    t = IndexedTokens(str(tmp_path / "d"))
    assert [int(t.doc(i)[-1]) for i in range(len(docs))] == [tok.sep_id] * len(docs)
    assert content_lengths(t).tolist() == [len(tok.encode(d)) for d in docs]
    ds = MLMSamples(t, np.arange(len(docs)), 16, seed=5, num_samples=40, tokenizer=tok)
    assert ds.num_chunks == sum(-(-len(tok.encode(d)) // 13) for d in docs)  # 13 = 16 - 3
    for i in range(len(ds)):
        s = ds[i]
        original = np.where(s["labels"] == IGNORE_INDEX, s["tokens"], s["labels"])
        n = int(s["attention_mask"].sum())
        body = original[1:n][original[1:n] != tok.sep_id]
        doc = t.doc(ds.document(i)).astype(np.int64)
        assert _contains(doc[:-1], body), i  # inside one document, without its [SEP]
        if n == 3:  # a one-token document ("a"): [CLS] A [SEP], no B
            assert s["token_types"].tolist() == [0] * 16
    # two prepared datasets blended 1:3, as build_datasets blends GPT data
    prepare_documents(lambda: docs[::-1], str(tmp_path / "e"), path, num_workers=1)
    cfg = DataConfig(source="prepared", paths=[str(tmp_path / "d"), str(tmp_path / "e")],
                     weights=[1, 3], seq_len=16, split="1,0")
    blend, val, _ = build_mlm_datasets(cfg, seed=5, num_train_samples=40, num_val_samples=8)
    assert val is None and len(blend) == 40 and blend.counts == [10, 30]
    assert set(blend[0]) == set(KEYS)
    prepare_documents(lambda: docs, str(tmp_path / "bytes"), "bytes", num_workers=1)
    with pytest.raises(DataError, match=r"bytes\.tokenizer\.json: masked-LM needs"):
        check_mlm_data(DataConfig(source="prepared", paths=[str(tmp_path / "bytes")]))
    with pytest.raises(DataError, match="seq_len=3"):
        MLMSamples(t, np.arange(len(docs)), 3, seed=5, num_samples=4, tokenizer=tok)
    with pytest.raises(DataError, match="masked-LM needs"):
        MLMSamples(t, [0], 16, 5, 4, train_tokenizer("bytes", []))


def _write_megatron(prefix: str, docs: List[List[int]]) -> None:
    """A Megatron indexed dataset (megatron.py's header layout), one uint16 sequence per doc."""
    from megalite.data.megatron import _HEADER, MAGIC
    lengths = np.asarray([len(d) for d in docs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * 2
    with open(prefix + ".idx", "wb") as f:
        f.write(_HEADER.pack(MAGIC, 1, 8, len(docs), len(docs) + 1))  # dtype code 8: uint16
        f.write(lengths.tobytes() + pointers.tobytes())
        f.write(np.arange(len(docs) + 1, dtype=np.int64).tobytes())
    np.concatenate([np.asarray(d, dtype=np.uint16) for d in docs]).tofile(prefix + ".bin")


def test_megatron_documents_give_the_same_mlm_samples(tmp_path) -> None:
    """Documents read from a Megatron dataset, with or without an eod at their end, give the
    masked-LM samples of the same documents prepared by megalite: the eod is never content."""
    path = str(tmp_path / "bert.json")
    _bert_tokenizer_json(path)
    tok = load_tokenizer(path)
    docs = ["the quick dog chases the red bird . " * 5, "hello world", "a cat sat on the mat"]
    prepare_documents(lambda: docs, str(tmp_path / "ours"), path, num_workers=1)
    ours = IndexedTokens(str(tmp_path / "ours"))
    ids = [tok.encode(d) for d in docs]
    _write_megatron(str(tmp_path / "plain"), ids)
    _write_megatron(str(tmp_path / "eod"), [x + [tok.eod_id] for x in ids])
    ref = MLMSamples(ours, [0, 1, 2], 16, 9, 30, tok)
    for name, append in (("plain", True), ("plain", False), ("eod", False)):
        meg = MegatronTokens(str(tmp_path / name), path, append_eod=append)
        assert content_lengths(meg).tolist() == [len(x) for x in ids]
        ds = MLMSamples(meg, [0, 1, 2], 16, 9, 30, tok)
        for i in range(30):
            assert all(np.array_equal(ds[i][k], ref[i][k]) for k in KEYS), (name, append, i)


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    """``needle`` is a contiguous run of ``haystack``."""
    h = np.ascontiguousarray(haystack, dtype=np.int64).tobytes()
    n = np.ascontiguousarray(needle, dtype=np.int64).tobytes()
    at = h.find(n)
    while at != -1 and at % 8:
        at = h.find(n, at + 1)
    return at != -1


@pytest.fixture(scope="module")
def mlm_sets(data_cache):
    """The synthetic corpus with a WordPiece, through the same cache/prepare path as GPT data."""
    cfg = DataConfig(source="synthetic", tokenizer="wordpiece:300", cache_dir=data_cache,
                     seq_len=SEQ, split="90,10")
    train, val, tok = build_mlm_datasets(cfg, seed=3, num_train_samples=3000, num_val_samples=64)
    return cfg, train, val, tok


def test_mlm_sample_layout_and_documents(mlm_sets) -> None:
    """[CLS] A [SEP] B [SEP] + [PAD]: segment ids, attention mask, specials never chosen, one
    chunk of one document per sample, train and validation documents apart."""
    cfg, train, val, tok = mlm_sets
    assert isinstance(train, MLMSamples) and len(train) == 3000 and len(val) == 64
    t = train.tokens
    content = content_lengths(t)
    assert (content == t.doc_lengths - 1).all()  # prepare ended every document with [SEP]
    train_docs, val_docs = split_documents(t.num_docs, cfg.split, 3)
    lengths = []
    for ds, docs in ((train, train_docs), (val, val_docs)):
        for i in range(len(ds)):
            s = ds[i]
            assert set(s) == set(KEYS) and all(v.dtype == np.int64 and v.shape == (SEQ,)
                                               for v in s.values())
            n = int(s["attention_mask"].sum())
            assert s["attention_mask"].tolist() == [1] * n + [0] * (SEQ - n)
            assert (s["tokens"][n:] == tok.pad_id).all() and (s["token_types"][n:] == 0).all()
            assert (s["labels"][n:] == IGNORE_INDEX).all()
            assert s["tokens"][0] == tok.cls_id and s["labels"][0] == IGNORE_INDEX
            seps = np.flatnonzero(s["tokens"] == tok.sep_id).tolist()
            assert seps[-1] == n - 1 and len(seps) in (1, 2) and seps[0] >= 2  # A non-empty
            assert (s["labels"][seps] == IGNORE_INDEX).all()
            first = seps[0]
            expect_types = [0] * (first + 1) + [1] * (n - first - 1) + [0] * (SEQ - n)
            assert s["token_types"].tolist() == expect_types
            original = np.where(s["labels"] == IGNORE_INDEX, s["tokens"], s["labels"])
            body = np.delete(original[1:n - 1], first - 1) if len(seps) == 2 else \
                original[1:n - 1]
            d = ds.document(i)
            assert d in docs
            doc = t.doc(d).astype(np.int64)[:content[d]]
            assert body.size <= SEQ - 3 and _contains(doc, body), (i, d)
            lengths.append(n)
    assert min(lengths) < SEQ - 10 and max(lengths) == SEQ  # short tails padded, full chunks
    assert not set(train_docs) & set(val_docs)


def _binomial_ok(count: int, trials: int, p: float) -> bool:
    """Within 5 standard deviations of Binomial(trials, p): fails by chance ~6e-7 per check."""
    return abs(count - trials * p) <= 5 * math.sqrt(trials * p * (1 - p))


def test_mlm_collation_statistics(mlm_sets) -> None:
    """15% of the candidates chosen; of those 80% [MASK], 10% random, 10% unchanged. Per sample
    the count is 15% rounded stochastically (variance <= 1/4, below a binomial's), so binomial
    bounds hold; samples with < 7 candidates are left out (their 'at least one' lifts them)."""
    _, train, _, tok = mlm_sets
    special = set(tok.special_ids())
    num_random_ids = tok.vocab_size - len(special)
    candidates = chosen = masked = randomised = unchanged = 0
    replaced: Dict[int, int] = {}
    for i in range(len(train)):
        s = train[i]
        picked = s["labels"] != IGNORE_INDEX
        original = np.where(picked, s["labels"], s["tokens"])
        cand = (s["attention_mask"] == 1) & ~np.isin(original, list(special))
        assert not (picked & ~cand).any()  # never a special token or padding
        assert picked.sum() >= 1
        if cand.sum() < 7:
            continue
        candidates += int(cand.sum())
        chosen += int(picked.sum())
        new, old = s["tokens"][picked], s["labels"][picked]
        masked += int((new == tok.mask_id).sum())
        unchanged += int((new == old).sum())
        other = new[(new != tok.mask_id) & (new != old)]
        randomised += other.size
        for x in other.tolist():
            assert x not in special
            replaced[x] = replaced.get(x, 0) + 1
    assert candidates > 100_000
    assert _binomial_ok(chosen, candidates, 0.15), chosen / candidates
    assert _binomial_ok(masked, chosen, 0.8), masked / chosen
    # a random replacement draws the original token again with probability 1/num_random_ids
    assert _binomial_ok(randomised, chosen, 0.1 * (1 - 1 / num_random_ids))
    assert _binomial_ok(unchanged, chosen, 0.1 + 0.1 / num_random_ids)
    assert len(replaced) > 0.8 * num_random_ids  # drawn from the whole non-special vocabulary


def _stack(ds, idx: List[int]) -> Dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([ds[i][k] for i in idx])) for k in KEYS}


def test_mlm_layout_independent_and_seeded(mlm_sets) -> None:
    """Sample i depends on (data, seed, i) only: every (dp, grad_accum, micro) split of a global
    batch of 8 sees the same samples as the plain index; rebuilding reproduces them, a shorter
    run is a prefix of a longer one, and another seed draws other samples."""
    cfg, train, val, tok = mlm_sets
    for step, start in ((0, None), (2, None), (1, 37)):
        base = step * 8 if start is None else start
        ref = _stack(train, list(range(base, base + 8)))
        for dp, micro, accum in ((1, 8, 1), (2, 2, 2), (4, 1, 2), (8, 1, 1), (1, 2, 4)):
            parts = [mlm_micro_batch(train, step, m, r, micro, accum, dp, start)
                     for r in range(dp) for m in range(accum)]  # dp rank-major, as the index
            for k in KEYS:
                got = torch.cat([p[k] for p in parts])
                assert got.dtype == torch.int64 and torch.equal(got, ref[k]), (dp, micro, k)
    for dp in (1, 2, 4):
        got = torch.cat([mlm_eval_batch(val, it, r, 8 // dp, dp)["tokens"]
                         for it in range(9) for r in range(dp)])
        idx = [j % len(val) for j in range(72)]  # wraps around the 64 validation samples
        assert torch.equal(got, _stack(val, idx)["tokens"])
    with pytest.raises(IndexError, match="build it for more steps"):
        mlm_micro_batch(train, 375, 0, 0, 8, 1, 1)
    again, _, _ = build_mlm_datasets(cfg, seed=3, num_train_samples=100, num_val_samples=0)
    other, _, _ = build_mlm_datasets(cfg, seed=4, num_train_samples=100, num_val_samples=0)
    same = [all(np.array_equal(again[i][k], train[i][k]) for k in KEYS) for i in range(100)]
    assert all(same)
    differ = [not np.array_equal(other[i]["tokens"], train[i]["tokens"]) for i in range(100)]
    assert sum(differ) > 90
    # a longer run is the same samples, then more: past one epoch of chunks, a chunk comes back
    # with another A/B split and other masks
    train_docs, _ = split_documents(train.tokens.num_docs, cfg.split, 3)
    longer = MLMSamples(train.tokens, train_docs, SEQ, 3, 2 * train.num_chunks, tok)
    assert all(np.array_equal(longer[i]["labels"], train[i]["labels"]) for i in range(0, 3000, 7))
    i, j = np.flatnonzero(longer.order == longer.order[0])
    assert longer.document(i) == longer.document(j) and j >= train.num_chunks
    assert not np.array_equal(longer[i]["tokens"], longer[j]["tokens"])


def test_glue_fixtures_load(tmp_path) -> None:
    """Every GLUE task's fields as the datasets library writes them; unlabeled -1 and bad lines
    refused in one line naming file, line and field."""
    expect = {"sst2": 4, "cola": 2, "mrpc": 3, "stsb": 3, "rte": 2, "wnli": 2, "qqp": 2,
              "qnli": 2, "mnli": 3}
    assert set(expect) == set(GLUE_FIELDS)
    for task, n in expect.items():
        path = os.path.join(FIXTURES, f"{task}.jsonl")
        ex = load_classification_jsonl(path, task=task)
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        a_field, b_field = GLUE_FIELDS[task]
        assert len(ex) == n and ex.text == [r[a_field] for r in rows]
        assert ex.text_pair == ([r[b_field] for r in rows] if b_field else None)
        assert ex.labels == [r["label"] for r in rows]
        assert ex.regression == (task == "stsb")
    assert load_classification_jsonl(os.path.join(FIXTURES, "mnli.jsonl"),
                                     task="mnli").num_labels == 3
    assert all(isinstance(x, float) for x in
               load_classification_jsonl(os.path.join(FIXTURES, "stsb.jsonl"), task="stsb").labels)
    test_split = os.path.join(FIXTURES, "sst2_test.jsonl")
    with pytest.raises(DataError, match=r"sst2_test\.jsonl:1: label is -1"):
        load_classification_jsonl(test_split, task="sst2")
    assert load_classification_jsonl(test_split, task="sst2", allow_unlabeled=True).labels == \
        [-1, -1]
    custom = tmp_path / "reviews.jsonl"
    custom.write_text('{"review": "good", "stars": 1}\n\n{"review": "bad", "stars": 0}\n')
    ex = load_classification_jsonl(str(custom), text_field="review", label_field="stars")
    assert (ex.text, ex.text_pair, ex.labels) == (["good", "bad"], None, [1, 0])
    bad_lines = {
        '{"sentence": "x", "label": 0}\n{"label": 1}\n': r"bad\.jsonl:2: no field 'sentence'",
        '{"sentence": "x", "label": "pos"}\n': r"bad\.jsonl:1: label is 'pos'; expected a class",
        '{"sentence": "x", "label": 0}\n{"sentence": \n': r"bad\.jsonl:2: not a JSON object",
        '[1, 2]\n': r"bad\.jsonl:1: not a JSON object but list",
        '{"sentence": 3, "label": 0}\n': r"bad\.jsonl:1: field 'sentence' is int",
        '\n': r"bad\.jsonl: no examples",
    }
    for text, message in bad_lines.items():
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(DataError, match=message) as e:
            load_classification_jsonl(str(tmp_path / "bad.jsonl"), task="sst2")
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="unknown task 'sst-2'"):
        load_classification_jsonl(test_split, task="sst-2")
    with pytest.raises(DataError, match="missing.jsonl: cannot read"):
        load_classification_jsonl(str(tmp_path / "missing.jsonl"))


def test_encode_pair_equals_hugging_face(tmp_path) -> None:
    """encode_pair = the tokenizer.json's own BERT encoding (post-processor, longest_first
    truncation, padding): tokens, segment ids and attention mask, for pairs and singles."""
    from tokenizers import Tokenizer

    path = str(tmp_path / "bert.json")
    _bert_tokenizer_json(path)
    ours, hf = load_tokenizer(path), Tokenizer.from_file(path)
    a_long = "the quick dog chases the red bird , hello world . " * 2
    cases = [("hello world", "a cat sat on the mat", 16), (a_long, "a cat sat", 16),
             ("a cat", a_long, 16), ("the red bird sat", "the red dog ran", 9),
             (a_long, a_long, 21), ("hello", None, 8), (a_long, None, 12),
             ("big house", "", 10)]
    for a, b, seq in cases:
        hf.enable_truncation(seq, strategy="longest_first")
        hf.enable_padding(length=seq, pad_id=0, pad_token="[PAD]")
        want = hf.encode(a, b) if b else hf.encode(a)
        got = encode_pair(ours, a, b, seq)
        assert got["tokens"].tolist() == want.ids, (a, b, seq)
        assert got["token_types"].tolist() == want.type_ids
        assert got["attention_mask"].tolist() == want.attention_mask
    assert truncate_pair(10, 2, 6) == (4, 2) and truncate_pair(5, 5, 7) == (3, 4)
    mrpc = load_classification_jsonl(os.path.join(FIXTURES, "mrpc.jsonl"), task="mrpc")
    batch = encode_examples(ours, mrpc, 24)
    assert batch["labels"].tolist() == [1, 0, 1] and batch["tokens"].shape == (3, 24)
    assert batch["tokens"][1].tolist() == encode_pair(ours, mrpc.text[1], mrpc.text_pair[1],
                                                      24)["tokens"].tolist()
    for encode in (lambda tok: encode_pair(tok, "a", "b", 8),  # checked once per file
                   lambda tok: encode_examples(tok, mrpc, 8)):
        with pytest.raises(DataError, match="BERT-style tokenizer"):
            encode(train_tokenizer("bytes", []))
