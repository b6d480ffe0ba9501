"""A checkpoint directory's files: finding the one to resume (``latest``), meta.json, and the
checks every read goes through — sizes and CRC-32s against meta.json, ``weights_only``
unpickling. Any problem is a :class:`CheckpointError`: one line naming the file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import zlib
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import torch

STEP_NAME = re.compile(r"step_\d{8}")
TMP_NAME = re.compile(r"\.tmp_step_\d{8}")  # a save being written (checkpoint.save)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written (a missing, truncated, corrupted or unsafe file, a
    full disk): the CLI prints it as one ``error:`` line and exits 2. ``everyone``: every rank
    raises it (rank 0 alone says it); otherwise the rank that found it does."""

    def __init__(self, message: str, everyone: bool = True):
        super().__init__(message)
        self.everyone = everyone


# ---- finding the checkpoint to resume ---------------------------------------------------------


def step_dirs(ckpt_dir: str) -> List[str]:
    """Names of the ``step_*`` directories in ``ckpt_dir``, oldest step first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir) if STEP_NAME.fullmatch(d)
                  and os.path.isdir(os.path.join(ckpt_dir, d)))


def remove_stale_tmp(ckpt_dir: str, but: Optional[str] = None) -> List[str]:
    """Remove the ``.tmp_step_*`` directories a killed save left in ``ckpt_dir`` (never a
    ``step_*`` checkpoint; ``but``: the one being written now); their paths. Only rank 0 of the
    run that owns ``ckpt_dir`` calls this, at start-up and before each save — one save is in
    flight at a time, so any other is stale."""
    if not os.path.isdir(ckpt_dir):
        return []
    removed = []
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if TMP_NAME.fullmatch(name) and path != but and os.path.isdir(path) \
                and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def is_complete(path: str) -> bool:
    """meta.json parses and every file it lists is there with its recorded size."""
    try:
        check_sizes(path, read_meta(path))
        return True
    except (CheckpointError, OSError, KeyError, TypeError, AttributeError):
        return False


def _newest_complete(ckpt_dir: str) -> Optional[str]:
    for name in reversed(step_dirs(ckpt_dir)):
        if is_complete(os.path.join(ckpt_dir, name)):
            return os.path.join(ckpt_dir, name)
    return None


def latest(ckpt_dir: str, warn: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """Path of the checkpoint ``latest`` names; None when ``ckpt_dir`` holds no checkpoint.

    A ``latest`` naming a missing directory (or no ``latest`` beside step directories) falls
    back to the newest complete checkpoint, said through ``warn``; with none: CheckpointError —
    never a silent fresh start."""
    pointer = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(pointer):
        found = _newest_complete(ckpt_dir)
        if found and warn:
            warn(f"warning: {ckpt_dir} has no 'latest' pointer; using the newest complete "
                 f"checkpoint {found}")
        return found
    try:
        with open(pointer) as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {pointer} ({e}): remove it to resume from the "
                              "newest complete checkpoint") from None
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} holds {name[:60]!r}, not a step_NNNNNNNN name: "
                              "remove it to resume from the newest complete checkpoint")
    path = os.path.join(ckpt_dir, name)
    if os.path.isdir(path):
        return path
    found = _newest_complete(ckpt_dir)
    if found is None:
        raise CheckpointError(f"{pointer} names {name}, which does not exist, and {ckpt_dir} "
                              "holds no complete checkpoint: remove the pointer to start afresh, "
                              "or give this run its own --run.dir")
    if warn:
        warn(f"warning: {pointer} names {name}, which does not exist; resuming from the newest "
             f"complete checkpoint {found}")
    return found


def crc32_of(f: BinaryIO, crc: int = 0, count: int = -1) -> Tuple[int, int]:
    """(CRC-32 continued from ``crc``, bytes read) of the next ``count`` bytes of ``f`` (-1:
    to its end), read 4 MiB at a time."""
    done = 0
    while count < 0 or done < count:
        block = f.read(1 << 22 if count < 0 else min(1 << 22, count - done))
        if not block:
            break
        crc, done = zlib.crc32(block, crc), done + len(block)
    return crc, done


def file_record(path: str) -> Dict[str, int]:
    """What meta.json records of a file: its size and CRC-32."""
    with open(path, "rb") as f:
        crc, size = crc32_of(f)
    return {"bytes": size, "crc32": crc}


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomic(path: str, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part: written beside it,
    fsynced, renamed over it (the temporary file is removed if any step fails)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def place_checkpoint(ckpt_dir: str, tmp: str, final: str, meta: Dict[str, Any]) -> None:
    """The end of every checkpoint write, once ``tmp`` holds its other files fsynced: meta.json
    written into ``tmp`` (``write_atomic``: fsynced with the directory), ``tmp`` renamed to
    ``final`` (a ``final`` already there, the same step saved again, removed first), then
    ``latest`` pointed at it. A failure before the rename leaves ``latest`` as it was."""
    write_atomic(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(ckpt_dir)
    write_atomic(os.path.join(ckpt_dir, "latest"), os.path.basename(final))


# ---- reading ----------------------------------------------------------------------------------


def read_meta(path: str) -> Dict[str, Any]:
    file = os.path.join(path, "meta.json")
    try:
        with open(file) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {e}): the checkpoint "
                              "was cut or overwritten; resume from an earlier step_* directory "
                              "by rewriting 'latest', or use a new --run.dir") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} does not hold a JSON object: not a megalite checkpoint")
    return meta


def verify_file(path: str, name: str, meta: Dict[str, Any], everyone: bool = False) -> str:
    """The file's path once it exists and matches meta.json's recorded size and CRC-32
    (checkpoints saved before the manifest: existence only)."""
    record = meta.get("files", {}).get(name)
    file = _check_size(path, name, record, everyone)
    if record is None:
        return file
    if file_record(file)["crc32"] != record["crc32"]:
        raise CheckpointError(f"{file} fails its CRC-32 check against meta.json: the file is "
                              "corrupted; resume from an earlier checkpoint (rewrite 'latest') "
                              "or use a new --run.dir", everyone)
    return file


def load_file(path: str, name: str, meta: Dict[str, Any], everyone: bool = False) -> Any:
    """A verified file's contents, unpickled with ``weights_only=True``: tensors, numbers,
    strings and containers only — a pickled callable is refused, never run."""
    file = verify_file(path, name, meta, everyone)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's problem
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file} cannot be loaded safely ({reason}): it is not a "
                              "checkpoint shard megalite wrote (nothing in it was run); replace "
                              "it or use another checkpoint", everyone) from None


def is_sharded(meta: Dict[str, Any]) -> bool:
    return meta.get("format", 1) >= 2


def check_sizes(path: str, meta: Dict[str, Any]) -> None:
    """Every file meta.json lists is there at its recorded size (cheap: no bytes read)."""
    for name, record in sorted(meta.get("files", {}).items()):
        _check_size(path, name, record)


def _check_size(path: str, name: str, record: Optional[Dict[str, int]],
                everyone: bool = True) -> str:
    """The file's path once it is there at ``record``'s size (any size without a record)."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} is missing from the checkpoint", everyone)
    size = os.path.getsize(file)
    if record is not None and size != record["bytes"]:
        raise CheckpointError(f"{file} is {size} bytes, meta.json records {record['bytes']}: "
                              "the file was truncated or overwritten; resume from an earlier "
                              "checkpoint (rewrite 'latest') or use a new --run.dir", everyone)
    return file


def verify_all(path: str) -> Tuple[int, int]:
    """Every file of a checkpoint against meta.json (size and CRC-32: every byte) and DCP's
    ``.metadata`` through the safe unpickler; (files, bytes) checked."""
    meta = read_meta(path)
    files = meta.get("files")
    if not files:
        raise CheckpointError(f"{path}/meta.json records no checksums (a checkpoint saved "
                              "before megalite recorded them): nothing to verify against")
    for name in sorted(files):
        verify_file(path, name, meta, everyone=True)
    if is_sharded(meta):
        from megalite.checkpoint.storage import SafeReader, UnsafeCheckpoint

        try:
            SafeReader(path).read_metadata()
        except UnsafeCheckpoint as e:
            raise CheckpointError(str(e)) from None
    return len(files), sum(f["bytes"] for f in files.values())


# ---- the tokenizer a checkpoint was trained with ---------------------------------------------


def tokenizer_fingerprint(tokenizer_file: Optional[str], tokenizer) -> Dict[str, Any]:
    """What identifies a tokenizer in meta.json: its kind (``bytes`` or a ``tokenizer.json``),
    vocabulary size, end-of-document id and the SHA-256 of its file (None without one)."""
    digest = None
    if tokenizer_file and os.path.isfile(tokenizer_file):
        with open(tokenizer_file, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    kind = "bytes" if type(tokenizer).__name__ == "ByteTokenizer" else "tokenizer.json"
    return {"kind": kind, "vocab_size": int(tokenizer.vocab_size),
            "eod_id": int(tokenizer.eod_id), "sha256": digest}


def tokenizer_differences(saved: Optional[Dict[str, Any]], here: Dict[str, Any]) -> str:
    """``field=saved there, here here`` for each differing field ('' when the same tokenizer,
    or when the checkpoint records none: one saved before fingerprints)."""
    if not isinstance(saved, dict):
        return ""
    out = []
    for field in ("kind", "vocab_size", "eod_id", "sha256"):
        a, b = saved.get(field), here.get(field)
        if a != b:
            if field == "sha256":
                a, b = (str(v)[:12] if v else v for v in (a, b))
            out.append(f"tokenizer {field}={a} there, {b} here")
    return ", ".join(out)
