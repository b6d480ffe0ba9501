"""Fused kernels: LayerNorm, RMSNorm, scaled masked softmax and scaled causal softmax.

Each op is a torch custom op with autograd and a fake implementation (``torch.compile`` traces
it). A CPU tensor runs the C++ kernels (``csrc/cpu``), a CUDA tensor the CUDA kernels
(``csrc/cuda``); other devices and dtypes, or a missing library, run the PyTorch reference of
``megalite.ops.reference`` (same math). Statistics and accumulation are fp32 for every input dtype.
The models call these when ``model.kernels=fused`` and ``model_uses_kernels(device)``.
"""
from megalite.ops._backend import model_uses_kernels
from megalite.ops.norm import layer_norm, rms_norm
from megalite.ops.softmax import scaled_causal_softmax, scaled_masked_softmax

__all__ = ["layer_norm", "rms_norm", "scaled_masked_softmax", "scaled_causal_softmax",
           "model_uses_kernels"]
