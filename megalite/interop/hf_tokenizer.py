"""Tokenizers across the HF boundary: a megalite checkpoint's tokenizer as the
``tokenizer.json`` + ``tokenizer_config.json`` that ``AutoTokenizer`` loads (encoding exactly as
megalite does), and an HF directory's tokenizer files kept on import (chat template, special
tokens). Plain JSON throughout: nothing here runs code from a file."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional

EOD_TOKEN = "<|endoftext|>"
"""The bytes tokenizer's id 256 in HF files (megalite's BPE tokenizers use the same name)."""
KEPT_ON_IMPORT = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
"""HF files copied into a checkpoint on import and written back on export unchanged."""


def bytes_tokenizer() -> Any:
    """An HF ``tokenizers.Tokenizer`` equal to megalite's ``bytes`` tokenizer: ids 0-255 are
    the UTF-8 bytes, 256 is ``<|endoftext|>``. Byte-level BPE without merges over a vocabulary
    where the ByteLevel character of byte b has id b."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    # ByteLevel.alphabet() is a set; the byte->char table is GPT-2's bytes_to_unicode()
    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOD_TOKEN])
    assert len(ByteLevel.alphabet()) == 256 and tok.token_to_id(EOD_TOKEN) == 256
    return tok


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the ByteLevel pre-tokenizer's)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_hf_tokenizer(tokenizer_file: Optional[str], out: str, max_seq_len: int,
                       kept_dir: Optional[str] = None) -> Optional[int]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` into ``out`` from a megalite
    tokenizer file; the files an import kept (``kept_dir``) win over the generated config.
    Returns the end-of-document id (None without a tokenizer)."""
    from megalite.data import load_tokenizer
    from megalite.data.tokenizer import ByteTokenizer

    if tokenizer_file is None:
        return None
    ours = load_tokenizer(tokenizer_file)
    if isinstance(ours, ByteTokenizer):
        bytes_tokenizer().save(os.path.join(out, "tokenizer.json"))
        eod_token = EOD_TOKEN
    else:
        shutil.copyfile(tokenizer_file, os.path.join(out, "tokenizer.json"))
        eod_token = ours._tok.id_to_token(ours.eod_id)
    config: Dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
        "bos_token": eod_token, "eos_token": eod_token, "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False}
    if isinstance(ours, ByteTokenizer):  # megalite reads "<|endoftext|>" in text as 13 bytes
        config["split_special_tokens"] = True
    if getattr(ours, "mask_id", None) is not None:  # a BERT (WordPiece) tokenizer
        name = ours._tok.id_to_token
        config.update({"pad_token": name(ours.pad_id), "cls_token": name(ours.cls_id),
                       "sep_token": name(ours.sep_id), "mask_token": name(ours.mask_id),
                       "bos_token": None, "eos_token": None,
                       "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]})
    kept = os.path.join(kept_dir, "tokenizer_config.json") if kept_dir else None
    if kept and os.path.isfile(kept):
        with open(kept) as f:
            config = json.load(f)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    special = os.path.join(kept_dir, "special_tokens_map.json") if kept_dir else None
    if special and os.path.isfile(special):
        shutil.copyfile(special, os.path.join(out, "special_tokens_map.json"))
    return ours.eod_id


def kept_hf_files(hf_dir: str) -> Dict[str, str]:
    """name -> path of the tokenizer and the files kept with it (``KEPT_ON_IMPORT``) that an
    HF directory holds: what an import copies into the checkpoint."""
    return {name: os.path.join(hf_dir, name) for name in ("tokenizer.json", *KEPT_ON_IMPORT)
            if os.path.isfile(os.path.join(hf_dir, name))}
