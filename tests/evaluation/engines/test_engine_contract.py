"""Every registered engine through the same contract (tests/engine_contract.py), table-driven: a new
engine fails here until it has a row, and a row fails when its engine breaks the contract."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from engine_contract import check
from fakes.sequence_engine import SequenceEngine  # registers the fake engine ("one-sequence")
from flipcheck.evaluation.engines import register_engine, registered_engines

REPO = Path(__file__).resolve().parents[3]

# engine -> the source it opens, built from the tiny model's folder ("folder") or its float32 GGUF ("gguf")
CASES = {"transformers": "folder", "llama.cpp": "gguf", "one-sequence": "folder", "vllm": "folder (vLLM's venv)"}
# registered, but not opened from a model source: the contract is run elsewhere, against the real thing
ELSEWHERE = {"served": "a URL, not a source: tests/evaluation/test_vllm.py scores a child served by a real vLLM "
                       "server against in-process vLLM (same flips, log-likelihoods within 1e-4)"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model, tiny_tokenizer, tiny_model_dir) -> dict[str, Path]:
    pytest.importorskip("llama_cpp", reason="the llama.cpp row needs flipcheck[llamacpp] (make test installs it)")
    from flipcheck.compressors.gguf_convert import write_gguf

    folder = tmp_path_factory.mktemp("contract_gguf")
    tiny_tokenizer.save_pretrained(folder)
    return {"folder": tiny_model_dir, "gguf": write_gguf(tiny_model, tiny_tokenizer, folder / "tiny-F32.gguf")}


def test_every_registered_engine_has_a_row():
    assert set(registered_engines()) == set(CASES) | set(ELSEWHERE), set(registered_engines()) ^ (set(CASES) | set(ELSEWHERE))


@pytest.mark.parametrize("name", [n for n in CASES if n != "vllm"])
def test_engine_keeps_the_contract(name, sources, tiny_model_dir):
    assert check(name, sources[CASES[name]], tiny_model_dir) == []


def test_vllm_keeps_the_contract(tiny_model_dir):
    python = Path(os.environ.get("FLIPCHECK_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
    if not python.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{python} is missing: `make test` builds the vLLM venv (make vllm)")
        pytest.skip(f"no vLLM venv at {python}: run `make vllm`")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO / "tests")})
    res = subprocess.run([str(python), str(REPO / "tests" / "engine_contract.py"), "vllm", str(tiny_model_dir)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


class _Broken(SequenceEngine):
    """The fake engine with three faults the contract must see."""

    name = "broken-contract"
    capabilities = frozenset({"exact", "topk", "generates"})

    def identity(self):
        return {**super().identity(), "name": "something-else"}

    def generate(self, ctxs, max_new, stop_fn, eos_ids):
        return [[0] * max_new for _ in ctxs]

    def window_log_probs(self, ids, start, stop):
        logits, device = super().window_log_probs(ids, start, stop)
        return logits + torch.linspace(0, 1, logits.shape[-1]), device


def test_the_contract_finds_a_broken_engine(tiny_model_dir):
    from flipcheck.evaluation.engines import registry

    register_engine(_Broken, selectable=False)
    try:
        problems = " | ".join(check("broken-contract", tiny_model_dir, tiny_model_dir))
    finally:
        registry._ENGINES.pop("broken-contract")
    for needle in ("either the whole distribution", "identity name", "window log-probs differ", "greedy continuation"):
        assert needle in problems, (needle, problems)
