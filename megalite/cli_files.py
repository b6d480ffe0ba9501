"""``megalite convert`` and ``megalite checkpoint``: commands on checkpoint files (one
``error:`` line and exit 2 for a bad input, never a traceback)."""
from __future__ import annotations

import argparse
import sys
from typing import List


def convert_main(argv: List[str]) -> int:
    """``megalite convert --to hf CKPT OUT`` / ``--from hf HF_DIR CKPT``: one ``error:`` line
    and exit 2 for a bad input, never a traceback."""
    p = argparse.ArgumentParser(
        prog="megalite convert", description="Convert between megalite checkpoints and Hugging "
        "Face model directories. Nothing read is executed: weights are safetensors or "
        "weights-only torch files, configs are JSON.")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["hf"], help="export CKPT (a checkpoint, checkpoints or "
                     "run directory, any tp x pp layout) to the HF directory OUT")
    way.add_argument("--from", dest="source", choices=["hf"], help="import the HF directory "
                     "HF_DIR into a new megalite checkpoint directory CKPT (weights only)")
    p.add_argument("src", help="CKPT (--to hf) or HF_DIR (--from hf)")
    p.add_argument("dst", help="OUT (--to hf) or CKPT (--from hf)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="--to hf: dtype of the exported weights")
    p.add_argument("--max_shard_mb", type=float, default=2000.0,
                   help="--to hf: largest safetensors file in MiB (one shard is in memory)")
    a = p.parse_args(argv)
    from megalite.interop.full_state import CheckpointReadError

    try:
        if a.to:
            from megalite.interop.hf_files import export_hf

            if a.max_shard_mb <= 0:
                raise ValueError(f"--max_shard_mb={a.max_shard_mb}: must be positive")
            print(f"wrote {export_hf(a.src, a.dst, a.dtype, a.max_shard_mb)}")
        else:
            from megalite.interop.full_state import save_full_model_state
            from megalite.interop.hf_files import read_hf_dir

            args, state, files = read_hf_dir(a.src)
            tokenizer = files.pop("tokenizer.json", None)
            print(f"wrote {save_full_model_state(a.dst, args, state, tokenizer, files)}")
    except (CheckpointReadError, ValueError, ImportError, OSError) as e:
        lines = str(e).strip().splitlines()
        print(f"error: {lines[0] if lines else repr(e)}", file=sys.stderr)
        return 2
    return 0


def checkpoint_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="megalite checkpoint",
                                description="Check every byte of a checkpoint against the sizes "
                                            "and CRC-32s its meta.json records; exit 2 naming "
                                            "the first bad file.")
    sub = p.add_subparsers(dest="action", required=True)
    verify = sub.add_parser("verify", help="check a checkpoint's files")
    verify.add_argument("dir", help="a checkpoint directory, a checkpoints directory (its latest) "
                                    "or a run directory")
    a = p.parse_args(argv)
    from megalite.trainer import checkpoint
    from megalite.trainer.inference import resolve_checkpoint

    try:
        path = resolve_checkpoint(a.dir)
        files, size = checkpoint.verify_all(path)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ok: {path}: {files} files, {size:,} bytes match meta.json")
    return 0
