"""``megalite serve``: check the command line, load the model, bind, run uvicorn.

Every mistake on the command line is one ``error:`` line and exit code 2, before the model is
loaded where it can be. Loopback by default; any other address needs an API key (or an explicit
``--insecure_no_auth``). SIGTERM (or Ctrl-C) stops accepting connections, lets in-flight
requests finish (up to ``--drain_timeout_s``), then exits 0."""
from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import signal
import socket
import sys
from typing import List, Optional

KEY_ENV = "MEGALITE_API_KEY"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite serve",
        description="An OpenAI-compatible REST endpoint (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health) for one decoder checkpoint, with iteration-level "
                    "batching. Needs the serve extra: pip install -e '.[serve]'.")
    p.add_argument("--checkpoint", required=True,
                   help="a run, checkpoints or checkpoint directory (any layout), or hf:DIR "
                        "(a Hugging Face directory: config.json, safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback only); any other address "
                        f"needs an API key ({KEY_ENV} or --api_key) or --insecure_no_auth")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and KV cache dtype")
    p.add_argument("--max_batch_size", type=int, default=16,
                   help="requests decoded together (rows of the preallocated KV cache)")
    p.add_argument("--max_queue", type=int, default=64,
                   help="sequences that may wait for a row; more is answered 429")
    p.add_argument("--max_body_bytes", type=int, default=1 << 20,
                   help="largest request body; more is answered 413")
    p.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (prefer the {KEY_ENV} "
                        "environment variable: a flag shows in ps)")
    p.add_argument("--insecure_no_auth", action="store_true",
                   help="listen on a non-loopback address without an API key")
    p.add_argument("--drain_timeout_s", type=float, default=60.0,
                   help="on SIGTERM, how long in-flight requests may take to finish")
    return p


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback
                               for i in infos)


def problem(a: argparse.Namespace, key: Optional[str]) -> Optional[str]:
    """The first bad option as one line, or None."""
    if not 0 <= a.port <= 65535:
        return f"--port {a.port}: expected 0-65535 (0 picks a free port)"
    for name in ("max_batch_size", "max_queue", "max_body_bytes"):
        if getattr(a, name) < 1:
            return f"--{name} {getattr(a, name)}: must be at least 1"
    if a.drain_timeout_s < 0:
        return f"--drain_timeout_s {a.drain_timeout_s}: must be >= 0"
    if key is not None and not key.strip():
        return f"the API key ({KEY_ENV} or --api_key) is empty; set a non-empty key"
    if not is_loopback(a.host) and key is None and not a.insecure_no_auth:
        return (f"--host {a.host} is reachable from other machines: set an API key in "
                f"{KEY_ENV} (or --api_key), or pass --insecure_no_auth to serve without one")
    if a.device != "cpu":
        import torch

        if not a.device.startswith("cuda") or not torch.cuda.is_available():
            return (f"--device {a.device}: expected cpu or cuda[:N] on a machine with CUDA "
                    f"(CUDA available: {torch.cuda.is_available()})")
    missing = [m for m in ("fastapi", "uvicorn", "jinja2", "pydantic")
               if importlib.util.find_spec(m) is None]
    if not missing:
        import pydantic

        if int(pydantic.VERSION.split(".")[0]) < 2:
            missing = [f"pydantic>=2 (found {pydantic.VERSION})"]
    if missing:
        return (f"megalite serve needs {', '.join(missing)}: pip install -e '.[serve]' "
                "(or pip install fastapi uvicorn jinja2 'pydantic>=2')")
    return None


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock


def main(argv: List[str]) -> int:
    a = parser().parse_args(argv)
    key = a.api_key if a.api_key is not None else os.environ.get(KEY_ENV)
    bad = problem(a, key)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    from megalite.serve.loading import LoadError, load_decoder
    from megalite.serve.text import chat_template_problem

    try:
        loaded = load_decoder(a.checkpoint, a.device, a.dtype)
    except LoadError as e:  # its message names the checkpoint or file
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = chat_template_problem(loaded.chat_template)
    if bad:
        print(f"error: --checkpoint {a.checkpoint}: {bad}; fix tokenizer_config.json",
              file=sys.stderr)
        return 2
    try:
        sock = bind(a.host, a.port)
    except OSError as e:
        print(f"error: --host {a.host} --port {a.port}: cannot listen there ({e.strerror or e});"
              " pick another --port (0: any free one)", file=sys.stderr)
        return 2
    return serve(loaded, sock, a, key)


def serve(loaded, sock: socket.socket, a: argparse.Namespace, key: Optional[str]) -> int:
    import uvicorn

    from megalite.serve.app import create_app
    from megalite.serve.engine import Engine
    from megalite.serve.schemas import Limits

    from megalite.serve.batch import SlotCache

    cache_bytes = SlotCache.bytes_needed(loaded.model, a.max_batch_size)
    cache = (f"{cache_bytes / 2**30:.2f} GiB" if cache_bytes >= 2**30
             else f"{cache_bytes / 2**20:.1f} MiB")
    try:
        engine = Engine(loaded.model, loaded.tokenizer.eod_id, a.max_batch_size, a.max_queue)
    except RuntimeError as e:  # out of memory (torch.cuda.OutOfMemoryError is one)
        print(f"error: --max_batch_size {a.max_batch_size}: the KV cache needs {cache} on "
              f"{a.device} and could not be allocated ({str(e).splitlines()[0][:120]}); "
              "lower --max_batch_size", file=sys.stderr)
        return 2
    limits = Limits(loaded.model.args.max_seq_len, a.max_batch_size, a.max_queue,
                    a.max_body_bytes)
    app = create_app(loaded, engine, limits, key)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"megalite serve: model {loaded.name!r} at http://{shown}:{port}/v1 "
          f"(max_batch_size {a.max_batch_size}, KV cache {cache}, "
          f"{'API key required' if key else 'no API key'})", flush=True)
    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            stats = engine.stats()
            print(f"megalite serve: draining {stats['active'] + stats['waiting']} sequence(s) "
                  "in flight", flush=True)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=a.drain_timeout_s)
    # uvicorn re-raises the SIGTERM/SIGINT it drained on under the handler found at start:
    # make that one a no-op, so a drained stop exits 0 instead of dying of the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    Server(config).run(sockets=[sock])
    print("megalite serve: stopped", flush=True)
    return 0
