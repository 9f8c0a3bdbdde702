"""Fixtures of the judge tests (imported by name into each test module). A real judge: `transformers serve` on 127.0.0.1 serving a tiny model built here.

The judge is a 2-layer Llama rewired into a fixed bigram machine (attention and MLP outputs
zeroed, so each position sees only its own token; the LM head maps a few tokens to their
successors): a prompt ending in ":" (the single-grading prompt ends "Your rating:") gets "7/10",
one ending in "?" (the pairwise prompt ends "Your verdict?") gets "A". Its verdicts are
therefore known in advance, while everything between the client and the model is real: HTTP,
the OpenAI client, the chat template, generation in the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import corpus  # the shared test corpus (tests/conftest.py)
from flipcheck.tiny import build_llama, build_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
RAW_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the judge sees the grading prompt as is


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chat_tokenizer():
    tok = build_tokenizer(corpus(), vocab_size=384)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def chat_parent_dir(tmp_path_factory, chat_tokenizer) -> Path:
    """A tiny random chat model (the parent that answers)."""
    from flipcheck.models import save_model

    out = tmp_path_factory.mktemp("judge") / "parent"
    save_model(build_llama(len(chat_tokenizer), seed=0), chat_tokenizer, out, {"parent": None})
    return out


@pytest.fixture(scope="session")
def chat_children(tmp_path_factory, chat_parent_dir) -> list[Path]:
    """Two children of the parent: Gaussian weight noise sigma 0.05 and 0.5 (flipcheck's noise method)."""
    from flipcheck.compressors.pipeline import compress

    root = tmp_path_factory.mktemp("judge_children")
    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLIPCHECK_CACHE", str(root / "fc"))
        for sigma in (0.05, 0.5):
            res = compress(str(chat_parent_dir), [("noise", {"sigma": sigma})], out=root / f"noise{sigma}", device="cpu")
            out.append(Path(res.out))
    return out


def bigram_judge(tokenizer, chains: list[list[str]], seed: int = 1):
    """A tiny Llama whose greedy next token depends only on the current token, following `chains`."""
    model = build_llama(len(tokenizer), seed=seed)
    ids = [[tokenizer.convert_tokens_to_ids(t) for t in chain] for chain in chains]
    sources = list(dict.fromkeys(t for chain in ids for t in chain[:-1]))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for i, t in enumerate(sources):
            emb[t] = 0.0
            emb[t, i] = 4.0  # orthogonal: each source token lights one hidden unit
        for chain in ids:
            for t, u in zip(chain, chain[1:], strict=False):
                head[u, sources.index(t)] = 10.0
    return model


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory) -> Path:
    tok = build_tokenizer(corpus(), vocab_size=384)
    tok.chat_template = RAW_TEMPLATE
    model = bigram_judge(tok, [[":", "7", "/", "1", "0", "</s>"], ["?", "A", "</s>"]])
    out = tmp_path_factory.mktemp("judge_model") / "judge"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@contextlib.contextmanager
def serve_judge(judge_dir: Path, log: Path):
    """`transformers serve JUDGE_DIR` on a free 127.0.0.1 port while the block runs; yields (base URL, model name).
    Leaving the block stops the server (the port then refuses connections)."""
    exe = Path(sys.executable).with_name("transformers")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen([str(exe), "serve", str(judge_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32"], stdout=f, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base + "/v1", str(judge_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def judge_server(judge_dir, tmp_path_factory):
    """One judge server for the whole session; yields (base URL, model name)."""
    with serve_judge(judge_dir, tmp_path_factory.mktemp("serve") / "serve.log") as server:
        yield server


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    rows = [
        {"id": "p1", "category": "math", "turns": ["What is 2 + 3?"], "reference": ["5"]},
        {"id": "p2", "category": "writing", "turns": ["Describe a cat.", "Now a dog."]},
        {"question_id": 81, "category": "writing", "turns": ["Write one line about the sea."]},  # MT-Bench's shape
    ]
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPCHECK_CACHE", str(tmp_path / "fc"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
