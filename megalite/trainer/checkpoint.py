"""Atomic, layout-free checkpoints: written into a temporary directory, fsynced, renamed into
place, then the ``latest`` pointer is replaced — a crash at any moment leaves the previous
checkpoint intact.

Layout of ``CKPT_DIR/step_00000100/`` (format 2):
- ``.metadata``, ``__{rank}_0.distcp``: a ``torch.distributed.checkpoint`` of the fp32 master
  weights and AdamW moments (keys ``master/NAME``, ``exp_avg/NAME``, ``exp_avg_sq/NAME``, NAME
  the single-process model's parameter name, global shapes without vocabulary padding). Each
  rank writes the boxes it owns (``zero/state.py``), replicated ones once; each rank reads back
  the boxes its own layout needs, whatever layout wrote them (``megalite/checkpoint``).
- ``meta.json``: the manifest — step, optimizer step, consumed samples, loss scaler, resolved
  config and model, layout, the run's id (``checkpoint.keep`` prunes only its own run's
  checkpoints), the tokenizer's fingerprint (kind, vocabulary size, end-of-document id,
  SHA-256 of its file: resuming or ``init_from`` with another is refused), ``files`` (size
  and CRC-32 of each file), ``blocks`` (per stored tensor item: where its raw bytes start and
  a CRC-32 per block of them — a rank reads and checks only the blocks its boxes need) and
  ``items`` (the CRC-32 of each item without a block record, read and checked whole;
  checkpoints saved before block records hold every item's). No pickled item exists in the DCP
  state.
- ``tokenizer.json``: the tokenizer, so generate/eval need nothing else.

Format 1 (before DCP: ``model_tp{t}_pp{p}.pt`` / ``optim_tp{t}_pp{p}_dp{d}.pt`` torch.save
shards) still loads at its own tp, pp and ZeRO sharding; its next save is format 2.

Loading never executes code: ``.metadata`` through an unpickler admitting only DCP's metadata
classes, tensors and format-1 shards with ``torch.load(weights_only=True)``, each after its size
and CRC are checked against meta.json. Every problem with a checkpoint's files is a
:class:`CheckpointError`: one line naming the file.
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from megalite.checkpoint.files import (STEP_NAME, CheckpointError, check_sizes,  # noqa: F401
                                       is_complete, is_sharded, latest, load_file, read_meta,
                                       remove_stale_tmp, step_dirs, tokenizer_differences,
                                       tokenizer_fingerprint, verify_all, verify_file)
from megalite.checkpoint.files import fsync_file, place_checkpoint
from megalite.models.transformer import TIED_WEIGHTS
from megalite.parallel import comm
from megalite.parallel.dims import ParallelDims

FORMAT = 2  # 1: per-layout torch.save shards (still loaded at the same tp and pp); 2: DCP


def step_dir(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"step_{step:08d}")


def shard_name(dims: ParallelDims) -> str:
    return f"model_tp{dims.tp_rank:02d}_pp{dims.pp_rank:02d}.pt"


def dp_shard_name(dims: ParallelDims) -> str:
    return f"optim_tp{dims.tp_rank:02d}_pp{dims.pp_rank:02d}_dp{dims.dp_rank:02d}.pt"


# ---- writing ----------------------------------------------------------------------------------
def _gather_to_0(obj: Any, group=None) -> Optional[List[Any]]:
    """Every rank's ``obj`` on global rank 0 (the one that writes meta.json), None elsewhere:
    a non-writer never holds the others' records."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    rank = dist.get_rank()
    out: Optional[List[Any]] = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)  # dst: a global rank
    return out


def _from_0(obj: Any, group=None) -> Any:
    """Global rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _write_failure(e: OSError, where: str) -> str:
    if e.errno == errno.ENOSPC:
        return f"no space left on device writing {where}"
    return f"cannot write {where} ({e.strerror or e})"


def save(ckpt_dir: str, step: int, dims: ParallelDims, entries: Dict[str, Any],
         meta: Dict[str, Any], tokenizer_file: Optional[str] = None, keep: int = 0,
         group=None) -> str:
    """Collective over ``group`` (default: every rank's world group): every rank writes the
    boxes it owns of ``entries`` ({key: ShardEntry}) with torch.distributed.checkpoint and
    sends its files' and items' CRCs to rank 0, which adds meta.json (``meta`` plus the step,
    the layout and those CRCs), the tokenizer, renames the directory into place and points
    ``latest`` at it. A failed write on any rank (a full disk) removes the temporary directory
    on every rank's word and raises CheckpointError; the previous checkpoint is untouched."""
    from megalite.checkpoint.sharded import save_entries

    final = step_dir(ckpt_dir, step)
    tmp = os.path.join(ckpt_dir, f".tmp_step_{step:08d}")
    if dims.rank == 0:
        remove_stale_tmp(ckpt_dir)  # a killed save's, this step's too
        os.makedirs(tmp)
    group = group if group is not None else dims.world_group
    comm.barrier(group)
    files: Dict[str, Dict[str, int]] = {}
    items: Dict[str, int] = {}
    blocks: Dict[str, list] = {}
    failure = None
    try:
        files, items, blocks = save_entries(tmp, entries, group, dims.rank)
    except OSError as e:
        failure = _write_failure(e, tmp)
    except BaseException as e:  # DCP wraps every rank's failure in a CheckpointException
        cause = _os_error(_dcp_failure(e))
        if cause is None:
            raise
        failure = _write_failure(cause, tmp)
    gathered = _gather_to_0((files, items, blocks, failure), group)
    if dims.rank == 0:
        failure = next((f for *_, f in gathered if f), None)
    if failure is None and dims.rank == 0:
        try:
            for rank_files, rank_items, rank_blocks, _ in gathered:
                files.update(rank_files)
                items.update(rank_items)
                blocks.update(rank_blocks)
            layout = dict(meta.pop("layout", {}), dp=dims.dp, tp=dims.tp, pp=dims.pp)
            _finish(ckpt_dir, tmp, final, dict(meta, format=FORMAT, step=step, layout=layout,
                                               files=files, items=items, blocks=blocks),
                    tokenizer_file, keep)
        except OSError as e:
            failure = _write_failure(e, tmp)
    failure = _from_0(failure, group)  # rank 0's word: any rank's failure, or its own
    if failure:
        if dims.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        comm.barrier(group)
        previous = latest(ckpt_dir)
        raise CheckpointError(f"checkpoint at step {step}: {failure}; removed the temporary "
                              f"directory, the previous checkpoint ({previous or 'none'}) is "
                              "intact: free space or point --checkpoint.dir at another disk")
    return final


def _os_error(e: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind ``e`` (torch's zip writer turns a failed write into a RuntimeError,
    "unexpected pos", raised while the OSError is handled), or None."""
    for _ in range(8):
        if e is None or isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _dcp_failure(e: BaseException) -> Optional[BaseException]:
    """The first rank's original exception inside DCP's CheckpointException, else None."""
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict):
        return None
    for value in failures.values():
        exc = value[0] if isinstance(value, tuple) else value
        if isinstance(exc, BaseException):
            return exc
    return None


def _finish(ckpt_dir: str, tmp: str, final: str, meta: Dict[str, Any],
            tokenizer_file: Optional[str], keep: int) -> None:
    """Rank 0: meta.json, the tokenizer, fsync, rename into place, then ``latest``, then prune."""
    if tokenizer_file:
        shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
        fsync_file(os.path.join(tmp, "tokenizer.json"))
    place_checkpoint(ckpt_dir, tmp, final, meta)  # a final there: a rewound resume's step
    _prune(ckpt_dir, keep, meta.get("run_id"), final)


def _prune(ckpt_dir: str, keep: int, run_id: Optional[str], protect: str) -> None:
    """Keep the ``keep`` newest checkpoints written by this run (``run_id``); checkpoints of
    other runs (and those saved before run ids existed) are never removed."""
    if keep <= 0 or run_id is None:
        return
    ours = []
    for name in step_dirs(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        try:
            if read_meta(path).get("run_id") == run_id:
                ours.append(path)
        except CheckpointError:
            continue
    for path in ours[:-keep]:
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)


def format1_problem(path: str, meta: Dict[str, Any], tp: int, pp: int,
                    zero: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why this run (``tp``, ``pp``, its ZeRO sharding ``zero`` when known) cannot resume the
    per-layout (format 1) checkpoint at ``path``, or None. Its weights convert to any layout
    (``interop/full_state.py`` merges the tp x pp shards: what ``checkpoint.init_from`` reads);
    its optimizer state is flat shards of that layout's ZeRO buckets, which do not."""
    fresh = (f"--checkpoint.init_from={path} and a new --run.dir (its weights at any layout, a "
             "fresh optimizer)")
    if meta.get("weights_only"):
        return (f"checkpoint.resume: {path} holds model weights only (as `megalite convert "
                f"--from hf` writes them), no optimizer state to resume: start from it with "
                f"{fresh}")
    layout = meta.get("layout", {})
    saved_tp, saved_pp = layout.get("tp", tp), layout.get("pp", pp)
    if (saved_tp, saved_pp) != (tp, pp):
        return (f"checkpoint.resume: {path} is in megalite's per-layout format (before DCP), "
                f"saved at tp={saved_tp} pp={saved_pp}; this run is tp={tp} pp={pp}: resume it "
                "once at its own layout (its next checkpoint resumes at any layout), or use "
                + fresh)
    if zero is not None and meta.get("zero") != zero:
        return (f"checkpoint.resume: {path} is in megalite's per-layout format (before DCP), "
                f"its optimizer state sharded as {meta.get('zero')}, this run's as {zero}: "
                "resume it once with its parallel.dp (ZeRO >= 1), parallel.bucket_mb and "
                "train.grad_dtype (its next checkpoint resumes at any layout), or use " + fresh)
    return None


def check_layout(path: str, meta: Dict[str, Any], dims: ParallelDims) -> None:
    problem = format1_problem(path, dict(meta, weights_only=False), dims.tp, dims.pp)
    if problem:
        raise CheckpointError(problem)


def load_shard(path: str, dims: ParallelDims, meta: Optional[Dict[str, Any]] = None
               ) -> Dict[str, Any]:
    """This rank's shard of a format-1 checkpoint saved with the same layout."""
    meta = read_meta(path) if meta is None else meta
    check_layout(path, meta, dims)
    return load_file(path, shard_name(dims), meta)


def load_dp_shard(path: str, dims: ParallelDims, meta: Optional[Dict[str, Any]] = None
                  ) -> Dict[str, Any]:
    """This rank's own optimizer shard (ZeRO stage >= 1) of a format-1 checkpoint."""
    meta = read_meta(path) if meta is None else meta
    return load_file(path, dp_shard_name(dims), meta)


# ---- the layout-free format (2) -----------------------------------------------------------------
KINDS = ("master", "exp_avg", "exp_avg_sq")
TIED_SOURCE = TIED_WEIGHTS[0]  # what a last stage's tied copy is a copy of


def state_entries(table, opt_state: Dict[str, Any], kinds=KINDS) -> Dict[str, Any]:
    """{"kind/name": ShardEntry} of ``ShardedAdamW.state_dict()``: the fp32 masters (the
    parameters are their cast) and AdamW moments, keyed by the single-process model's names (a
    tied copy by the embedding it copies)."""
    out = {}
    for kind in kinds:
        for name, entry in opt_state[kind].items():
            key = TIED_SOURCE if table.info(name).tied_copy else name
            out[f"{kind}/{key}"] = entry
    return out


def read_sharded_metadata(path: str, meta: Dict[str, Any]) -> Any:
    """A format-2 checkpoint's DCP ``Metadata``, read once every file's size and the CRC of
    ``.metadata`` are checked: pass it to ``load_sharded`` to load several times without
    checking and unpickling it again (an export reads one parameter at a time)."""
    from megalite.checkpoint.storage import SafeReader, UnsafeCheckpoint

    check_sizes(path, meta)
    verify_file(path, ".metadata", meta, everyone=True)
    try:
        return SafeReader(path).read_metadata()
    except UnsafeCheckpoint as e:
        raise CheckpointError(f"{e}; {_NOTHING_RUN}") from None


_NOTHING_RUN = "nothing in it was run: replace the file or use another checkpoint"


def load_sharded(path: str, meta: Dict[str, Any], entries: Dict[str, Any], group=None,
                 metadata: Any = None) -> int:
    """Fill ``entries`` (this rank's boxes, any layout) from a format-2 checkpoint; collective
    over ``group``. Every file's size and each item read's CRC are checked first (the sizes
    and ``.metadata`` by ``read_sharded_metadata``, here or where ``metadata`` came from); the
    bytes read are returned."""
    from megalite.checkpoint.planners import StateMismatch
    from megalite.checkpoint.sharded import load_entries
    from megalite.checkpoint.storage import UnsafeCheckpoint

    if metadata is None:
        metadata = read_sharded_metadata(path, meta)
    try:
        return load_entries(path, entries, meta.get("items"), group, meta.get("blocks"),
                            metadata)
    except BaseException as e:  # DCP wraps each rank's failure in a CheckpointException
        cause = e if isinstance(e, (UnsafeCheckpoint, StateMismatch)) else _dcp_failure(e)
        if isinstance(cause, StateMismatch):
            raise CheckpointError(f"checkpoint {path}: {cause}: it holds another model; use "
                                  "its model settings") from None
        if isinstance(cause, (UnsafeCheckpoint, OSError)):
            raise CheckpointError(f"{cause}; {_NOTHING_RUN}") from None  # DCP tells every rank
        raise

