"""vLLM as a scoring engine, against the real vLLM (its CPU build), never a mock.

vLLM pins compressed-tensors and FastAPI versions that llm-compressor and the test tools exclude, so it
lives in its own venv (``make vllm``: ``.venv-vllm``, flipcheck installed there without the ``compress``
extra). These tests run flipcheck *in that venv* for the in-process engine, as a user of
``pip install "flipcheck[vllm]"`` would, and start vLLM's OpenAI-compatible server from it for the served
child, which flipcheck in this venv scores over HTTP. The model is the tiny Llama of the other tests
(head_dim 32: vLLM's CPU attention refuses 16).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TASKS = "tiny_letters,tiny_sentences,tiny_sums"
API_KEY = "fc-test-key-7d1e"  # the served child's key: from the environment only, never in a report


def _vllm_python() -> Path:
    path = Path(os.environ.get("FLIPCHECK_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: `make test` builds the vLLM venv (make vllm)")
        pytest.skip(f"no vLLM venv at {path}: run `make vllm`")
    return path


def _env(cache: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FLIPCHECK_API_KEY", "OPENAI_API_KEY", "HF_HUB_CACHE")}
    env.update({"FLIPCHECK_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "COLUMNS": "200"})
    env.update(extra)
    return env


def _flipcheck(python: Path, args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [str(python), "-c", "from flipcheck.cli import app; app()", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _samples(out: Path) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {(r["task"], r["doc_id"]): r for r in rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def noisy_child(tiny_model_dir, tmp_path_factory) -> Path:
    """A noise child of the tiny model (sigma 1.0: some answers change)."""
    from flipcheck.compressors.pipeline import compress

    out = tmp_path_factory.mktemp("vllm_child") / "child"
    compress(str(tiny_model_dir), [("noise", {"sigma": 1.0, "seed": 3})], out=out)
    return out


def test_vllm_engine_floor(tiny_model_dir, task_dir, tmp_path):
    """The same weights on vLLM (in process) and on transformers: identical answers and generations,
    option log-likelihoods within 1e-4, vocabulary KL <= 1e-5, also as the report's engine-floor row.
    The model is named by a hub id, resolved offline from a local Hugging Face cache, as a user's is."""
    from test_hub import put_in_hub_cache

    python = _vllm_python()
    hf = tmp_path / "hf"
    put_in_hub_cache(hf, "acme/tiny-llama", tiny_model_dir)
    out = tmp_path / "out"
    res = _flipcheck(python, ["eval", "acme/tiny-llama", "acme/tiny-llama", "--parent-engine", "vllm",
                              "--child-engine", "transformers", "--kl", "exact", "--engine-floor",
                              "--tasks", TASKS, "--include-path", task_dir, "--out", out],
                     _env(tmp_path / "cache", HF_HOME=str(hf)))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["parent"]["source"] == "acme/tiny-llama" and report["parent"]["revision"]
    assert report["parent"]["engine"]["name"] == "vllm" and report["parent"]["engine"]["logprobs"] == "all"
    child = report["children"][0]
    assert child["engine"]["name"] == "transformers"
    micro = child["micro"]
    assert micro["flips"] == 0 and micro["answer_changes"] == 0
    assert micro["kl_vocab"]["mean"] <= 1e-5
    gaps = [np.max(np.abs(np.subtract(r["ll_P"], r["ll_C"]))) for r in _samples(out).values() if r.get("ll_P")]
    assert len(gaps) == 40 and max(gaps) <= 1e-4
    generated = [r for r in _samples(out).values() if r["kind"] != "multiple_choice"]
    assert len(generated) == 12 and all(r["output_P"] == r["output_C"] for r in generated)
    # divergence over generations: vLLM's greedy generations equal transformers' token for token
    assert all(r["generation"]["first_divergent_token"] is None for r in generated)
    gen = child["tasks"]["tiny_sums"]["generation"]
    assert gen["identical"] == 1.0 and set(gen["survival"]) == {1.0} and gen["tf_mismatch"] == 0.0
    floor = report["noise_floor"]
    (row,) = [f for f in floor if "engine" in str(f.get("settings"))]
    assert row["engine"]["name"] == "transformers" and row["micro"]["flips"] == 0
    assert row["micro"]["kl_vocab"]["mean"] <= 1e-5
    assert row["tasks"]["tiny_sums"]["generation"]["identical"] == 1.0  # the engine floor gets the same rows


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 420) -> None:
    deadline = time.time() + timeout
    req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"the vLLM server did not come up in {timeout:.0f} s: {log.read_text()[-2000:]}")


def test_served_child_matches_in_process_vllm(tiny_model_dir, noisy_child, task_dir, tmp_path):
    """A child behind vLLM's OpenAI-compatible server: the same flips and option log-likelihoods as
    in-process vLLM; a server that is down is one line and exit 2; a re-run comes from the cache with
    the server down; the API key is read from the environment and written nowhere."""
    python = _vllm_python()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    server_cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(noisy_child),
                  "--served-model-name", "noisy", "--dtype", "float32", "--max-logprobs", "-1",
                  "--max-model-len", "512", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
                  "--kv-cache-memory-bytes", str(1 << 30), "--api-key", API_KEY]
    with log.open("w") as fh:
        server = subprocess.Popen(server_cmd, env=_env(tmp_path / "server-cache"), stdout=fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    here = Path(sys.executable)
    cache = tmp_path / "cache"
    served_args = ["eval", tiny_model_dir, "--child-url", url, "--child-model", "noisy", "--tasks", TASKS,
                   "--include-path", task_dir]
    try:
        _wait_ready(server, url, log)
        served = _flipcheck(here, [*served_args, "--out", tmp_path / "served"], _env(cache, FLIPCHECK_API_KEY=API_KEY))
        assert served.returncode == 0, served.stderr[-3000:]

        # a served parent (PARENT gives the tokenizer) against the same weights here on transformers
        sp = _flipcheck(here, ["eval", noisy_child, noisy_child, "--parent-url", url, "--parent-model", "noisy",
                               "--tasks", TASKS, "--include-path", task_dir, "--out", tmp_path / "served-parent"],
                        _env(tmp_path / "cache-sp", OPENAI_API_KEY=API_KEY))
        assert sp.returncode == 0, sp.stderr[-3000:]
        rep_sp = json.loads((tmp_path / "served-parent" / "report.json").read_text())
        assert rep_sp["parent"]["engine"]["name"] == "served" and rep_sp["children"][0]["engine"]["name"] == "transformers"
        assert rep_sp["children"][0]["micro"]["answer_changes"] == 0
        assert rep_sp["children"][0]["micro"]["kl_vocab"]["mean"] <= 1e-5
        gaps = [np.max(np.abs(np.subtract(r["ll_P"], r["ll_C"]))) for r in _samples(tmp_path / "served-parent").values()
                if r.get("ll_P")]
        assert len(gaps) == 40 and max(gaps) <= 1e-4

        # the echo + logprobs way (what a server without prompt_logprobs offers) gives the same option scores
        from flipcheck.evaluation.engines.served import ServedEngine

        os.environ["FLIPCHECK_API_KEY"] = API_KEY
        try:
            eng = ServedEngine(url, "noisy", topk=16)
            eng.bind(384)
            eng.connect()
            assert eng.mode == "prompt_logprobs"
            seqs = [[1, 40, 41, 42, 43], [1, 50, 51]]
            pos = [[2, 3, 4], [1, 2]]
            targets = [{4: [7, 300]}, {2: [9]}]
            sparse = eng.rows_at(seqs, pos, targets)
            eng.mode = "echo"
            echo = eng.rows_at(seqs, pos, targets)
            eng.close()
        finally:
            os.environ.pop("FLIPCHECK_API_KEY", None)
        for s_rows, e_rows, seq, ps, tg in zip(sparse, echo, seqs, pos, targets, strict=True):
            for j, p in enumerate(ps):
                for t in tg.get(p, [seq[p + 1]] if p + 1 < len(seq) else []):
                    assert abs(float(s_rows[j, t]) - float(e_rows[j, t])) <= 1e-4
                assert abs(float(torch.logsumexp(s_rows[j], 0))) <= 1e-4  # each row is a distribution
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)

    # in process on vLLM (its venv), the same child: same answers, same option log-likelihoods
    inproc = _flipcheck(python, ["eval", tiny_model_dir, noisy_child, "--engine", "vllm", "--tasks", TASKS,
                                 "--include-path", task_dir, "--out", tmp_path / "inproc"], _env(tmp_path / "cache-vllm"))
    assert inproc.returncode == 0, inproc.stderr[-3000:]
    a, b = _samples(tmp_path / "served"), _samples(tmp_path / "inproc")
    assert a.keys() == b.keys() and len(a) == 52
    for key, row in a.items():
        assert row["pred_C"] == b[key]["pred_C"] and row["correct_C"] == b[key]["correct_C"], key
        assert row["output_C"] == b[key]["output_C"], key
        if row.get("generation"):  # the served child's generations diverge where in-process vLLM's do
            assert row["generation"]["first_divergent_token"] == b[key]["generation"]["first_divergent_token"], key
        if row.get("ll_C"):
            assert np.max(np.abs(np.subtract(row["ll_C"], b[key]["ll_C"]))) <= 1e-4, key
    rep_a = json.loads((tmp_path / "served" / "report.json").read_text())
    rep_b = json.loads((tmp_path / "inproc" / "report.json").read_text())
    assert rep_a["children"][0]["micro"]["flips"] == rep_b["children"][0]["micro"]["flips"]
    assert rep_a["children"][0]["micro"]["answer_changes"] > 0  # the noise changes answers: the comparison means something
    assert rep_a["kl_method"]["name"] == "topk_bound" and rep_a["children"][0]["engine"]["url"] == f"{url}/v1"
    for f in (tmp_path / "served").iterdir():
        assert API_KEY not in f.read_text(errors="replace"), f.name

    # the server is down now: a new served child fails in one line; the cached one is served from the cache
    down = _flipcheck(here, ["eval", tiny_model_dir, "--child-url", f"http://127.0.0.1:{_free_port()}", "--child-model",
                             "noisy", "--tasks", TASKS, "--include-path", task_dir], _env(cache))
    assert down.returncode == 2
    lines = [ln for ln in down.stderr.splitlines() if ln.strip().startswith("error:")]
    assert len(lines) == 1 and "cannot reach the server" in lines[0], down.stderr[-2000:]
    again = _flipcheck(here, [*served_args, "--out", tmp_path / "again"], _env(cache))
    assert again.returncode == 0, again.stderr[-3000:]
    rep_c = json.loads((tmp_path / "again" / "report.json").read_text())
    assert rep_c["children"][0]["micro"] == rep_a["children"][0]["micro"]


def test_request_kwargs_ask_only_what_is_read():
    """A sequence read only after its last token asks for no prompt rows (the sample side holds that
    distribution); one read inside asks for the prompt side and no sample side; both when both."""
    from flipcheck.evaluation.engines.vllm import request_kwargs

    assert request_kwargs(6, [5]) == {"prompt_logprobs": None, "logprobs": -1}
    assert request_kwargs(6, [2, 3, 4]) == {"prompt_logprobs": -1, "logprobs": None}
    assert request_kwargs(6, [0, 5]) == {"prompt_logprobs": -1, "logprobs": -1}
    assert request_kwargs(6, []) == {"prompt_logprobs": None, "logprobs": None}


_SORT_FREE_SCRIPT = r"""
import sys
import numpy as np
import torch
from flipcheck.evaluation.engines import vllm_hooks
from flipcheck.evaluation.engines.vllm import VllmEngine
from flipcheck.evaluation.forward import ScoreSetup, score_items

eng = VllmEngine(sys.argv[1], dtype="float32", max_model_len=512, device="cpu")
assert eng.sort_free, "the unsorted gather hook is not in place"
g = torch.Generator().manual_seed(0)
ctx = [torch.randint(5, 380, (n,), generator=g).tolist() for n in (40, 57, 23)]
# options of several tokens after one context each (read inside the prompt), and letters (read
# after the last token: the sample side); one shared long context, as packed options have
multi = [(c, torch.randint(5, 380, (k,), generator=g).tolist()) for c in ctx for k in (1, 3, 4)]
letters = [(c, [t]) for c in ctx for t in (7, 8, 9, 10)]


def run(sort_free):
    eng.sort_free = sort_free
    before = vllm_hooks.UNSORTED_ROWS[0]
    setup = ScoreSetup(runner=eng.runner(), max_length=512, pack=False, window=None, pad_id=0, batch_size=4,
                       topk=16, tail_samples=8)
    out = {}
    for name, items in (("multi", multi), ("letters", letters)):
        parent = score_items(setup, items)
        ref = [(s.own.topk_logp, s.own.topk_ids, s.own.tail_logp, s.own.tail_ids) for s in parent]
        out[name] = (parent, score_items(setup, items, ref_topk=ref))
    seqs = [c + [11, 12, 13] for c in ctx]
    rows = eng.rows_at(seqs, [[0, 5, len(s) - 2, len(s) - 1] for s in seqs])
    return out, rows, vllm_hooks.UNSORTED_ROWS[0] - before


fast, fast_rows, unsorted = run(True)
slow, slow_rows, unsorted_slow = run(False)
assert unsorted > 0 and unsorted_slow == 0, (unsorted, unsorted_slow)
for a, b in zip(fast_rows, slow_rows, strict=True):
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and float((a.logsumexp(-1)).abs().max()) <= 1e-5  # whole distributions
for name in fast:
    for pf, ps in zip(*(fast[name][0], slow[name][0]), strict=True):
        for f in ("token_logp", "argmax", "topk_logp", "topk_ids", "nonfinite", "tail_logp", "tail_ids"):
            assert np.array_equal(getattr(pf.own, f), getattr(ps.own, f)), (name, f)
    for cf, cs in zip(fast[name][1], slow[name][1], strict=True):
        assert np.array_equal(cf.own.token_logp, cs.own.token_logp) and np.array_equal(cf.agree, cs.agree), name
        assert np.array_equal(cf.kl, cs.kl) and np.array_equal(cf.kl_rev, cs.kl_rev), name
        assert float(np.abs(cf.kl).max()) <= 1e-4  # the same model against itself
eng.close()
print("sort-free rows equal")
"""


def test_sort_free_rows_equal_sorted_rows(tiny_model_dir, tmp_path):
    """vLLM's whole-vocabulary prompt rows in token order (vllm_hooks.unsorted_gather, no sort) give the
    same rows and the same figures, bit for bit, as vLLM's sorted rows: options of several tokens (the
    prompt side) and letters (the sample side), every Side field and the KL both ways; and the hook
    really gave the rows (counted) only while on."""
    python = _vllm_python()
    res = subprocess.run([str(python), "-c", _SORT_FREE_SCRIPT, str(tiny_model_dir)], env=_env(tmp_path / "cache"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "sort-free rows equal" in res.stdout, res.stderr[-3000:]
