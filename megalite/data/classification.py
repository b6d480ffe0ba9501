"""Sentence and sentence-pair classification data in JSON lines, for fine-tuning an encoder.

One example per line: the text (and for a pair task the second text) and an integer label, as
the Hugging Face ``datasets`` library writes a GLUE split (``load_dataset("glue", "mrpc")
["train"].to_json("mrpc.jsonl")``: ``{"sentence1": ..., "sentence2": ..., "label": 1, "idx":
0}``). ``GLUE_FIELDS`` names the text fields of each GLUE task; explicit field names override
it. GLUE's test splits carry label -1 (unlabeled), which training refuses. A bad line is one
``DataError`` naming the file, the line and the field, never a traceback.

``encode_pair`` lays out an example as the masked-LM samples are (``[CLS] A [SEP] B [SEP]``,
segment ids, padding; ``mlm.pack_pair``), truncating the longer text first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .inputs import DataError
from .mlm import pack_pair
from .tokenizer import Tokenizer

GLUE_FIELDS: Dict[str, Tuple[str, Optional[str]]] = {
    "cola": ("sentence", None),
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "qnli": ("question", "sentence"),
    "mnli": ("premise", "hypothesis"),
}
"""(text field, text pair field) of each GLUE task as ``datasets`` writes it; the label is
``label`` in every task."""
REGRESSION_TASKS = ("stsb",)
"""GLUE tasks whose label is a real number (a similarity score 0-5), not a class id."""
UNLABELED = -1
"""The label of GLUE's test examples, whose labels are not published."""


@dataclass
class ClassificationExamples:
    """The examples of one file: ``text[i]`` (and ``text_pair[i]``) with ``labels[i]``."""
    path: str
    text: List[str]
    text_pair: Optional[List[str]]
    labels: List[Union[int, float]]
    regression: bool

    def __len__(self) -> int:
        return len(self.text)

    @property
    def num_labels(self) -> int:
        """Classes seen in this file (largest class id + 1); 1 for a regression task."""
        return 1 if self.regression else int(max(self.labels)) + 1


def _fields(task: Optional[str], text_field: Optional[str], text_pair_field: Optional[str],
            label_field: Optional[str]) -> Tuple[str, Optional[str], str]:
    if task is not None:
        if task not in GLUE_FIELDS:
            raise DataError(f"unknown task {task!r}: the built-in field maps are for the GLUE "
                            f"tasks {', '.join(GLUE_FIELDS)}; for another file leave the task "
                            "out and name --text_field (and --text_pair_field, --label_field)")
        glue_text, glue_pair = GLUE_FIELDS[task]
        text_field = text_field or glue_text
        text_pair_field = text_pair_field or glue_pair
    return text_field or "text", text_pair_field, label_field or "label"


def _label(value: object, regression: bool, where: str, label_field: str,
           allow_unlabeled: bool) -> Union[int, float]:
    if value == UNLABELED and not isinstance(value, bool) and not allow_unlabeled:
        raise DataError(f"{where}: {label_field} is -1, an unlabeled example (GLUE's test "
                        "splits have no labels); train and evaluate on the train/validation "
                        "splits")
    if regression:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                np.isfinite(value):
            return float(value)
        raise DataError(f"{where}: {label_field} is {value!r}; a regression task needs a number")
    if isinstance(value, int) and not isinstance(value, bool) and \
            (value >= 0 or value == UNLABELED):
        return int(value)
    raise DataError(f"{where}: {label_field} is {value!r}; expected a class id 0, 1, ... "
                    "(an integer), as the datasets library writes GLUE labels")


def load_classification_jsonl(path: str, text_field: Optional[str] = None,
                              text_pair_field: Optional[str] = None,
                              label_field: Optional[str] = None, task: Optional[str] = None,
                              allow_unlabeled: bool = False) -> ClassificationExamples:
    """The examples of the JSON-lines file ``path``. Fields default to ``task``'s GLUE fields,
    else ``text`` / no pair / ``label``. Blank lines are skipped; a line that is not a JSON
    object, lacks a field or has a bad label raises ``DataError`` naming file, line and field.
    Label -1 (unlabeled) is refused unless ``allow_unlabeled`` (prediction only)."""
    text_field, text_pair_field, label_field = _fields(task, text_field, text_pair_field,
                                                       label_field)
    regression = task in REGRESSION_TASKS
    wanted = [text_field] + ([text_pair_field] if text_pair_field else []) + [label_field]
    text: List[str] = []
    pair: List[str] = []
    labels: List[Union[int, float]] = []
    try:
        f = open(path, "r", encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror})") from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{where}: not a JSON object ({e})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: not a JSON object but {type(row).__name__}")
                for name in wanted:
                    if name not in row:
                        raise DataError(f"{where}: no field {name!r} (the line has "
                                        f"{', '.join(map(repr, row)) or 'none'}); name the "
                                        "right one with --text_field/--text_pair_field/"
                                        "--label_field or --task")
                for name in wanted[:-1]:
                    if not isinstance(row[name], str):
                        raise DataError(f"{where}: field {name!r} is "
                                        f"{type(row[name]).__name__}, not text")
                text.append(row[text_field])
                if text_pair_field:
                    pair.append(row[text_pair_field])
                labels.append(_label(row[label_field], regression, where, label_field,
                                     allow_unlabeled))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise DataError(f"{path}: no examples (the file is empty)")
    return ClassificationExamples(path, text, pair if text_pair_field else None, labels,
                                  regression)


def truncate_pair(len_a: int, len_b: int, budget: int) -> Tuple[int, int]:
    """Lengths kept of two texts that must fit ``budget`` tokens together, the longer cut
    first (the shorter kept whole when it fits in half; otherwise half each, B keeping the
    odd token on a tie) — the lengths Hugging Face's ``longest_first`` truncation keeps."""
    if len_a + len_b <= budget:
        return len_a, len_b
    short = min(len_a, len_b)
    if 2 * short <= budget:
        return (len_a, budget - len_a) if len_a == short else (budget - len_b, len_b)
    small, large = budget // 2, budget - budget // 2
    return (large, small) if len_a > len_b else (small, large)


def check_encoder(tokenizer: Tokenizer, seq_len: int) -> None:
    """Refuse a tokenizer without [PAD] [CLS] [SEP] (``DataError``) or a ``seq_len`` too short
    for ``[CLS] A [SEP] B [SEP]``: what ``encode_pair`` needs, checked once per file."""
    missing = [n for n in ("pad_id", "cls_id", "sep_id") if getattr(tokenizer, n) is None]
    if missing:
        raise DataError(f"the tokenizer has no {', '.join(m[:-3].upper() for m in missing)} "
                        "token; classification needs a BERT-style tokenizer ([PAD] [CLS] "
                        "[SEP]): wordpiece:VOCAB or a BERT tokenizer.json")
    if seq_len < 4:
        raise ValueError(f"seq_len={seq_len}: [CLS] A [SEP] B [SEP] needs seq_len >= 4")


def encode_pair(tokenizer: Tokenizer, a: str, b: Optional[str],
                seq_len: int) -> Dict[str, np.ndarray]:
    """``[CLS] a [SEP] b [SEP]`` (``[CLS] a [SEP]`` when b is None or encodes to nothing),
    padded with [PAD] to ``seq_len``: tokens, token_types, attention_mask, int64 [seq_len].
    Texts too long together are truncated at their ends, the longer first."""
    check_encoder(tokenizer, seq_len)
    return _encode_pair(tokenizer, a, b, seq_len)


def _encode_pair(tokenizer: Tokenizer, a: str, b: Optional[str],
                 seq_len: int) -> Dict[str, np.ndarray]:
    """``encode_pair`` of a tokenizer and ``seq_len`` that ``check_encoder`` passed."""
    ids_a = np.asarray(tokenizer.encode(a), dtype=np.int64)
    ids_b = np.asarray(tokenizer.encode(b) if b is not None else [], dtype=np.int64)
    if ids_b.size:
        na, nb = truncate_pair(ids_a.size, ids_b.size, seq_len - 3)
        ids_a, ids_b = ids_a[:na], ids_b[:nb]
    else:
        ids_a = ids_a[:seq_len - 2]
    return pack_pair(ids_a, ids_b, seq_len, tokenizer.cls_id, tokenizer.sep_id,  # type: ignore
                     tokenizer.pad_id)  # type: ignore[arg-type]


def encode_examples(tokenizer: Tokenizer, examples: ClassificationExamples,
                    seq_len: int) -> Dict[str, np.ndarray]:
    """Every example through ``encode_pair``: tokens, token_types, attention_mask as int64
    [num_examples, seq_len], and labels [num_examples] (int64, or float32 for regression)."""
    check_encoder(tokenizer, seq_len)
    pairs = examples.text_pair or [None] * len(examples)
    rows = [_encode_pair(tokenizer, a, b, seq_len) for a, b in zip(examples.text, pairs)]
    out = {k: np.stack([r[k] for r in rows]) for k in ("tokens", "token_types", "attention_mask")}
    out["labels"] = np.asarray(examples.labels,
                               dtype=np.float32 if examples.regression else np.int64)
    return out
