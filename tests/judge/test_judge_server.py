"""The whole path against a real `transformers serve` judge: generation, grading, pairwise, report, resume,
retries through a failing endpoint, and the preflight."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import judge_fixtures as jf
import pytest
from typer.testing import CliRunner

from flipcheck.cli import app
from flipcheck.judge.client import JudgeClient, JudgeSettings

# the judge fixtures, by name (a second conftest.py would shadow tests/conftest.py's `from conftest import`)
chat_tokenizer, chat_parent_dir, chat_children = jf.chat_tokenizer, jf.chat_parent_dir, jf.chat_children
judge_dir, judge_server, prompts_file, own_cache = jf.judge_dir, jf.judge_server, jf.prompts_file, jf.own_cache
free_port = jf.free_port
runner = CliRunner()


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res, res.output  # stdout and stderr together


def answer_files(cache: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (cache / "judge" / "answers").glob("*.json")}


def test_judge_command_end_to_end_and_resume(judge_server, chat_parent_dir, chat_children, prompts_file, tmp_path,
                                             monkeypatch):
    url, model = judge_server
    cache, out = tmp_path / "fc", tmp_path / "run"
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret-4242")
    args = ["judge", chat_parent_dir, *chat_children, "--prompts", prompts_file, "--judge-url", url, "--judge-model",
            model, "--max-new-tokens", "6", "--concurrency", "3", "--out", out, "--device", "cpu",
            "--judge-api-key-env", "MY_JUDGE_KEY"]
    res, text = invoke(*args)
    assert res.exit_code == 0, text
    rep = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in rep["children"]] == [str(c) for c in chat_children]
    for c in rep["children"]:
        j = c["judge"]
        s, p = j["single"], j["pairwise"]
        # the judge rates every answer 7/10 and always prefers whoever is shown first ([[A]]-style "A")
        assert s["parent_mean"] == 7.0 and s["child_mean"] == 7.0 and s["delta"] == 0.0 and s["delta_ci"] == [0.0, 0.0]
        assert s["n"] == 4 and s["answers"] == 4 and s["unparsed"] == {"parent": 0, "child": 0}
        assert set(s["per_category"]) == {"math", "writing"} and s["per_turn"]["2"]["n"] == 1
        assert (p["win"], p["tie"], p["loss"], p["inconsistent"]) == (0, 3, 0, 3)  # position bias cancelled
        assert j["grader_version"] and j["judge"]["model"] == model and j["judge"]["api_key_env"] == "MY_JUDGE_KEY"
    assert rep["judge_correlation"]["r_flips"] is None and "no flips or KL" in rep["judge_correlation"]["note"]
    # parent answered once, each child once: K children cost K+1 generations
    gens = answer_files(cache)
    assert len(gens) == 3
    # at most 4 parent ratings + 2 x (4 child ratings + 3 prompts x 2 orders); an identical grading prompt (a child
    # that answered like its parent) is asked once; each verdict is one cached file, plus 1 preflight request
    verdicts = list((cache / "judge" / "verdicts").rglob("*.json"))
    assert 4 + 4 + 6 <= rep["judge_run"]["answered"] == len(verdicts) <= 4 + 2 * (4 + 6)
    assert rep["judge_run"]["requests"] == 1 + len(verdicts)
    rows = [json.loads(line) for line in (out / "judge.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["parent_replies"][0] == "7/10" and rows[1]["pair_replies"] == ["A", "A"]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Judged answers" in md and "win rate" in page and "no flips or KL" in md
    # the key is never written: not to the run folder, not to the cache, not to the terminal
    written = [p for p in [*out.rglob("*"), *cache.rglob("*")] if p.is_file()]
    assert written and not [p for p in written if b"sk-test-secret-4242" in p.read_bytes()]
    assert "sk-test-secret-4242" not in text

    # a second run asks the judge nothing and generates nothing; everything is cached, so not even the preflight goes out
    res, text = invoke(*args)
    assert res.exit_code == 0, text
    again = json.loads((out / "report.json").read_text())
    assert again["judge_run"]["requests"] == 0 and again["judge_run"]["answered"] == 0
    assert answer_files(cache) == gens
    assert [c["judge"]["single"] for c in again["children"]] == [c["judge"]["single"] for c in rep["children"]]

    # the gate reads the judged report
    res, text = invoke("gate", out, "--min-judge-delta", "-0.5")
    assert res.exit_code == 0 and text.count("PASS") == 2, text
    res, text = invoke("gate", out, "--min-judge-delta", "0.5")
    assert res.exit_code == 1 and "FAIL" in text and "Δscore +0.00 < +0.50" in " ".join(text.split()), text
    res, text = invoke("gate", out, "--min-judge-delta", "5%")
    assert res.exit_code == 2 and "not a percentage" in text


class FlakyProxy(http.server.ThreadingHTTPServer):
    """A real HTTP proxy in front of the judge: answers `failures` (status codes) first, then forwards."""

    def __init__(self, target: str, failures: list[int]):
        self.target, self.failures, self.seen, self.lock = target, list(failures), [], threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        srv = self.server
        with srv.lock:
            code = srv.failures.pop(0) if srv.failures else None
        srv.seen.append(code or 200)
        if code is not None:
            payload = json.dumps({"error": {"message": f"injected {code}"}}).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        req = urllib.request.Request(srv.target.removesuffix("/v1") + self.path, data=body,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as err:
            status, data = err.code, err.read()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def proxy(judge_server):
    servers = []

    def make(failures):
        srv = FlakyProxy(judge_server[0], failures)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def test_retries_with_back_off_through_a_failing_endpoint(proxy, judge_server, tmp_path):
    srv = proxy([503, 429, 500])
    waits = []
    client = JudgeClient(JudgeSettings(url=srv.url, model=judge_server[1], backoff=0.01, retries=3),
                         cache_dir=tmp_path / "c", sleep=waits.append)
    v = client.ask("k1", "Rate it. Your rating:", {})
    assert v.reply == "7/10" and v.error is None
    assert srv.seen == [503, 429, 500, 200] and client.requests == 4
    assert len(waits) == 3 and waits[0] < waits[1] < waits[2]  # exponential back-off
    # cached: asking again goes nowhere
    assert client.ask("k1", "Rate it. Your rating:", {}).cached and client.requests == 4

    # retries exhausted: recorded as failed, not cached, not fatal
    srv2 = proxy([503, 503])
    client2 = JudgeClient(JudgeSettings(url=srv2.url, model=judge_server[1], backoff=0.0, retries=1),
                          cache_dir=tmp_path / "c2", sleep=lambda s: None)
    v = client2.ask("k2", "Your rating:", {})
    assert v.reply is None and "503" in v.error and srv2.seen == [503, 503]
    assert not list((tmp_path / "c2").rglob("*.json"))
    # a 4xx other than 429 is not retried
    srv3 = proxy([400])
    client3 = JudgeClient(JudgeSettings(url=srv3.url, model=judge_server[1], backoff=0.0), cache_dir=tmp_path / "c3")
    assert client3.ask("k3", "Your rating:", {}).error and srv3.seen == [400]


def test_preflight_fails_before_any_generation(judge_server, chat_parent_dir, chat_children, prompts_file, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    res, text = invoke("judge", chat_parent_dir, chat_children[0], "--prompts", prompts_file, "--judge-url", dead,
                       "--judge-model", "x")
    assert res.exit_code == 2 and "unreachable" in text and len(text.strip().splitlines()) == 1, text
    res, text = invoke("judge", chat_parent_dir, chat_children[0], "--prompts", prompts_file, "--judge-url",
                       judge_server[0], "--judge-model", "no/such-model")
    assert res.exit_code == 2 and "no/such-model" in text and "HTTP 400" in text, text
    assert not (tmp_path / "fc" / "judge" / "answers").exists()  # nothing was generated
    res, text = invoke("judge", chat_parent_dir, chat_children[0], "--judge-url", "localhost:8000", "--judge-model", "m")
    assert res.exit_code == 2 and "expected an http(s) URL" in text
    res, text = invoke("judge", chat_parent_dir, chat_children[0], "--judge-url", dead, "--judge-model", "m", "--mode", "x")
    assert res.exit_code == 2 and "allowed are single, pairwise, both" in text


def _without_run_stamps(report: dict) -> dict:
    """The report less what describes this run rather than its results: the time, and the judge traffic
    (requests made, verdicts answered from the cache)."""
    children = [{**c, "judge": {k: v for k, v in c["judge"].items() if k != "verdicts"}} for c in report["children"]]
    return {**{k: v for k, v in report.items() if k not in ("created", "judge_run")}, "children": children}


def test_a_fully_cached_rerun_needs_no_judge(judge_dir, chat_parent_dir, chat_children, prompts_file, tmp_path):
    """Run with a judge, stop the judge, run again: the same report from the cache, exit 0. With one verdict
    missing, the stopped judge is reported by the preflight (one line, exit 2) before any work."""
    out = tmp_path / "run"
    with jf.serve_judge(judge_dir, tmp_path / "serve.log") as (url, model):
        args = ["judge", chat_parent_dir, chat_children[0], "--prompts", prompts_file, "--judge-url", url,
                "--judge-model", model, "--max-new-tokens", "4", "--out", out, "--device", "cpu"]
        res, text = invoke(*args)
        assert res.exit_code == 0, text
    first = json.loads((out / "report.json").read_text())
    first_rows = (out / "judge.jsonl").read_text()
    assert first["judge_run"]["requests"] == 1 + first["judge_run"]["answered"]  # the preflight, then the verdicts
    with pytest.raises(OSError):  # the server is gone: its port refuses connections
        urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2)

    res, text = invoke(*args)
    assert res.exit_code == 0, text
    again = json.loads((out / "report.json").read_text())
    assert _without_run_stamps(again) == _without_run_stamps(first)
    assert again["judge_run"]["requests"] == 0 and again["judge_run"]["answered"] == 0
    assert again["children"][0]["judge"]["verdicts"]["from_cache"] == again["children"][0]["judge"]["verdicts"]["asked"]
    assert (out / "judge.jsonl").read_text() == first_rows

    verdicts = sorted((tmp_path / "fc" / "judge" / "verdicts").rglob("*.json"))
    verdicts[0].unlink()  # one verdict to ask: the judge is needed, and it is down
    res, text = invoke(*args)
    assert res.exit_code == 2 and "unreachable" in text and len(text.strip().splitlines()) == 1, text


def test_pairwise_only_mode(judge_server, chat_parent_dir, chat_children, prompts_file, tmp_path):
    url, model = judge_server
    out = tmp_path / "run"
    res, text = invoke("judge", chat_parent_dir, chat_children[1], "--prompts", prompts_file, "--judge-url", url,
                       "--judge-model", model, "--max-new-tokens", "4", "--mode", "pairwise", "--limit", "2",
                       "--out", out, "--device", "cpu")
    assert res.exit_code == 0, text
    j = json.loads((out / "report.json").read_text())["children"][0]["judge"]
    assert "single" not in j and j["mode"] == "pairwise" and j["prompts"]["n"] == 2
    assert (j["pairwise"]["n"], j["pairwise"]["tie"]) == (2, 2)
    res, text = invoke("gate", out, "--min-judge-delta", "0")
    assert res.exit_code == 0 and "net win rate +0.00 >= +0.00" in " ".join(text.split()), text
