"""Tensor (and sequence) parallelism: autograd collectives, parallel layers, vocab-parallel
cross-entropy (Megatron-LM style)."""
from megalite.tensor_parallel.collectives import (gather_from_tp, reduce_from_tp,
                                                  reduce_scatter_seq)
from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                             VocabParallelEmbedding, column_parallel, pad_vocab)

__all__ = ["reduce_from_tp", "gather_from_tp", "reduce_scatter_seq", "ColumnParallelLinear",
           "RowParallelLinear", "VocabParallelEmbedding", "column_parallel", "pad_vocab",
           "vocab_parallel_cross_entropy"]
