"""megalite: 3D-parallel training of GPT/LLaMA models on PyTorch."""
__version__ = "0.1.0"
