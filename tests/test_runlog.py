"""A quiet terminal: `flipcheck eval` sends third-party warnings and progress bars to OUT/run.log
(real subprocess runs: the terminal is what a user sees); -v shows them."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from flipcheck.runlog import RUN_LOG, third_party_output

OWN_BARS = ("loglikelihood", "generate_until", "teacher forcing",  # flipcheck's own progress bars (evaluation/lm.py)
            "flipcheck eval")  # and the command's one progress view (progress.py)
THIRD_PARTY_MARKS = ("Applying quantization config", "Dispatching model", "Tokenizing inputs", "[transformers]",
                     "| INFO", "| WARNING")


@pytest.fixture(scope="module")
def rtn_child(tmp_path_factory, tiny_model_dir):
    """An llm-compressor child: loading it runs compressed-tensors' own tqdm bars."""
    from flipcheck.compressors.pipeline import compress

    out = tmp_path_factory.mktemp("runlog") / "rtn"
    compress(str(tiny_model_dir), [("rtn", {"scheme": "W8A16"})], out=out, device="cpu")
    return out


def _eval(parent, child, task_dir, tmp_path, *extra, cache="fc"):
    env = {**os.environ, "FLIPCHECK_CACHE": str(tmp_path / cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "COLUMNS": "100"}
    env.pop("TQDM_DISABLE", None)
    cmd = [sys.executable, "-c", "from flipcheck.cli import app; app()", "eval", str(parent), str(child),
           "--tasks", "tiny_letters,tiny_sums", "--include-path", str(task_dir), "--limit", "6", "--device", "cpu",
           "--batch-size", "8", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, res.stderr


def _lines(text: str) -> list[str]:
    return [x for x in re.split(r"[\r\n]", text) if x.strip()]


def test_eval_terminal_has_no_third_party_lines(tiny_model_dir, rtn_child, task_dir, tmp_path):
    out = tmp_path / "run"
    stdout, stderr = _eval(tiny_model_dir, rtn_child, task_dir, tmp_path, "--out", str(out))
    for line in _lines(stderr):  # flipcheck's log lines (rich, wrapped lines indented) and its own bars only
        assert re.match(r"(INFO|WARNING|ERROR) |\s", line) or line.startswith(OWN_BARS), line
    assert "INFO     loading " in stderr and "report written" in stderr  # flipcheck's own lines stay
    progress = [x for x in _lines(stderr) if x.startswith("flipcheck eval")]
    assert progress and "done" in progress[-1] and "1/1" in progress[-1]  # one child x (tasks), elapsed, left
    assert not [m for m in THIRD_PARTY_MARKS if m in stdout + stderr]
    log = (out / RUN_LOG).read_text()
    assert "Applying quantization config" in log and "Tokenizing inputs" in log  # kept, not lost
    assert "report: " in stdout and (out / "report.json").is_file()

    # -v: everything where it was (the same bars now on the terminal: the check above can see them)
    stdout, stderr = _eval(tiny_model_dir, rtn_child, task_dir, tmp_path, "-v", cache="fc-v")  # nothing cached
    assert "Applying quantization config" in stderr and "Tokenizing inputs" in stderr


def test_everything_is_put_back_after_the_block(tmp_path):
    from tqdm import std

    from flipcheck.runlog import _configure_libraries

    _configure_libraries()  # the libraries' own set-up (their stderr handlers) is what is put back
    lg = logging.getLogger("transformers")
    before = (list(lg.handlers), lg.level, lg.propagate, std.tqdm.__dict__["__init__"])
    with third_party_output(tmp_path / "r") as path:
        logging.getLogger("transformers.x").warning("from transformers")
        logging.getLogger("flipcheck.x").debug("ours")  # the flipcheck logger is not touched
        import warnings

        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        bar = std.tqdm(range(3), desc="third-party bar")
        list(bar)
        bar.close()
    assert path == tmp_path / "r" / RUN_LOG
    text = path.read_text()
    assert "from transformers" in text and "a library's warning" in text and "third-party bar" in text
    assert (list(lg.handlers), lg.level, lg.propagate, std.tqdm.__dict__["__init__"]) == before
    with third_party_output(tmp_path / "quiet"):  # nothing said: no run folder made
        pass
    assert not (tmp_path / "quiet").exists()
    with third_party_output(None, verbose=True) as nothing:
        assert nothing is None and std.tqdm.__dict__["__init__"] is before[3]
