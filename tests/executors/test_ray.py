"""--executor ray against a real 2-CPU Ray head on 127.0.0.1: the answers equal the local executor's,
the parent is scored once, evaluation shards merge to the one-process report, a failing child is
retried once then reported, and an interrupted sweep resumes."""

from __future__ import annotations

import json
import math

import pytest
import ray_cluster

from flipcheck.evaluation import runner
from flipcheck.executors import ExecutorOptions
from flipcheck.models import save_model
from flipcheck.orchestrate.recipe import sweep
from flipcheck.recipes.runner import slug

pytest.importorskip("ray")
ray_address = ray_cluster.ray_address  # the session fixture (not in a conftest.py, which would shadow tests/conftest.py)

TASKS = ["tiny_letters", "tiny_sentences"]
GRID = {"sigma": [0.05, 0.1, 0.2]}
KEYS = ("child", "task", "doc_id", "gold", "pred_P", "pred_C", "correct_P", "correct_C")


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    out = tmp_path_factory.mktemp("ray_parent") / "parent"
    save_model(tiny_model, tiny_tokenizer, out, {"parent": None})
    return out


def _sweep(parent_dir, task_dir, root, executor=None, progress=None):
    return sweep(str(parent_dir), "noise", GRID, tasks=TASKS, include_path=str(task_dir), out=root / "run",
                 cache_dir=root / "cache", batch_size=8, executor=executor, progress=progress)


@pytest.fixture(scope="module")
def local_run(parent_dir, task_dir, tmp_path_factory):
    """The same sweep in one process (the local executor): the reference every Ray run must equal."""
    root = tmp_path_factory.mktemp("local")
    report = _sweep(parent_dir, task_dir, root)
    return report, _rows(root / "run")


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def _assert_same_answers(rows_a: list[dict], rows_b: list[dict]) -> None:
    assert len(rows_a) == len(rows_b) > 0
    for a, b in zip(rows_a, rows_b, strict=True):
        assert {k: a.get(k) for k in KEYS} == {k: b.get(k) for k in KEYS}
        for k in ("kl_options", "kl_vocab"):
            if a.get(k) is None:
                assert b.get(k) is None
            else:
                assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])


def test_ray_sweep_equals_local_and_scores_the_parent_once(ray_address, parent_dir, task_dir, tmp_path, local_run):
    said: list[str] = []
    report = _sweep(parent_dir, task_dir, tmp_path, ExecutorOptions("ray", address=ray_address), said.append)
    local_report, local_rows = local_run
    assert [c["name"] for c in report["children"]] == [c["name"] for c in local_report["children"]]
    assert len(report["children"]) == 3 and report["failed"] == []
    _assert_same_answers(local_rows, _rows(tmp_path / "run"))
    # one parent pass per task, here in the driver; the three workers read it from the cache
    assert report["executor"]["parent_passes"] == len(TASKS) == local_report["executor"]["parent_passes"]
    assert report["executor"]["name"] == "ray" and report["executor"]["cpus_per_child"] == 1
    assert any(f"connected to the cluster at {ray_address}" in m for m in said)
    for c, lc in zip(report["children"], local_report["children"], strict=True):
        assert c["micro"]["flips"] == lc["micro"]["flips"]


def test_sharded_eval_equals_one_process(ray_address, parent_dir, task_dir, tmp_path, local_run, monkeypatch):
    """Two children on two tasks, each child's tasks split into 2 shards (4 Ray tasks); the driver
    scores only the parent, the merge reads the workers' entries, the report equals one process."""
    from flipcheck.orchestrate.evaluate import evaluate

    children = [c["source"] for c in local_run[0]["children"][:2]]  # two children the local sweep saved
    common = dict(tasks=TASKS, include_path=str(task_dir), batch_size=8)
    one = evaluate(str(parent_dir), children, out=tmp_path / "one", cache_dir=tmp_path / "c1", **common)

    driver_units: list[str] = []
    real = runner._lm_eval_samples

    def count(lm, unit, settings):  # counts scoring passes made in this (driver) process only
        driver_units.append(unit)
        return real(lm, unit, settings)

    monkeypatch.setattr(runner, "_lm_eval_samples", count)
    sharded = evaluate(str(parent_dir), children, out=tmp_path / "sharded", cache_dir=tmp_path / "c2",
                       executor=ExecutorOptions("ray", address=ray_address, shards=2), **common)
    assert sorted(driver_units) == sorted(TASKS)  # the parent, once per task; every child pass ran in a worker
    assert sharded["executor"]["shards"] == 2 and sharded["executor"]["parent_passes"] == len(TASKS)
    _assert_same_answers(_rows(tmp_path / "one"), _rows(tmp_path / "sharded"))
    for a, b in zip(one["children"], sharded["children"], strict=True):
        assert a["name"] == b["name"]
        for task in TASKS:
            assert a["tasks"][task]["flips"] == b["tasks"][task]["flips"]
            assert math.isclose(a["tasks"][task]["kl_options"]["mean"], b["tasks"][task]["kl_options"]["mean"],
                                rel_tol=1e-4, abs_tol=1e-7)


def test_failing_child_is_retried_once_then_reported_and_the_others_finish(ray_address, parent_dir, task_dir, tmp_path):
    """layer_drop n=2 on a 2-layer parent fails inside the method at run time (the model's depth is
    known only there); n=1 finishes. The CLI exits 3 and every report lists the failed child."""
    from typer.testing import CliRunner

    from flipcheck.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "sweep", str(parent_dir), "-m", "layer_drop", "-g", "n=1,2", "--tasks", "tiny_letters", "--include-path",
        str(task_dir), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8",
        "--executor", "ray", "--ray-address", ray_address,
    ])
    assert res.exit_code == 3, res.output
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["children"]] == ["layer_drop n=1"]
    [failed] = report["failed"]
    assert failed["name"] == "layer_drop n=2" and failed["status"] == "failed" and failed["attempts"] == 2
    assert "would drop every layer" in failed["reason"] and "\n" not in failed["reason"]
    assert "retrying once" in res.output
    for doc in ("report.md", "report.html"):
        assert "layer_drop n=2 FAILED after 2 attempt(s)" in (out / doc).read_text()


def test_interrupted_sweep_keeps_finished_children_and_resumes(ray_address, parent_dir, task_dir, tmp_path, local_run):
    """Ctrl-C (KeyboardInterrupt in the driver) after the first finished child cancels the running
    tasks; that child stays in the report and is not made again; the same call finishes the rest."""
    opts = ExecutorOptions("ray", address=ray_address)

    def interrupt(msg: str) -> None:
        if msg.endswith(": done"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sweep(parent_dir, task_dir, tmp_path, opts, interrupt)
    first = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(first["children"]) == 1
    [name] = [c["name"] for c in first["children"]]
    folder = tmp_path / "run" / "children" / slug(name)
    made = (folder / "flipcheck.json").stat().st_mtime_ns

    report = _sweep(parent_dir, task_dir, tmp_path, opts)
    assert len(report["children"]) == 3 and report["failed"] == []
    assert (folder / "flipcheck.json").stat().st_mtime_ns == made  # the finished child was not compressed again
    _assert_same_answers(local_run[1], _rows(tmp_path / "run"))


def _kill_first_running_task(prefix: str, timeout: float = 120.0) -> int | None:
    """SIGKILL the first process whose title is ``ray::PREFIX...`` (Ray titles a worker by the task it
    runs); returns its pid, or None when none showed up in time."""
    import os
    import signal
    import time
    from pathlib import Path

    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(f"ray::{prefix}"):
                os.kill(int(proc.name), signal.SIGKILL)
                return int(proc.name)
        time.sleep(0.2)
    return None


@pytest.mark.skipif(not __import__("pathlib").Path("/proc").is_dir(), reason="finds the worker through /proc")
def test_killed_worker_is_retried_and_sharded_sweep_point_equals_local(ray_address, parent_dir, task_dir, tmp_path,
                                                                        local_run):
    """A sweep point with --shards 2 (compress as one task, each task's scoring as another, merged in
    the driver) whose compressing worker is killed (SIGKILL) mid-task: Ray reports the crash, the task
    runs once more, the point finishes and its answers equal the local run's."""
    import threading

    killed: list[int | None] = []
    said: list[str] = []
    killers: list[threading.Thread] = []

    def progress(msg: str) -> None:
        said.append(msg)
        if msg.startswith("ray: ") and "children" in msg and not killers:  # submitted next: kill the first runner
            killers.append(threading.Thread(target=lambda: killed.append(_kill_first_running_task("flipcheck-compress"))))
            killers[0].start()

    report = sweep(str(parent_dir), "noise", {"sigma": [0.2]}, tasks=TASKS, include_path=str(task_dir),
                   out=tmp_path / "run", cache_dir=tmp_path / "cache", batch_size=8,
                   executor=ExecutorOptions("ray", address=ray_address, shards=2), progress=progress)
    killers[0].join(timeout=10)
    assert killed and killed[0] is not None
    assert any("compress task failed" in m and "retrying once" in m for m in said), said
    assert [c["name"] for c in report["children"]] == ["noise sigma=0.2"] and report["failed"] == []
    assert report["executor"]["shards"] == 2
    local = [r for r in local_run[1] if r["child"] == "noise sigma=0.2"]
    _assert_same_answers(local, _rows(tmp_path / "run"))


def test_search_on_ray_verifies_the_same_candidates_as_one_process(ray_address, parent_dir, task_dir, tmp_path):
    """`flipcheck search --executor ray`: each round's proposals are Ray tasks (compressed and scored on
    the workers, from separate caches); the candidates, their figures and the winner equal the local run's."""
    from typer.testing import CliRunner

    from flipcheck.cli import app

    def run(name: str, *extra: str) -> dict:
        res = CliRunner().invoke(app, [
            "search", str(parent_dir), "--method", "rtn", "--choices", "scheme=W4A16,W8A16,none", "--max-flips", "4%",
            "--tasks", ",".join(TASKS), "--include-path", str(task_dir), "--out", str(tmp_path / name),
            "--cache-dir", str(tmp_path / f"cache-{name}"), "--calibration", "demo", "--probe-windows", "2",
            "--probe-ctx", "32", "--batch-size", "8", "--per-round", "2", *extra])
        assert res.exit_code in (0, 1), res.output
        return json.loads((tmp_path / name / "report.json").read_text())["search"]

    local = run("local")
    on_ray = run("ray", "--executor", "ray", "--ray-address", ray_address)
    assert on_ray["cost"]["executor"] == "ray" and local["cost"]["executor"] == "local"
    assert on_ray["winner"] == local["winner"] and on_ray["failed"] == []
    key = lambda c: (c["name"], c["allocation"], c["passed"], c["size_bits"],  # noqa: E731
                     {t: (s["n_c2i"], s["n_i2c"]) for t, s in c["tasks"].items()})
    assert [key(c) for c in on_ray["candidates"]] == [key(c) for c in local["candidates"]]
    assert len(local["candidates"]) >= 2
