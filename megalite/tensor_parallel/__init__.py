"""Tensor (and sequence) parallelism: autograd collectives, parallel layers, vocab-parallel
cross-entropy (Megatron-LM style)."""
from megalite.tensor_parallel.collectives import (copy_to_tp, gather_from_tp, gather_seq,
                                                  reduce_from_tp, reduce_scatter_seq,
                                                  scatter_seq, scatter_to_tp)
from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                             VocabParallelEmbedding, pad_vocab)

__all__ = ["copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp", "gather_seq",
           "reduce_scatter_seq", "scatter_seq", "ColumnParallelLinear", "RowParallelLinear",
           "VocabParallelEmbedding", "pad_vocab", "vocab_parallel_cross_entropy"]
