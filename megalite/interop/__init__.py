"""Conversions to and from other ecosystems (Hugging Face transformers).

Import the submodule (``megalite.interop.hf``) explicitly: it pulls in the optional
``transformers`` dependency only when its functions are called.
"""
