"""Built-in corpora that need no download, and ``ensure_dataset`` which prepares them on demand.

* ``stdlib``: this Python's standard-library sources under a byte budget, so runs on different
  machines with the same Python see the same text.
* ``synthetic``: a tiny corpus generated from a toy grammar with our own integer PRNG, so it is
  bit-identical on every machine and Python version (``random`` and numpy streams are not
  guaranteed to be) and simple enough that a tiny model's loss falls within a few dozen steps.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import sysconfig
from typing import Iterator, List

from ..config.schema import DataConfig
from .inputs import DataError
from .megatron import is_megatron
from .prepare import SUFFIXES, prepare, prepare_documents
from .tokenizer import parse_spec

SYNTHETIC_VERSION = 1
"""Bump whenever ``synthetic_texts`` changes, so stale caches are not reused."""
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
_M64 = (1 << 64) - 1


def stdlib_files(max_bytes: int) -> List[str]:
    """Standard-library ``.py`` files (no tests, idlelib or third-party packages), sorted by
    relative path, taking whole files until the next one would exceed ``max_bytes`` (at least
    one file, so a tiny budget still yields a corpus)."""
    root = sysconfig.get_paths()["stdlib"]
    rel: List[str] = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _EXCLUDED_DIRS)
        rel += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
    rel.sort(key=lambda p: p.replace(os.sep, "/"))
    out: List[str] = []
    total = 0
    for r in rel:
        path = os.path.join(root, r)
        size = os.path.getsize(path)
        if out and total + size > max_bytes:
            break
        out.append(path)
        total += size
    return out


class _SplitMix64:
    """SplitMix64 on Python ints: the same numbers on every platform and Python version."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _M64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def pick(self, seq: List[str]) -> str:
        return seq[self.below(len(seq))]


_NOUNS = ["cat", "dog", "bird", "fox", "child", "robot", "farmer", "teacher"]
_PLURALS = {"fox": "foxes", "child": "children"}
_ADJS = ["red", "small", "happy", "old", "quick", "lazy", "green", "tall"]
_VERBS = ["see", "like", "chase", "help", "follow", "find"]
_NAMES = ["x", "y", "total", "count", "value", "n"]


def _sentence(r: _SplitMix64) -> str:
    """Subject-verb agreement and a fixed word order: easy structure for a small model."""
    plural = r.below(2) == 1
    noun, verb = r.pick(_NOUNS), r.pick(_VERBS)
    subj = f"the {r.pick(_ADJS)} {_PLURALS.get(noun, noun + 's') if plural else noun}"
    verb = verb if plural else verb + "s"  # every verb in _VERBS takes a plain -s
    return f"{subj} {verb} the {r.pick(_ADJS)} {r.pick(_NOUNS)} ."


def _arithmetic(r: _SplitMix64) -> str:
    a, b = r.below(20), r.below(20)
    op = r.pick(["+", "-", "*"])
    c = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {c}"


def _python(r: _SplitMix64) -> str:
    k = r.below(4)
    name, a = r.pick(_NAMES), r.below(10)
    if k == 0:
        return f"def add_{a}({name}):\n    return {name} + {a}"
    if k == 1:
        return f"for i in range({a + 1}):\n    {name} += i"
    if k == 2:
        return f"{name} = {a}\nprint({name} * 2)  # {a * 2}"
    return f"if {name} > {a}:\n    {name} = {name} - 1"


def _counting(r: _SplitMix64) -> str:
    start, step = r.below(50), 1 + r.below(3)
    return "count: " + " ".join(str(start + i * step) for i in range(6))


_KINDS = [_sentence, _arithmetic, _python, _counting]


def synthetic_texts() -> List[str]:
    """1500 documents of ~100-600 characters; each document sticks mostly to one kind of line."""
    r = _SplitMix64(0x6D656761)  # "mega"
    docs: List[str] = []
    for _ in range(1500):
        main = _KINDS[r.below(len(_KINDS))]
        target = 170 + r.below(431)
        lines: List[str] = []
        size = 0
        while True:
            kind = main if r.below(5) else _KINDS[r.below(len(_KINDS))]
            line = kind(r)
            if size + len(line) + 1 > target:
                break
            lines.append(line)
            size += len(line) + 1
        docs.append("\n".join(lines) + "\n")
    return docs


def _is_complete(prefix: str) -> bool:
    return all(os.path.exists(prefix + s) for s in SUFFIXES)


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    """Exclusive inter-process lock so concurrent callers prepare a cache entry only once."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): prepare() is still atomic, only maybe duplicated
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _tokenizer_key(spec: str) -> str:
    kind, arg = parse_spec(spec)
    if kind == "bytes":
        return "bytes"
    if kind in ("bpe", "wordpiece"):
        return f"{kind}{arg}"
    with open(str(arg), "rb") as f:  # a file: key on its content, not its name
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(str(arg)))[:24]
    return f"{stem}-{digest}"


def _cached(prefix: str, build: "object") -> str:
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with _lock(prefix + ".lock"):
        if not _is_complete(prefix):
            build()  # type: ignore[operator]
    return prefix


def prepared_prefixes(cfg: DataConfig) -> List[str]:
    """data.paths, each checked to name a dataset: megalite's (PREFIX.meta.json, .bin,
    .idx.npy, .tokenizer.json) or Megatron's (PREFIX.bin + PREFIX.idx, as Megatron's
    --data-path names it)."""
    if not cfg.paths:
        raise DataError("data.source=prepared needs data.paths (dataset prefixes made by "
                        "`megalite prepare-data`, or Megatron .bin/.idx prefixes)")
    for p in cfg.paths:
        if is_megatron(p):
            continue
        if not os.path.exists(p + ".meta.json") and not os.path.exists(p + ".bin"):
            where = os.path.dirname(os.path.abspath(p))
            hint = "" if os.path.isdir(where) else f" (directory {where} does not exist)"
            raise DataError(f"data.paths: no dataset at prefix {p}: neither {p}.meta.json "
                            f"(megalite prepare-data) nor {p}.bin + {p}.idx (Megatron) "
                            f"exists{hint}; prepare it with `megalite prepare-data --input "
                            f"FILES --output {p}`")
        if not os.path.exists(p + ".meta.json"):
            raise DataError(f"data.paths: {p}.bin exists but neither {p}.idx (a Megatron "
                            f"dataset) nor {p}.meta.json (megalite prepare-data) does; the "
                            "dataset is incomplete, write it again")
        for s in SUFFIXES:
            if not os.path.exists(p + s):
                raise DataError(f"data.paths: {p + s} not found (prepare it with "
                                f"`megalite prepare-data --output {p}`)")
    return list(cfg.paths)


def ensure_dataset(cfg: DataConfig) -> List[str]:
    """Prefixes of the datasets to train on, preparing (and caching) built-in corpora."""
    if cfg.source == "prepared":
        return prepared_prefixes(cfg)
    if cfg.source == "stdlib":
        files = stdlib_files(cfg.stdlib_max_bytes)
        # builds of one Python version differ (Debian's 3.11.2 and pyenv's 3.11.7 pick 230 and
        # 233 files): key the cache on the files, so a changed Python never reuses a stale corpus
        root = sysconfig.get_paths()["stdlib"]
        listing = "\n".join(f"{os.path.relpath(p, root)}:{os.path.getsize(p)}" for p in files)
        digest = hashlib.sha256(listing.encode()).hexdigest()[:8]
        v = sys.version_info
        key = (f"py{v.major}.{v.minor}.{v.micro}-{cfg.stdlib_max_bytes}-"
               f"{_tokenizer_key(cfg.tokenizer)}-{digest}")
        prefix = os.path.join(cfg.cache_dir, f"stdlib-{key}")
        return [_cached(prefix, lambda: prepare(files, prefix, cfg.tokenizer, cfg.num_workers))]
    if cfg.source == "synthetic":
        # bytes, or a WordPiece for masked-LM (which needs BERT's special tokens)
        spec = cfg.tokenizer if parse_spec(cfg.tokenizer)[0] == "wordpiece" else "bytes"
        tag = "" if spec == "bytes" else "-" + _tokenizer_key(spec)
        prefix = os.path.join(cfg.cache_dir, f"synthetic-v{SYNTHETIC_VERSION}{tag}")
        # ~0.5 MB of text: tokenizing in-process is faster than starting workers.
        return [_cached(prefix, lambda: prepare_documents(synthetic_texts, prefix, spec, 1))]
    raise DataError(f"bad data.source {cfg.source!r}: expected 'stdlib', 'synthetic' or "
                     "'prepared'")
