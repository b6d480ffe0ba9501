"""``megalite serve`` with the real ``openai`` client against one server process (started once,
on a free port, with an API key) serving a tiny model trained here.

The reference is ``megalite generate`` in this process: same checkpoint, same prompt, same seed
-> the same tokens. The tokenizer is megalite's bytes tokenizer, so equal texts are equal token
ids once the reference's bytes are checked to be valid UTF-8 (``reference``). The last test
stops the shared server with SIGTERM (it must drain what is in flight), so it stays last.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import pytest
import torch

pytest.importorskip("fastapi", reason="megalite serve needs fastapi (the serve extra)")
pytest.importorskip("uvicorn", reason="megalite serve needs uvicorn (the serve extra)")
openai = pytest.importorskip("openai", reason="the serve tests use the openai client")

from helpers import REPO, snapshot, tiny_config, train  # noqa: E402
from megalite import cli  # noqa: E402
from megalite.generate import _prefill, generate  # noqa: E402
from megalite.serve.batch import SlotCache, decode_step  # noqa: E402
from megalite.serve.loading import Loaded, load_decoder  # noqa: E402

KEY = "test-key-0123"
CONTEXT = 256
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
# prompts whose greedy continuation never has a near tie (the test asserts a top-2 margin)
PROMPTS = ["the ", "the quick fox ", "the old robots", "a", "the tall child helps", "12 + 3",
           "the green dog", "the red", "4", "the small children find", "the happy fox ",
           "the tall robot finds the", "3 + 4", "the cat", "the old farmer", "hello"]


class Served:
    def __init__(self, proc: subprocess.Popen, port: int, run_dir: str, loaded: Loaded,
                 lines: List[str], files_before: Dict[str, Tuple[bytes, int]]):
        self.proc, self.port, self.run_dir, self.loaded, self.lines = (proc, port, run_dir,
                                                                       loaded, lines)
        self.files_before = files_before  # the run directory before the server started
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                                    max_retries=0, timeout=60)

    def health(self) -> Dict:
        status, body = self.raw("GET", "/health")
        assert status == 200
        return body

    def raw(self, method: str, path: str, body: Optional[bytes] = None,
            headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers={k: v for k, v in hdrs.items() if v})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, {"not JSON": data[:200]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> str:
    """A tiny GPT trained for 80 steps (bytes tokenizer, context 256); its checkpoint carries
    a tokenizer_config.json with a chat template."""
    run_dir = str(tmp_path_factory.mktemp("serve") / "tiny")
    cfg = tiny_config(run_dir, data_cache, "--train.steps=80", "--train.lr=3e-3",
                      "--train.min_lr=3e-4", f"--model.max_seq_len={CONTEXT}")
    train(cfg, distributed=False)
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000080")
    with open(os.path.join(ckpt, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": TEMPLATE, "eos_token": "<|endoftext|>"}, f)
    return run_dir


@pytest.fixture(scope="module")
def served(trained):
    env = dict(os.environ, MEGALITE_API_KEY=KEY, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    before = snapshot(trained)
    proc = subprocess.Popen(
        [sys.executable, "-m", "megalite.cli", "serve", "--checkpoint", trained, "--port", "0",
         "--max_batch_size", "16", "--max_queue", "64", "--max_body_bytes", "65536"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: List[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 120
    while not any("/v1" in line for line in lines):
        assert proc.poll() is None and time.time() < deadline, "".join(lines)
        time.sleep(0.05)
    port = int(next(x for x in lines if "/v1" in x).split("/v1")[0].rsplit(":", 1)[1])
    loaded = load_decoder(trained)
    yield Served(proc, port, trained, loaded, lines, before)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def reference(loaded: Loaded, prompt: str, new: int, **sampling) -> str:
    """``megalite generate``'s text for ``prompt`` (greedy unless told), its bytes checked to
    be valid UTF-8 so that equal text means equal token ids."""
    tok = loaded.tokenizer
    ids = tok.encode(prompt)
    out = generate(loaded.model, ids, new, eod_id=tok.eod_id,
                   **({"temperature": 0.0} | sampling))[0, len(ids):].tolist()
    body = out[:out.index(tok.eod_id)] if tok.eod_id in out else out
    return bytes(body).decode("utf-8")  # strict: raises on a broken character


def test_completions_stream_chat_n_and_seeds(served, capsys) -> None:
    c, loaded = served.client, served.loaded
    assert [m.id for m in c.models.list().data] == ["tiny"]
    prompt = "the quick fox "
    want = reference(loaded, prompt, 24)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 24)
    # the `megalite generate` command prints prompt + the same continuation
    assert cli.main(["generate", "--checkpoint", served.run_dir, "--prompt", prompt,
                     "--max_new_tokens", "24", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + want + "\n"
    # streaming: the pieces add up to the same text; usage arrives in a last, choice-less chunk
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(x.choices[0].text for x in chunks if x.choices) == want
    assert chunks[-2].choices[0].finish_reason == "length" and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == 24
    # a stop string ends the text just before it
    stop = want[3:6]
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                             stop=[stop])
    assert r.choices[0].text == want[:want.index(stop)] and r.choices[0].finish_reason == "stop"
    # chat: the template renders the prompt; non-streamed and streamed agree
    chat_prompt = "<user>hi\n<assistant>"
    want_chat = reference(loaded, chat_prompt, 12)
    msgs = [{"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want_chat
    assert r.usage.prompt_tokens == len(chat_prompt)
    pieces = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                       temperature=0, stream=True)
    assert "".join(x.choices[0].delta.content or "" for x in pieces) == want_chat
    # seeds: choice k draws what `generate` draws with seed + k; a batch of rows in generate
    # draws the same per row (one generator per row there too)
    sampling = dict(temperature=1.0, top_p=0.9, top_k=20)
    kwargs = dict(model="tiny", prompt="the ", max_tokens=20, n=3, temperature=1.0, top_p=0.9,
                  extra_body={"top_k": 20})
    r5 = c.completions.create(seed=5, **kwargs)
    got = [ch.text for ch in sorted(r5.choices, key=lambda ch: ch.index)]
    assert got == [reference(loaded, "the ", 20, seed=5 + k, **sampling) for k in range(3)]
    ids = torch.tensor([loaded.tokenizer.encode("the ")] * 3)
    rows = generate(loaded.model, ids, 20, seed=5, eod_id=loaded.tokenizer.eod_id, **sampling)
    assert [loaded.tokenizer.decode(row[4:].tolist()) for row in rows] == got
    assert [ch.text for ch in c.completions.create(seed=5, **kwargs).choices] == got
    assert [ch.text for ch in c.completions.create(seed=6, **kwargs).choices] != got
    assert len(set(got)) > 1  # the choices are different draws


@torch.no_grad()
def test_16_concurrent_greedy_equal_single_and_generate(served) -> None:
    """Greedy over 16 concurrent clients = one at a time = ``generate``. Equal ids need every
    step's top-2 logit margin above the batched-vs-single difference: asserted > 1e-3, while
    the batched decode's logits stay within 1e-4 of the single-request ones (fp32 CPU matmuls
    over a batch differ from batch-1 by ~1e-5)."""
    loaded, new = served.loaded, 32
    model, tok = loaded.model, loaded.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    # single-request decoding (generate's prefill + cache), its logits at every step
    singles = []
    for ids in prompts:
        caches, logits = _prefill(model, torch.tensor([ids]))
        steps, tokens = [logits[0]], []
        for _ in range(new - 1):
            tokens.append(int(steps[-1].argmax()))
            steps.append(model(torch.tensor([[tokens[-1]]]), caches)[0, -1])
        top2 = torch.stack(steps).topk(2, dim=-1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3, tok.decode(ids)
        singles.append((torch.stack(steps), tokens + [int(steps[-1].argmax())]))
    # the same 16 decoded as one batch, fed the single-request tokens
    cache = SlotCache(model, len(prompts))
    for r, ids in enumerate(prompts):
        cache.fill(r, _prefill(model, torch.tensor([ids]))[0])
    worst = 0.0
    for step in range(new - 1):
        last = torch.tensor([tokens[step] for _, tokens in singles])
        batched = decode_step(model, cache, last)
        single = torch.stack([logits[step + 1] for logits, _ in singles])
        worst = max(worst, float((batched - single).abs().max()))
    assert worst < 1e-4, worst
    # over HTTP: 16 at once, then one at a time, against generate
    want = [reference(loaded, p, new) for p in PROMPTS]
    before = served.health()["batched_forwards"]
    got: List[Optional[str]] = [None] * len(PROMPTS)

    def ask(i: int) -> None:
        r = served.client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=new,
                                             temperature=0)
        got[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert served.health()["batched_forwards"] > before  # they did share forward passes
    for i in range(len(PROMPTS)):
        ask(i)
    assert got == want


def test_short_request_overtakes_a_long_stream(served) -> None:
    c = served.client
    before = served.health()["batched_forwards"]
    long = iter(c.completions.create(model="tiny", prompt="the ", max_tokens=240,
                                     temperature=0, stream=True))
    next(long)  # the long request is decoding
    # the short request returns while the long one is still streaming (it has chunks left)
    short = c.completions.create(model="tiny", prompt="a", max_tokens=2, temperature=0)
    assert short.usage.completion_tokens <= 2
    rest = list(long)
    assert rest and rest[-1].choices[0].finish_reason == "length"  # greedy: no end-of-text
    assert served.health()["batched_forwards"] > before  # a decode step held both


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served) -> None:
    good = {"model": "tiny", "prompt": "the ", "max_tokens": 2}
    big = json.dumps(dict(good, prompt="x" * 70_000)).encode()
    cases = [  # (what, body, headers, status)
        ("bad JSON", b'{"model": "tiny", "prompt": ', None, 400),
        ("not UTF-8", b'{"model": "\xff\xfe"}', None, 400),
        ("not an object", b"[1, 2]", None, 400),
        ("unknown model", dict(good, model="gpt-4"), None, 404),
        ("negative max_tokens", dict(good, max_tokens=-1), None, 400),
        ("prompt longer than the context", dict(good, prompt="x" * (CONTEXT + 1)), None, 400),
        ("prompt + max_tokens over the context", dict(good, max_tokens=CONTEXT), None, 400),
        ("temperature out of range", dict(good, temperature=5), None, 400),
        ("unsupported logprobs", dict(good, logprobs=2), None, 400),
        ("n above max_batch_size", dict(good, n=100), None, 400),
        ("five stop strings", dict(good, stop=list("abcde")), None, 400),
        ("token id outside the vocabulary", dict(good, prompt=[1, 99999]), None, 400),
        ("missing prompt", {"model": "tiny"}, None, 400),
        ("wrong key", good, {"Authorization": "Bearer nope"}, 401),
        ("no key", good, {"Authorization": ""}, 401),
        ("huge body", big, None, 413),
        ("huge body, chunked", big, "chunked", 413),
    ]
    for what, body, headers, status in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if headers == "chunked":  # no Content-Length: http.client sends an iterable chunked
            data, headers = iter([data[i:i + 8192] for i in range(0, len(data), 8192)]), None
        got, answer = served.raw("POST", "/v1/completions", data, headers)
        assert got == status, (what, got, answer)
        assert isinstance(answer["error"]["message"], str) and answer["error"]["type"], what
    assert served.raw("POST", "/v1/nowhere", b"{}")[0] == 404
    assert served.raw("GET", "/v1/completions")[0] == 405
    bad_chat = {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}
    assert served.raw("POST", "/v1/chat/completions", json.dumps(bad_chat).encode())[0] == 400
    # the client raises the error classes of OpenAI's shape, with the server's message
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        served.client.completions.create(model="nope", prompt="a", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context"):
        served.client.completions.create(model="tiny", prompt="a", max_tokens=10 * CONTEXT)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.client.base_url, api_key="wrong",
                      max_retries=0).models.list()
    status, answer = served.raw("POST", "/v1/completions", json.dumps(good).encode())
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    assert served.proc.poll() is None


def test_client_leaving_mid_request_frees_its_row(served) -> None:
    """A client that closes its connection mid-request, streamed or not, frees its row:
    the engine counts it abandoned long before its 240 tokens."""
    for stream in (True, False):
        before = served.health()
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
        conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     body=json.dumps({"model": "tiny", "prompt": "the ", "max_tokens": 240,
                                      "temperature": 1.0, "seed": 3, "stream": stream}))
        deadline = time.time() + 20
        if stream:  # the client leaves after its first token
            r = conn.getresponse()
            assert r.status == 200 and r.readline().startswith(b"data: ")
        else:  # ... or while the server generates the answer it waits for
            while served.health()["forwards"] == before["forwards"]:
                assert time.time() < deadline
                time.sleep(0.01)
        conn.sock.close()
        conn.close()
        while True:
            now = served.health()
            if now["active"] == 0 and now["abandoned"] == before["abandoned"] + 1:
                break
            assert time.time() < deadline, (stream, now)
            time.sleep(0.02)
        assert now["forwards"] - before["forwards"] < 200, stream  # well before 240 tokens


@torch.no_grad()
def test_hf_directory_loads_the_same_model_and_template(trained, tmp_path) -> None:
    """``--checkpoint hf:DIR`` of the run's HF export: the same logits, the chat template kept."""
    pytest.importorskip("transformers", reason="HF export needs transformers (interop extra)")
    from megalite.interop.hf_files import export_hf

    export_hf(trained, str(tmp_path / "hf"))
    ours, theirs = load_decoder(trained), load_decoder(f"hf:{tmp_path / 'hf'}")
    ids = torch.tensor([ours.tokenizer.encode("the quick fox")])
    assert torch.allclose(ours.model(ids), theirs.model(ids), atol=1e-5)
    assert theirs.chat_template == TEMPLATE and theirs.name == "hf"
    assert theirs.tokenizer.encode("the é") == ours.tokenizer.encode("the é")


def test_full_queue_429_then_sigterm_drains_in_flight_requests(served) -> None:
    """Runs last: stops the shared server. 16 sequences decode; six more requests of 16 each
    arrive for a queue of 64: four wait, the rest are refused with 429. After SIGTERM every
    admitted sequence finishes, then the process exits 0."""
    c = served.client
    outcomes: list = []
    kwargs = dict(model="tiny", prompt="the ", n=16, temperature=1.0)

    def ask(seed: int) -> None:
        try:
            outcomes.append(c.completions.create(seed=seed, max_tokens=60, **kwargs))
        except openai.RateLimitError as e:
            outcomes.append(e)

    stream = iter(c.completions.create(seed=9, max_tokens=240, stream=True, **kwargs))
    next(stream)  # 16 rows decoding
    threads = [threading.Thread(target=ask, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while served.health()["waiting"] // 16 + len(outcomes) < 6:  # each request queued or refused
        assert time.time() < deadline, (served.health(), outcomes)
        time.sleep(0.01)
    served.proc.send_signal(signal.SIGTERM)
    finished = sum(1 for x in stream if x.choices and x.choices[0].finish_reason)
    for t in threads:
        t.join()
    assert finished == 16
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    done = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(refused) >= 1 and "busy" in str(refused[0]), outcomes
    assert len(done) + len(refused) == 6 and len(done) >= 1
    assert all(ch.finish_reason in ("stop", "length") for r in done for ch in r.choices)
    assert all(len(r.choices) == 16 for r in done)
    assert served.proc.wait(timeout=60) == 0
    out = "".join(served.lines)
    assert "draining" in out and "draining 0 " not in out and "stopped" in out, out
    assert snapshot(served.run_dir) == served.files_before  # serving never writes there
