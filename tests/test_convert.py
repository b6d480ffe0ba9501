"""Hugging Face export and import: ``megalite convert``, ``checkpoint.init_from``.

The reference on each side is the other library: a checkpoint trained at tp2 x pp2 and exported
must give transformers' ``AutoModelForCausalLM`` the logits megalite computes from the merged
checkpoint (fp32, 1e-5: only reduction order differs, see test_hf.py), and ``AutoTokenizer``
megalite's token ids; an HF model written by ``save_pretrained`` and started from at tp2 x pp2
must give megalite's step-0 loss the loss transformers computes on the same batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distributed import run_distributed  # noqa: E402
from helpers import tiny_config, train  # noqa: E402

from megalite.cli import main as cli  # noqa: E402
from megalite.interop.full_state import (load_full_model_state,  # noqa: E402
                                         save_full_model_state)
from megalite.interop.hf import from_hf, to_hf  # noqa: E402
from megalite.interop.hf_files import export_hf  # noqa: E402

ATOL = 1e-5  # fp32 on both sides; reduction order only (measured ~2e-7 here)
TEXT = "def f(x):\n    return x  # héllo, 日本 <|endoftext|> done\n"
ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
ROPE_FLAG = ("--model.rope_scaling=llama3:factor=4,low_freq_factor=1,high_freq_factor=4,"
             "original_max_position_embeddings=32")


def _hf_llama(path: str) -> None:
    """A random LLaMA (GQA, llama3 RoPE, untied; the bytes vocabulary of the synthetic data),
    written by transformers itself; norms perturbed so a mis-mapped norm shows."""
    config = transformers.LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, initializer_range=0.1, rope_parameters=ROPE,
        tie_word_embeddings=False, bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path, safe_serialization=True)


def _init_from_world(tmp: str, cache: str, hf_dir: str):
    """tp2 x pp2: start from the HF directory, train 2 steps (the checkpoint the parent
    exports is then written by 4 tp/pp ranks); return the step losses and step 0's batch."""
    cfg = tiny_config(f"{tmp}/run", cache, "--model.family=llama", "--model.num_kv_heads=2",
                      "--model.ffn_hidden_size=96", "--model.rope_theta=500", ROPE_FLAG,
                      "--parallel.tp=2", "--parallel.pp=2", "--train.steps=2",
                      "--train.eval_iters=1", f"--checkpoint.init_from=hf:{hf_dir}")
    trainer, result = train(cfg, distributed=True)
    batch = trainer.micro_batches(0)  # dp = 1: every rank has the whole global batch
    return result.losses, [(b["tokens"], b["labels"]) for b in batch]


def test_hf_to_tp2pp2_and_back_to_hf(tmp_path: Any, data_cache: str) -> None:
    hf_dir = str(tmp_path / "hf_in")
    _hf_llama(hf_dir)
    losses, batch = run_distributed(_init_from_world, 4, str(tmp_path), data_cache,
                                    hf_dir, timeout_s=240)[0]
    # init_from: megalite's step-0 loss at tp2 x pp2 == transformers' loss on that batch
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    with torch.no_grad():
        logits = torch.cat([hf(x).logits for x, _ in batch])
    labels = torch.cat([y for _, y in batch])
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert abs(losses[0] - ref) < ATOL, (losses[0], ref)
    assert losses[1] < losses[0]  # it trains from there

    # export the tp2 x pp2 checkpoint: several shards, an index naming every tensor
    run, out = str(tmp_path / "run"), str(tmp_path / "hf_out")
    assert cli(["convert", "--to", "hf", run, out, "--max_shard_mb", "0.1"]) == 0
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == files
    config = json.load(open(os.path.join(out, "config.json")))
    scaling = {k: v for k, v in ROPE.items() if k != "rope_theta"}
    assert config["rope_theta"] == 500.0 and config["rope_scaling"] == scaling
    assert config["rope_parameters"] == ROPE
    assert json.load(open(os.path.join(out, "generation_config.json"))) == \
        {"bos_token_id": 256, "eos_token_id": 256}

    from megalite.trainer.inference import load_for_inference

    ours, tokenizer = load_for_inference(run)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    auto = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode(TEXT)
    assert auto(TEXT)["input_ids"] == ids == list(TEXT.encode())  # the bytes tokenizer
    assert auto.eos_token_id == tokenizer.eod_id == 256
    x = torch.tensor([ids])
    with torch.no_grad():
        got, want = exported(x).logits, ours(x)
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    # init_from that tp2 x pp2 checkpoint in one process: step-0 loss == the merged model's
    cfg = tiny_config(str(tmp_path / "run1"), data_cache, "--model.family=llama",
                      "--model.num_kv_heads=2", "--model.ffn_hidden_size=96",
                      "--model.rope_theta=500", ROPE_FLAG, "--train.steps=1",
                      "--train.warmup_steps=0", "--train.eval_iters=1",
                      f"--checkpoint.init_from={run}")
    trainer, result = train(cfg, distributed=False)
    with torch.no_grad():
        mb = trainer.micro_batches(0)
        logits = torch.cat([ours(b["tokens"]) for b in mb])
    ref = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), torch.cat([b["labels"] for b in mb]).flatten()).item()
    assert abs(result.losses[0] - ref) < ATOL, (result.losses[0], ref)

    # bf16 export, then import back: the fp32 weights round-trip exactly through fp32 files
    assert cli(["convert", "--to", "hf", run, str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    back = str(tmp_path / "ckpt_back")
    assert cli(["convert", "--from", "hf", out, back]) == 0
    _, before, _ = load_full_model_state(run)
    _, after, tok_file = load_full_model_state(back)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert os.path.isfile(os.path.join(os.path.dirname(tok_file), "tokenizer_config.json"))


def _bpe_tokenizer_file(path: str) -> str:
    from megalite.data.tokenizer import train_tokenizer

    texts = [f"def fn_{i}(a, b):\n    return a * {i} + b  # é\n" for i in range(200)]
    tok = train_tokenizer("bpe:300", texts)
    tok.save(path)
    return path


def test_gpt2_export_import_with_bpe_tokenizer_and_chat_template(tmp_path: Any) -> None:
    """GPT-2 (tied: the head is not written, as HF does; Conv1D transposes; fused c_attn) with
    a trained BPE tokenizer; an imported tokenizer_config (chat template) survives a round trip."""
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, initializer_range=0.2)
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = from_hf(hf).eval()
    tok_file = _bpe_tokenizer_file(str(tmp_path / "tokenizer.json"))
    save_full_model_state(str(tmp_path / "ckpt"), ours.args, dict(ours.named_parameters()),
                          tok_file)
    out = str(tmp_path / "hf")
    export_hf(str(tmp_path / "ckpt"), out)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert "lm_head.weight" not in index["weight_map"]
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    from megalite.data import load_tokenizer

    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto(TEXT)["input_ids"] == load_tokenizer(tok_file).encode(TEXT)
    # import keeps the tokenizer's config (chat template, special tokens) for the export
    tcfg = json.load(open(os.path.join(out, "tokenizer_config.json")))
    tcfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    json.dump(tcfg, open(os.path.join(out, "tokenizer_config.json"), "w"))
    assert cli(["convert", "--from", "hf", out, str(tmp_path / "back")]) == 0
    assert cli(["convert", "--to", "hf", str(tmp_path / "back"), str(tmp_path / "again")]) == 0
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "again"))
    assert again.chat_template == tcfg["chat_template"]
    assert again(TEXT)["input_ids"] == auto(TEXT)["input_ids"]


class _Exec:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_inputs_are_one_line_and_never_run_code(tmp_path: Any, capsys: Any) -> None:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16))
    ours = from_hf(hf)
    ckpt = str(tmp_path / "ckpt")
    step = save_full_model_state(ckpt, ours.args, dict(ours.named_parameters()))
    shard = os.path.join(step, "model_tp00_pp00.pt")
    good = open(shard, "rb").read()

    def fails(argv, *needles):
        capsys.readouterr()
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        for needle in needles:
            assert needle in err, err

    marker = tmp_path / "pwned"
    torch.save({"model": _Exec(str(marker)), "step": 0}, shard)
    fails(["convert", "--to", "hf", ckpt, str(tmp_path / "o1")], shard)
    assert not marker.exists()
    open(shard, "wb").write(good[: len(good) // 2])
    fails(["convert", "--to", "hf", ckpt, str(tmp_path / "o2")], shard)
    os.remove(shard)
    fails(["convert", "--to", "hf", ckpt, str(tmp_path / "o3")], shard, "missing")
    fails(["convert", "--to", "hf", str(tmp_path / "nothing"), str(tmp_path / "o4")],
          "no checkpoint")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())

    pickled = tmp_path / "pickled_hf"  # an HF directory holding only a pickle
    hf.save_pretrained(str(pickled), safe_serialization=False)
    for f in pickled.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            f.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    fails(["convert", "--from", "hf", str(pickled), str(tmp_path / "c1")], "pickle",
          "safe_serialization=True")

    # init_from into another model names every differing field and the ways out
    from megalite.interop.init_from import InitFromError, initial_values

    hf.save_pretrained(str(tmp_path / "hf"))
    import shutil

    damaged = tmp_path / "damaged_hf"  # a weights file cut short: named before any is used
    shutil.copytree(tmp_path / "hf", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    fails(["convert", "--from", "hf", str(damaged), str(tmp_path / "c2")], str(weights))
    other = type(ours.args)(**{**ours.args.__dict__, "hidden_size": 32, "num_layers": 2})
    with pytest.raises(InitFromError, match=r"model.num_layers=2 \(source: 1\), "
                                            r"model.hidden_size=32 \(source: 16\).*drop"):
        initial_values(f"hf:{tmp_path / 'hf'}", other)
    # resume compares by the same list (and the classes): a record written before num_labels
    # and rope_scaling existed is the same model; a position table is llama's only exception
    from dataclasses import asdict

    from megalite.models import model_differences, same_model_fields

    source = dict(asdict(ours.args), family="gpt")
    older = {k: v for k, v in source.items() if k not in ("num_labels", "rope_scaling")}
    assert model_differences(older, dict(source, max_seq_len=99), ("num_labels",)) == [
        ("max_seq_len", source["max_seq_len"], 99)]
    assert "max_seq_len" not in same_model_fields("llama")
    assert "tie_embeddings" not in same_model_fields("bert", num_labels=2)

    ours.shard_layout = type("Layout", (), {"tp_size": 2})()  # one TP rank's part
    with pytest.raises(ValueError, match="convert --to hf"):
        to_hf(ours)


@pytest.mark.slow
def test_transformers_4_46_reads_the_rope_config(tmp_path: Any) -> None:
    """transformers 4.x reads top-level rope_theta/rope_scaling (it ignores rope_parameters
    and would silently use theta 10000): load the exported config.json with 4.46's config class
    in a throw-away venv (installed from the local package index; about 20 s)."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, rope_parameters=ROPE))
    ours = from_hf(hf)
    save_full_model_state(str(tmp_path / "ckpt"), ours.args, dict(ours.named_parameters()))
    out = export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q",
         "--disable-pip-version-check", "transformers==4.46.*"],
        capture_output=True, text=True, timeout=60)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = ("import json, sys, transformers; c = transformers.AutoConfig.from_pretrained("
             "sys.argv[1]); print(json.dumps([transformers.__version__, type(c).__name__, "
             "c.rope_theta, c.rope_scaling]))")
    done = subprocess.run([python, "-c", probe, out], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    version, cls, theta, scaling = json.loads(done.stdout.strip().splitlines()[-1])
    assert version.startswith("4.46.") and cls == "LlamaConfig"
    assert theta == 500.0
    assert {k: scaling[k] for k in ROPE if k != "rope_theta"} == \
        {k: v for k, v in ROPE.items() if k != "rope_theta"}
