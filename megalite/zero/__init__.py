"""ZeRO stages 0-3 and mixed precision over the data-parallel group: flat parameter groups per
layer unit (``flat``), their gradients, reductions and ZeRO-3 gathering (``engine``), AdamW on
the owned fp32 shards (``optimizer``) and fp16 loss scaling (``scaler``)."""
from megalite.zero.engine import ZeroEngine
from megalite.zero.optimizer import ShardedAdamW
from megalite.zero.scaler import LossScaler

__all__ = ["ZeroEngine", "ShardedAdamW", "LossScaler"]
