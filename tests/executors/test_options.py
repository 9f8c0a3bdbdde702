"""Executor options and their errors (no cluster needed): bad values exit 2 with one line, a missing
Ray says how to install it, shards split whole tasks, failed children reach the gate."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from flipcheck.cli import app
from flipcheck.errors import FlipcheckError
from flipcheck.executors import ExecutorOptions, failed_entry, finish_report
from flipcheck.executors.shards import split_units


@pytest.mark.parametrize("args, message", [
    (["--executor", "dask"], "--executor 'dask': allowed are local, ray"),
    (["--executor", "ray", "--shards", "0"], "--shards 0: must be >= 1"),
    (["--shards", "2"], "need --executor ray"),
    (["--executor", "ray", "--cpus-per-child", "-1"], "--cpus-per-child -1.0: must be >= 0"),
])
def test_bad_executor_options_exit_2_with_one_line(tmp_path, args, message):
    res = CliRunner().invoke(app, ["sweep", "demo", "-m", "noise", "-g", "sigma=0.1", "--out", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_without_ray_installed_the_error_says_how_to_install(monkeypatch):
    from flipcheck.executors.ray_exec import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what Python does for a package that is not installed
    with pytest.raises(FlipcheckError, match=r"pip install 'flipcheck\[ray\]'"):
        import_ray()


def test_shards_deal_whole_tasks_round_robin():
    assert split_units(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert split_units(["a", "b"], 5) == [["a"], ["b"]]  # never an empty shard
    assert split_units(["a"], 1) == [["a"]]


def test_a_failed_child_fails_the_gate_and_is_one_line():
    from flipcheck.gate import run_gate

    entry = failed_entry("wanda 0.9", "RuntimeError: boom\n  at line 3", attempts=2)
    assert entry == {"name": "wanda 0.9", "status": "failed", "reason": "RuntimeError: boom", "attempts": 2}
    report = finish_report({"schema": "flipcheck.report", "version": 1, "children": []}, [entry], {"name": "ray"})
    lines: list[str] = []
    assert run_gate(report, max_flips="5%", echo=lines.append) is False
    assert lines == ["FAIL wanda 0.9: not evaluated, the child failed (RuntimeError: boom)"]


def test_options_default_to_local():
    assert ExecutorOptions().name == "local"
    with pytest.raises(FlipcheckError, match="needs --gpus-per-child"):
        ExecutorOptions("ray", cpus_per_child=0)
