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

OWN_VIEW = "flipcheck eval"  # the command's one progress view (progress.py)
# what third-party output looks like: lm-eval's and flipcheck's own per-request tqdm bars (FlipLM's look
# like lm-eval's), library log lines and warnings
THIRD_PARTY_MARKS = ("Applying quantization config", "Dispatching model", "Tokenizing inputs", "[transformers]",
                     "| INFO", "| WARNING", "loglikelihood", "generate_until", "teacher forcing", "it/s]", "s/it]",
                     "Warning", "warnings.warn")
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


@pytest.fixture(scope="module")
def rtn_child(tmp_path_factory, tiny_model_dir):
    """An llm-compressor child: loading it runs compressed-tensors' own tqdm bars."""
    from flipcheck.compressors.pipeline import compress

    out = tmp_path_factory.mktemp("runlog") / "rtn"
    compress(str(tiny_model_dir), [("rtn", {"scheme": "W8A16"})], out=out, device="cpu")
    return out


def _eval_cmd(parent, child, task_dir, *extra):
    return [sys.executable, "-c", "from flipcheck.cli import app; app()", "eval", str(parent), str(child),
            "--tasks", "tiny_letters,tiny_sums", "--include-path", str(task_dir), "--limit", "6", "--device", "cpu",
            "--batch-size", "8", *extra]


def _env(tmp_path, cache):
    env = {**os.environ, "FLIPCHECK_CACHE": str(tmp_path / cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "COLUMNS": "100"}
    env.pop("TQDM_DISABLE", None)
    return env


def _eval(parent, child, task_dir, tmp_path, *extra, cache="fc"):
    """stdout and stderr each to a file, as `flipcheck eval ... > out.txt 2> err.txt` does."""
    with open(tmp_path / f"{cache}.out", "w") as fo, open(tmp_path / f"{cache}.err", "w") as fe:
        res = subprocess.run(_eval_cmd(parent, child, task_dir, *extra), stdout=fo, stderr=fe,
                             env=_env(tmp_path, cache), cwd=tmp_path, timeout=600)
    stdout, stderr = (tmp_path / f"{cache}.out").read_text(), (tmp_path / f"{cache}.err").read_text()
    assert res.returncode == 0, stderr[-3000:]
    return stdout, stderr


def _eval_pty(parent, child, task_dir, tmp_path, *extra, cache="fc-pty"):
    """Both streams on a pseudo-terminal, as in an interactive shell: what the screen received."""
    import pty
    import select

    leader, follower = pty.openpty()
    proc = subprocess.Popen(_eval_cmd(parent, child, task_dir, *extra), stdin=follower, stdout=follower,
                            stderr=follower, env=_env(tmp_path, cache), cwd=tmp_path, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 600)
        if not ready:
            proc.kill()
            raise AssertionError("eval under a pseudo-terminal printed nothing for 600 s")
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=60) == 0, b"".join(chunks)[-3000:]
    return ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


def _lines(text: str) -> list[str]:
    return [x for x in re.split(r"[\r\n]", text) if x.strip()]


def _only_own_lines(stderr: str) -> None:
    for line in _lines(stderr):  # flipcheck's log lines (rich, wrapped lines indented) and its one progress view
        assert re.match(r"(INFO|WARNING|ERROR) |\s", line) or line.startswith(OWN_VIEW), line
    found = [m for m in THIRD_PARTY_MARKS if m in stderr]
    assert not found, found


def test_eval_output_to_files_has_no_third_party_lines(tiny_model_dir, rtn_child, task_dir, tmp_path):
    out = tmp_path / "run"
    stdout, stderr = _eval(tiny_model_dir, rtn_child, task_dir, tmp_path, "--out", str(out))
    _only_own_lines(stderr)
    assert not [m for m in THIRD_PARTY_MARKS if m in stdout]
    assert "INFO     loading " in stderr and "report written" in stderr  # flipcheck's own lines stay
    progress = [x for x in _lines(stderr) if x.startswith(OWN_VIEW)]
    assert progress and "done" in progress[-1] and "1/1" in progress[-1]  # one child x (tasks), elapsed, left
    log = (out / RUN_LOG).read_text()
    assert "Applying quantization config" in log and "Tokenizing inputs" in log  # kept, not lost
    assert "loglikelihood" in log and "generate_until" in log  # the per-request bars went there too
    assert "report: " in stdout and (out / "report.json").is_file()

    # -v: everything where it was (the same bars now on the terminal: the check above can see them)
    stdout, stderr = _eval(tiny_model_dir, rtn_child, task_dir, tmp_path, "-v", cache="fc-v")  # nothing cached
    assert "Applying quantization config" in stderr and "Tokenizing inputs" in stderr and "loglikelihood" in stderr


def test_eval_on_a_terminal_has_no_third_party_lines(tiny_model_dir, rtn_child, task_dir, tmp_path):
    out = tmp_path / "run"
    screen = _eval_pty(tiny_model_dir, rtn_child, task_dir, tmp_path, "--out", str(out))
    tables = screen[screen.index("report written"):] if "report written" in screen else ""
    # before the report: log lines and the progress view only (the tables after it are flipcheck's)
    _only_own_lines(screen[: len(screen) - len(tables)])
    assert not [m for m in THIRD_PARTY_MARKS if m in screen]
    assert OWN_VIEW in screen and "report: " in screen
    assert "Tokenizing inputs" in (out / RUN_LOG).read_text()


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
