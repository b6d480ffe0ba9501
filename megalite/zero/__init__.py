"""Data parallelism and mixed precision over the dp group (ZeRO stage 0 for now): a flat
gradient buffer with bucketed asynchronous all-reduce, and an AdamW holding fp32 master weights."""
from megalite.zero.grad_buffer import GradBuffer
from megalite.zero.optimizer import MixedPrecisionAdamW

__all__ = ["GradBuffer", "MixedPrecisionAdamW"]
