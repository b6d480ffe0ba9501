"""``megalite serve``: an OpenAI-compatible REST endpoint for one decoder checkpoint.

``loading`` reads any checkpoint layout (or ``hf:DIR``) into one process; ``batch`` holds the
per-request KV caches and the batched decode step; ``engine`` runs iteration-level batching on a
thread of its own; ``text`` turns tokens into streamed text (stop strings, chat templates);
``schemas`` checks requests and builds OpenAI-shaped responses; ``app`` is the FastAPI app;
``server`` parses the command line and runs uvicorn. Only ``app`` and ``server`` import FastAPI
and uvicorn (the optional ``serve`` extra).
"""
