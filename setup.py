"""megalite: 3D-parallel LLM training on PyTorch (see README.md)."""
from setuptools import find_packages, setup

setup(
    name="megalite",
    version="0.1.0",
    description="3D-parallel (dp x pp x tp) training of GPT/LLaMA models on PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["megalite", "megalite.*"]),
    install_requires=["torch>=2.4", "numpy", "pyyaml"],
    extras_require={
        "interop": ["transformers>=4.40", "safetensors", "tokenizers>=0.15"],
        "tensorboard": ["tensorboard"],
        "mpi": ["mpi4py"],  # rank discovery under mpiexec without OMPI_* (parallel/env.py)
        "deepspeed": ["deepspeed"],  # the `deepspeed` launcher CLI
        "dev": ["pytest>=7", "transformers>=4.40", "safetensors", "tokenizers>=0.15", "tensorboard"],
    },
    entry_points={"console_scripts": ["megalite=megalite.cli:main"]},
)
