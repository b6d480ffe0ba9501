"""Data pipeline: tokenizers, ``prepare-data``, built-in corpora and packed/blended datasets
indexed by global sample number (so every parallel layout sees the same samples)."""
from .corpus import ensure_dataset, stdlib_files, synthetic_texts
from .dataset import (BlendedSamples, IndexedTokens, PackedSamples, build_datasets, check_data,
                      eval_batch, micro_batch, open_tokens, split_documents, tokenizer_file)
from .megatron import MegatronTokens, read_index
from .inputs import DataError, iter_documents, resolve_inputs
from .prepare import main as prepare_data_main
from .prepare import prepare, prepare_documents
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DataError", "iter_documents", "resolve_inputs",
    "Tokenizer", "ByteTokenizer", "HFTokenizer", "train_tokenizer", "load_tokenizer",
    "prepare", "prepare_documents", "prepare_data_main",
    "stdlib_files", "synthetic_texts", "ensure_dataset",
    "IndexedTokens", "MegatronTokens", "read_index", "open_tokens", "check_data",
    "tokenizer_file", "split_documents", "PackedSamples", "BlendedSamples", "build_datasets",
    "micro_batch", "eval_batch",
]
