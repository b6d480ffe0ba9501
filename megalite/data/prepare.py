"""Tokenize text files into a packed, memory-mappable dataset (``megalite prepare-data``).

Output of prefix P: ``P.bin`` (every document's tokens followed by eod), ``P.idx.npy`` (int64
document start offsets, num_docs+1 entries), ``P.tokenizer.json`` and ``P.meta.json``. The
corpus is streamed: documents are read lazily, tokenized in bounded chunks by a process pool and
appended to the .bin in input order, so memory stays flat however large the corpus. All files are
written under temporary names and renamed at the end, ``meta.json`` last, so a crash never leaves
something that looks like a complete dataset.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import multiprocessing.pool
import os
import sys
import time
import uuid
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .inputs import (INPUT_EXTS, DataError, check_inputs, iter_documents,  # noqa: F401
                     resolve_inputs)
from .tokenizer import Tokenizer, load_tokenizer, parse_spec, train_tokenizer

SUFFIXES = (".bin", ".idx.npy", ".tokenizer.json", ".meta.json")
"""Files of one prepared dataset; meta.json is written last and marks it complete."""
_CHUNK_DOCS = 256
_CHUNK_CHARS = 1 << 20


def _chunks(docs: Iterable[str]) -> Iterator[List[str]]:
    """Group documents so each task is big enough to amortise inter-process transfer."""
    chunk: List[str] = []
    chars = 0
    for d in docs:
        chunk.append(d)
        chars += len(d)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


_WORKER: Dict[str, object] = {}


def _init_worker(tok_path: str, dtype: str) -> None:
    # Each worker is already one of N processes; tokenizer threads would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"] = load_tokenizer(tok_path)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_chunk(texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    tok: Tokenizer = _WORKER["tok"]  # type: ignore[assignment]
    return tok.encode_docs(texts, _WORKER["dtype"])  # type: ignore[arg-type]


def _pool(num_workers: int, tok_path: str, dtype: str) -> "mp.pool.Pool":
    """fork where it is reliable: spawn/forkserver re-import ``__main__``, which hangs a script
    that calls ``prepare`` without an ``if __name__ == "__main__"`` guard. Workers only run numpy
    and the tokenizer, never torch, so the parent's threads are not needed in them."""
    if "fork" in mp.get_all_start_methods() and sys.platform != "darwin":
        # Rust tokenizers warns (and must disable its threads) when forked after using them;
        # say so explicitly in the children's environment, leave the parent's as it was.
        old = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            return mp.get_context("fork").Pool(num_workers, _init_worker, (tok_path, dtype))
        finally:
            if old is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = old
    return mp.get_context("spawn").Pool(num_workers, _init_worker, (tok_path, dtype))


def _encoded(docs: Iterable[str], tok_path: str, dtype: str,
             num_workers: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Encoded chunks in input order. At most 2*num_workers chunks are in flight, which is what
    keeps memory bounded (``Pool.imap`` would read the whole input ahead)."""
    if num_workers <= 1:
        _init_worker(tok_path, dtype)
        for chunk in _chunks(docs):
            yield _encode_chunk(chunk)
        return
    with _pool(num_workers, tok_path, dtype) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _chunks(docs):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare_documents(docs: Callable[[], Iterable[str]], output_prefix: str, tokenizer: str,
                      num_workers: int = 2) -> Dict[str, object]:
    """Core of ``prepare`` for any document source; ``docs`` is called once per pass (twice when
    a BPE has to be trained first) so nothing needs to be held in memory."""
    parse_spec(tokenizer)
    t0 = time.time()
    tok = train_tokenizer(tokenizer, docs())
    dtype = "uint16" if tok.vocab_size <= 65535 else "uint32"
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_files = {s: tmp + s for s in SUFFIXES}
    try:
        tok.save(tmp_files[".tokenizer.json"])
        lengths: List[np.ndarray] = []
        num_tokens = 0
        with open(tmp_files[".bin"], "wb") as f:
            for flat, lens in _encoded(docs(), tmp_files[".tokenizer.json"], dtype, num_workers):
                f.write(flat.tobytes())
                num_tokens += int(flat.size)
                lengths.append(lens)
        all_lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        if all_lens.size == 0:
            raise DataError("no documents found in the input (all files empty?)")
        idx = np.zeros(all_lens.size + 1, dtype=np.int64)
        np.cumsum(all_lens, out=idx[1:])
        assert int(idx[-1]) == num_tokens
        np.save(tmp_files[".idx.npy"], idx)
        meta = {"format": "megalite-indexed-v1", "dtype": dtype, "vocab_size": tok.vocab_size,
                "eod_id": tok.eod_id, "num_docs": int(all_lens.size), "num_tokens": num_tokens,
                "tokenizer": tokenizer}
        with open(tmp_files[".meta.json"], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        # Invalidate an older dataset first, then publish meta.json last: a reader never sees a
        # meta.json next to a mix of old and new files.
        if os.path.exists(output_prefix + ".meta.json"):
            os.remove(output_prefix + ".meta.json")
        for s in SUFFIXES:
            os.replace(tmp_files[s], output_prefix + s)
    finally:
        for p in tmp_files.values():
            if os.path.exists(p):
                os.remove(p)
    result: Dict[str, object] = dict(meta)
    result.update(prefix=output_prefix, bin_bytes=os.path.getsize(output_prefix + ".bin"),
                  seconds=time.time() - t0)
    return result


def prepare(inputs: List[str], output_prefix: str, tokenizer: str, num_workers: int = 2,
            text_key: str = "text") -> Dict[str, object]:
    """Tokenize the files named by ``inputs`` into the dataset ``output_prefix``; returns its
    meta plus ``files``, ``input_bytes``, ``bin_bytes`` and ``seconds``. Bad input (a missing
    file, a binary one, a bad jsonl line) raises ``DataError`` before any worker starts."""
    kind, _ = parse_spec(tokenizer)
    files = resolve_inputs(list(inputs))
    if not files:
        raise DataError(f"no input files matched {' '.join(map(str, inputs))!s} (directories "
                        f"are searched for {', '.join('*' + e for e in INPUT_EXTS)}, each "
                        "also as .gz or .zst)")
    if kind not in ("bpe", "wordpiece"):  # training reads every document here first anyway
        check_inputs(files, text_key)
    result = prepare_documents(lambda: iter_documents(files, text_key), output_prefix,
                               tokenizer, num_workers)
    result["files"] = len(files)
    result["input_bytes"] = sum(os.path.getsize(p) for p in files)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite prepare-data",
        description="Tokenize text files into a packed dataset (PREFIX.bin, PREFIX.idx.npy, "
        "PREFIX.tokenizer.json, PREFIX.meta.json) for data.source=prepared. A .jsonl file gives "
        "one document per line (its --text_key field); any other file is one document. Files "
        "ending in .gz or .zst (zstandard package) are decompressed; binary files are refused. "
        "Each document is followed by the end-of-document token.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILES|DIR|GLOB",
                   help="files, directories (searched recursively for "
                   f"{', '.join('*' + e for e in INPUT_EXTS)}, each also .gz/.zst) or glob "
                   "patterns")
    p.add_argument("--text_key", default="text", metavar="FIELD",
                   help="field of each .jsonl line that holds the document (default: text)")
    p.add_argument("--output", required=True, metavar="PREFIX",
                   help="output path prefix, e.g. data/mycorpus")
    p.add_argument("--tokenizer", default="bytes", metavar="SPEC",
                   help="'bytes' (UTF-8 bytes + eod, vocab 257), 'bpe:VOCAB' (byte-level BPE "
                   "trained on the inputs), 'wordpiece:VOCAB' (BERT-style WordPiece with [PAD] "
                   "[UNK] [CLS] [SEP] [MASK], trained on the inputs; [SEP] ends each document) "
                   "or the path of a Hugging Face tokenizer.json (default: bytes)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="tokenizer processes (default: 2; 1 tokenizes in this process)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry; returns the exit status (2 for bad input, with one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed by argparse)
        return int(e.code or 0)
    try:
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        r = prepare(args.input, args.output, args.tokenizer, args.workers, args.text_key)
    except (ValueError, OSError) as e:
        print(f"megalite prepare-data: error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {r['prefix']}: {r['files']} files, "
          f"{r['num_docs']} docs, {r['num_tokens']} tokens ({r['dtype']}, vocab "
          f"{r['vocab_size']}), {r['input_bytes']} input bytes -> {r['bin_bytes']} bytes, "
          f"{r['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
