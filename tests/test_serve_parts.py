"""The pieces of ``megalite serve`` in one process: the engine's iteration-level batching
against ``generate`` (rows joining and leaving mid-decode), the text streaming rules, and the
command line's refusals. The HTTP server is tested with the openai client in
tests/test_serve.py."""
from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

from megalite import cli
from megalite.generate import generate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A weights-only checkpoint of a tiny random GPT with the bytes tokenizer."""
    from megalite.interop.full_state import save_full_model_state
    from megalite.models import ModelArgs, build_model

    root = tmp_path_factory.mktemp("serve-parts")
    args = ModelArgs(family="gpt", num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=2,
                     ffn_hidden_size=32, vocab_size=257, max_seq_len=32, norm_eps=1e-5,
                     rope_theta=10000.0, dropout=0.0, tie_embeddings=True, init_std=0.02)
    (root / "tokenizer.json").write_text(json.dumps({"type": "bytes"}))
    save_full_model_state(str(root / "ckpt"), args,
                          dict(build_model(args, seed=0).named_parameters()),
                          str(root / "tokenizer.json"))
    return str(root / "ckpt")


def test_engine_rows_join_and_leave_llama_fp64() -> None:
    """The engine in-process on a tiny random LLaMA (RoPE, grouped-query heads) in fp64: five
    requests through 3 rows, finishing at different steps (rows move to stay contiguous),
    the last two joining mid-decode; each equals ``generate`` token for token, a seeded
    sampled one included."""
    from megalite.data.tokenizer import ByteTokenizer
    from megalite.models import ModelArgs, build_model
    from megalite.serve.engine import Engine, Sequence
    from megalite.serve.text import TextStream

    args = ModelArgs(family="llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                     ffn_hidden_size=64, vocab_size=61, max_seq_len=48, norm_eps=1e-5,
                     rope_theta=10000.0, dropout=0.0, tie_embeddings=False, init_std=0.5)
    model = build_model(args, seed=3, dtype=torch.float64).eval()
    engine = Engine(model, eod_id=None, max_batch_size=3, max_queue=8)
    gen = torch.Generator().manual_seed(0)
    jobs = [(torch.randint(0, 61, (n,), generator=gen).tolist(), new, temp)
            for n, new, temp in [(3, 20, 0.0), (9, 5, 0.0), (5, 13, 1.0), (12, 8, 0.0),
                                 (4, 30, 0.0)]]
    done = threading.Semaphore(0)
    seqs = [Sequence(ids, new, temp, 0, 1.0, torch.Generator().manual_seed(7), TextStream(
        ByteTokenizer()), lambda e: e.finish_reason and done.release()) for ids, new, temp in jobs]
    engine.start()
    try:
        engine.submit_all([[s] for s in seqs])
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    for seq, (ids, new, temp) in zip(seqs, jobs):
        want = generate(model, ids, new, temperature=temp, seed=7)[0, len(ids):].tolist()
        assert seq.tokens == want and seq.finish_reason == "length"
    assert engine.batched_forwards > 0 and engine.stats()["active"] == 0



def test_text_stream_holds_back_only_what_may_change() -> None:
    """Pieces concatenate to the final text: an incomplete UTF-8 character waits for its bytes
    (bytes that can never be valid go out as U+FFFD at once); a possible stop-string start
    waits; a stop string ends the text just before it. The same with an HF tokenizer."""
    from megalite.data.tokenizer import ByteTokenizer
    from megalite.serve.text import TextStream

    def pieces(data: bytes, stop=()):
        stream = TextStream(ByteTokenizer(), stop)
        out = [stream.push(b) for b in data]
        return [p for p, _ in out], [s for _, s in out], stream
    got, _, _ = pieces("aé€".encode())
    assert got == ["a", "", "é", "", "", "€"]
    got, _, stream = pieces(b"\xff\xff\xff")  # never valid: out at once
    assert got == ["\ufffd"] * 3 and stream.flush() == ""
    got, _, _ = pieces(b"\xf0\x90\xe9\x84\xb9!")  # a broken 4-byte start, then a whole "鄹"
    assert got == ["", "", "\ufffd", "", "鄹", "!"]  # f0 90 decode to one U+FFFD
    got, stopped, _ = pieces(b"xaab!", stop=["ab!", "zz"])
    assert got == ["x", "", "a", "", ""] and stopped == [False] * 4 + [True]
    got, stopped, stream = pieces(b"xabc", stop=["abd"])
    assert got == ["x", "", "", "abc"] and not any(stopped) and stream.flush() == ""
    from megalite.data.tokenizer import HFTokenizer
    from megalite.interop.hf_tokenizer import bytes_tokenizer

    hf = HFTokenizer(bytes_tokenizer())  # the bytes tokenizer as an HF byte-level BPE
    gen = torch.Generator().manual_seed(0)  # any bytes: the pieces add up to the decoded text
    for _ in range(200):
        size = int(torch.randint(1, 30, (), generator=gen))
        ids = torch.randint(0, 257, (size,), generator=gen).tolist()  # 256: end of text
        for tok in (ByteTokenizer(), hf):
            stream = TextStream(tok)
            got = [stream.push(i)[0] for i in ids]
            assert "".join(got) + stream.flush() == tok.decode(ids), (tok, ids)


def test_command_line_refusals(checkpoint, tmp_path, capsys, monkeypatch) -> None:
    """One `error:` line and exit 2, nothing served: a non-loopback host without a key, a
    missing checkpoint, an encoder (in `generate` too), a port in use."""
    pytest.importorskip("fastapi")  # else serve's first refusal is the missing extra
    pytest.importorskip("uvicorn")
    monkeypatch.delenv("MEGALITE_API_KEY", raising=False)
    encoder = tmp_path / "encoder"
    shutil.copytree(os.path.join(checkpoint, "step_00000000"), encoder)
    meta = json.loads((encoder / "meta.json").read_text())
    meta["model_args"]["family"] = "bert"
    (encoder / "meta.json").write_text(json.dumps(meta))
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    cases = [
        (["serve", "--checkpoint", checkpoint, "--host", "0.0.0.0"], "MEGALITE_API_KEY"),
        (["serve", "--checkpoint", str(tmp_path / "none")], "no checkpoint"),
        (["serve", "--checkpoint", str(encoder)], "not a decoder"),
        (["generate", "--checkpoint", str(encoder)], "not a decoder"),
        (["serve", "--checkpoint", checkpoint, "--port", str(busy.getsockname()[1])],
         "cannot listen"),
        (["serve", "--checkpoint", checkpoint, "--max_batch_size", "0"], "--max_batch_size"),
    ]
    from megalite.serve.server import is_loopback, parser, problem

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    public = parser().parse_args(["--checkpoint", checkpoint, "--host", "0.0.0.0"])
    assert problem(public, key="k") is None and "--insecure_no_auth" in problem(public, None)
    public.insecure_no_auth = True
    assert problem(public, None) is None
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0 and "--max_batch_size" in capsys.readouterr().out
    try:
        for argv, words in cases:
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    finally:
        busy.close()


def test_load_decoder_reads_meta_once_in_the_dtype_asked(checkpoint, monkeypatch) -> None:
    """``load_decoder`` reads the checkpoint's meta.json once (the decoder check and the load
    share it) and gives the saved weights in the dtype asked by torch's name; another name is
    one LoadError listing them."""
    from megalite.interop.full_state import load_full_model_state
    from megalite.serve.loading import LoadError, load_decoder
    from megalite.trainer import checkpoint as ckpt

    reads = []
    read_meta = ckpt.read_meta
    monkeypatch.setattr(ckpt, "read_meta", lambda path: reads.append(path) or read_meta(path))
    loaded = load_decoder(checkpoint, dtype="bfloat16")
    assert len(reads) == 1, reads
    _, saved, _ = load_full_model_state(checkpoint)
    for name, p in loaded.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, saved[name].to(torch.bfloat16))
    with pytest.raises(LoadError, match="expected one of float32, bfloat16, float16"):
        load_decoder(checkpoint, dtype="fp16")
