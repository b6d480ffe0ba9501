"""``megalite serve`` under load on the CPU: requests/s, tokens/s, latency and time to first
token at concurrency 1/4/16, with iteration-level batching on (``--max_batch_size 16``) and off
(``--max_batch_size 1``: one request decodes at a time, the others wait in the queue).

Models: random-weight GPTs (the bytes tokenizer, vocabulary 257) written as weights-only
checkpoints, so nothing is trained: ``tiny`` (2 layers, hidden 64: per-step Python overhead
dominates) and ``20m`` (6 layers, hidden 512, ~19M parameters: matmuls dominate). Greedy
decoding of ``--new`` tokens after a ``--prompt-len``-byte prompt.

Load: a bounded loop against loopback only. C client threads each send ``--per-client``
streaming requests back to back (raw HTTP, so the client costs little CPU); latency is the
request's wall time, TTFT the time to its first streamed token. Each (model, batching) pair is
one server process started here (``OMP_NUM_THREADS=--threads``), warmed up by one request; both
servers of a model stay up and the on/off runs of each row alternate ``--reps`` times, each
pair in the other order than the last (the medians are printed), so load from elsewhere on the
machine, and going first, hit both alike.
Client and server share the machine's cores, so absolute figures are this machine's; the
batching gain is the ratio of tokens/s on vs off at the same concurrency.

    python bench/serve.py                 # tiny and 20m, concurrency 1,4,16
    python bench/serve.py --quick         # tiny only, few requests: every row in seconds
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = {"tiny": dict(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=256),
          "20m": dict(num_layers=6, hidden_size=512, num_heads=8, ffn_hidden_size=2048)}


def write_checkpoint(name: str, root: str, context: int) -> Tuple[str, int]:
    """A weights-only checkpoint of a random GPT; returns (directory, parameters)."""
    from megalite.interop.full_state import save_full_model_state
    from megalite.models import ModelArgs, build_model, num_params

    args = ModelArgs(family="gpt", vocab_size=257, max_seq_len=context, norm_eps=1e-5,
                     rope_theta=10000.0, dropout=0.0, tie_embeddings=True, init_std=0.02,
                     num_kv_heads=MODELS[name]["num_heads"], **MODELS[name])
    model = build_model(args, seed=0)
    tokenizer = os.path.join(root, "tokenizer.json")
    with open(tokenizer, "w") as f:
        json.dump({"type": "bytes"}, f)
    out = os.path.join(root, name)
    save_full_model_state(out, args, dict(model.named_parameters()), tokenizer)
    return out, num_params(model)


def start_server(ckpt: str, batch: int, threads: int) -> Tuple[subprocess.Popen, int]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO)
    env.pop("MEGALITE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "megalite.cli", "serve", "--checkpoint", ckpt,
                             "--host", "127.0.0.1", "--port", "0", "--max_batch_size",
                             str(batch), "--max_queue", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    if "/v1" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line}{proc.stdout.read()}")
    return proc, int(line.split("/v1")[0].rsplit(":", 1)[1])


def one_request(port: int, model: str, prompt: str, new: int) -> Tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed request."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    first, tokens = None, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if first is None and event["choices"]:
            first = time.perf_counter() - start
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    return time.perf_counter() - start, first or 0.0, tokens


def load(port: int, model: str, concurrency: int, per_client: int, prompt: str,
         new: int) -> Dict[str, float]:
    results: List[Tuple[float, float, int]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(per_client):
            res = one_request(port, model, prompt, new)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    return {"req_s": len(results) / wall, "tok_s": sum(r[2] for r in results) / wall,
            "p50": statistics.median(lat), "p99": _pct(lat, 0.99),
            "ttft50": statistics.median(ttft), "ttft99": _pct(ttft, 0.99)}


def _pct(values: List[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,20m")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--per-client", type=int, default=4, help="requests each client sends")
    p.add_argument("--new", type=int, default=64, help="tokens per request")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--reps", type=int, default=4, help="alternating on/off runs per row "
                                                      "(medians printed)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.concurrency, a.per_client, a.new, a.reps = "tiny", "1,4", 2, 16, 1
    levels = [int(c) for c in a.concurrency.split(",")]
    prompt = ("the quick fox " * a.prompt_len)[:a.prompt_len]
    torch.set_num_threads(1)
    print(f"megalite serve on CPU, greedy, prompt {a.prompt_len} tokens, {a.new} new tokens, "
          f"{a.per_client} requests per client, server threads {a.threads}")
    header = (f"{'model':>6} {'batching':>9} {'conc':>4} {'req/s':>7} {'tok/s':>8} "
              f"{'p50 s':>7} {'p99 s':>7} {'ttft50 s':>8} {'ttft99 s':>8}")
    with tempfile.TemporaryDirectory() as root:
        for name in a.models.split(","):
            ckpt, n = write_checkpoint(name, root, a.prompt_len + a.new + 8)
            print(f"\n{name}: {n / 1e6:.2f}M parameters\n{header}")
            servers = {b: start_server(ckpt, rows, a.threads)
                       for b, rows in (("on", 16), ("off", 1))}
            try:
                for _, port in servers.values():
                    one_request(port, name, prompt, 4)  # warm-up
                figures = {}
                for c in levels:
                    runs = {"on": [], "off": []}
                    for rep in range(a.reps):
                        order = list(servers.items())[::-1 if rep % 2 else 1]
                        for batching, (_, port) in order:
                            runs[batching].append(load(port, name, c, a.per_client, prompt,
                                                       a.new))
                    for batching, fs in runs.items():
                        f = figures[batching, c] = {k: statistics.median(x[k] for x in fs)
                                                    for k in fs[0]}
                        print(f"{name:>6} {batching:>9} {c:>4} {f['req_s']:7.2f} "
                              f"{f['tok_s']:8.1f} {f['p50']:7.3f} {f['p99']:7.3f} "
                              f"{f['ttft50']:8.3f} {f['ttft99']:8.3f}", flush=True)
            finally:
                for proc, _ in servers.values():
                    proc.terminate()
                    proc.wait(timeout=60)
            gains = ", ".join(f"x{figures['on', c]['tok_s'] / figures['off', c]['tok_s']:.2f} at "
                              f"{c}" for c in levels)
            print(f"{name}: batching gain (tokens/s on / off): {gains}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
