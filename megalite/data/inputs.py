"""Reading the text files ``prepare-data`` tokenizes: which files an input names, how each is
opened (plain, ``.gz``, ``.zst``), what a document is, and the checks made before any tokenizer
process starts.

Binary input is refused, not skipped: a file that is not text (an ELF, random bytes, an archive
named ``.txt``) in a training corpus is a mistake in the input list, and a tool that skipped it
with a warning would produce a dataset that silently lacks what the user thought was in it
(Megatron's ``preprocess_data.py`` and DeepSpeed's data tools also stop on undecodable input).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from typing import IO, Iterator, List, Tuple

INPUT_EXTS = (".py", ".txt", ".md", ".jsonl")
"""Extensions picked up when an input is a directory (each also compressed, e.g. .jsonl.zst)."""
COMPRESSED_EXTS = (".gz", ".zst")
"""Compressions read transparently; ``.zst`` needs the ``zstandard`` package (extra ``zstd``)."""
SNIFF_BYTES = 8192
"""Bytes looked at to tell text from binary (git's heuristic: a NUL byte means binary)."""
_MAX_BAD_UTF8 = 0.01  # fraction of undecodable characters beyond which a file is not text


class DataError(ValueError):
    """A user's data input is missing, unreadable or malformed; the message is one line that
    names the file (and line) and says how to fix it."""


def split_ext(path: str) -> Tuple[str, str]:
    """(content extension, compression) of ``path``: ``x.jsonl.gz`` -> (``.jsonl``, ``.gz``)."""
    name = path.lower()
    comp = next((c for c in COMPRESSED_EXTS if name.endswith(c)), "")
    return os.path.splitext(name[:len(name) - len(comp)])[1], comp


def _is_input(name: str) -> bool:
    return split_ext(name)[0] in INPUT_EXTS


def resolve_inputs(inputs: List[str]) -> List[str]:
    """Files named by ``inputs`` (files, directories searched recursively, or globs), each
    input's matches sorted, duplicates dropped, so the document order is reproducible. An input
    that matches nothing is an error: a typo must not silently drop part of the corpus."""
    out: List[str] = []
    seen = set()
    for inp in inputs:
        if os.path.isdir(inp):
            matches = [os.path.join(inp, p) for p in _walk(inp)]
        elif os.path.isfile(inp):
            matches = [inp]
        else:
            matches = []
            for g in sorted(glob.glob(inp, recursive=True)):
                matches += [os.path.join(g, p) for p in _walk(g)] if os.path.isdir(g) else [g]
            if not matches:
                raise DataError(f"--input {inp}: no such file or directory, and no file "
                                "matches it as a glob pattern")
        for m in matches:
            key = os.path.abspath(m)
            if key not in seen:
                seen.add(key)
                out.append(m)
    return out


def _walk(root: str) -> List[str]:
    """Relative paths of the corpus files below ``root``, sorted."""
    found = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        found += [os.path.relpath(os.path.join(d, f), root) for f in files if _is_input(f)]
    return sorted(found, key=lambda p: p.replace(os.sep, "/"))


def open_binary(path: str) -> IO[bytes]:
    """``path`` opened for reading, decompressed when it ends in .gz or .zst."""
    comp = split_ext(path)[1]
    if comp == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst files needs the zstandard package; install "
                            "it with `pip install 'megalite[zstd]'` (or pip install "
                            "zstandard), or decompress the file first") from None
        fh = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True,
                                                            closefd=True)
        return io.BufferedReader(reader)  # type: ignore[arg-type]
    if comp == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_errors() -> Tuple[type, ...]:
    errors: Tuple[type, ...] = (OSError, EOFError, gzip.BadGzipFile)
    try:
        import zstandard
        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def sniff_binary(path: str, head: bytes) -> None:
    """Refuse ``path`` if its first bytes (decompressed) are not text."""
    why = ""
    nul = head.find(b"\0")
    if nul >= 0:
        why = f"a NUL byte at offset {nul}"
    else:
        text = head.decode("utf-8", errors="replace")
        # a multi-byte character cut at the end of the sample is not an error
        bad = text.rstrip("\ufffd").count("\ufffd") if len(head) == SNIFF_BYTES else \
            text.count("\ufffd")
        if bad > _MAX_BAD_UTF8 * max(len(text), 1):
            why = f"{bad} of its first {len(head)} bytes are not UTF-8"
    if why:
        raise DataError(f"{path}: not a UTF-8 text file ({why}); remove it from --input "
                        "(binary files, and compressed ones other than .gz/.zst, are not read)")


def _jsonl_text(path: str, n: int, line: str, text_key: str) -> str:
    try:
        text = json.loads(line)[text_key]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise DataError(f"{path}:{n}: expected a JSON object with a string {text_key!r} field "
                        f"({type(e).__name__}: {e}); pick the field with --text_key") from None
    if not isinstance(text, str):
        raise DataError(f"{path}:{n}: field {text_key!r} is a {type(text).__name__}, not a "
                        "string; pick the text field with --text_key")
    return text


def _file_documents(path: str, text_key: str) -> Iterator[str]:
    with open_binary(path) as raw:
        if split_ext(path)[0] == ".jsonl":  # binary input fails its first line's JSON parse
            lines = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
            for n, line in enumerate(lines, 1):
                if line.strip():
                    text = _jsonl_text(path, n, line, text_key)
                    if text:
                        yield text
            return
        data = raw.read()
    sniff_binary(path, data[:SNIFF_BYTES])
    text = data.decode("utf-8", errors="replace")
    if text:
        yield text


def iter_documents(files: List[str], text_key: str = "text") -> Iterator[str]:
    """One document per ``.jsonl`` line (its ``text_key`` field), else one per file; empty
    documents skipped. Files ending in .gz/.zst are decompressed first."""
    errors = _read_errors()
    for path in files:
        try:
            yield from _file_documents(path, text_key)
        except errors as e:  # unreadable, truncated or corrupt (compressed) file
            raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None


def check_inputs(files: List[str], text_key: str = "text") -> None:
    """Everything ``iter_documents`` would refuse, found in one streaming pass in this process
    (no tokenizer, no worker): a bad line at the end of a large file fails in seconds, before
    any worker starts and before an output file is created."""
    for _ in iter_documents(files, text_key):
        pass
