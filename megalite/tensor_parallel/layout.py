"""The plan's per-parameter record lives in :mod:`megalite.parallel.params`; ``ShardLayout`` is
its name inside the tensor-parallel plan."""
from megalite.parallel.params import ParamInfo, ParamTable

ShardLayout = ParamTable

__all__ = ["ParamInfo", "ParamTable", "ShardLayout"]
