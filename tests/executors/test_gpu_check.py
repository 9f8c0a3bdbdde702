"""benchmarks/gpu_check.py in its reduced CPU form: the GPU script's whole path (build, compress a
noise and a gptq child, score, compare with lm-eval's HF backend) runs here, on a tiny model."""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_cpu_small_agrees_with_lm_eval(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t = time.perf_counter()
    assert mod.main(["--cpu-small"]) == 0
    assert time.perf_counter() - t < 60
    out = capsys.readouterr().out
    agreement = re.findall(r"agreement with lm-eval HF backend, (\w+): (\d+)/(\d+) identical answers", out)
    assert [a[0] for a in agreement] == ["parent", "noise", "gptq"]
    assert all(a[1] == a[2] == "16" for a in agreement), out
    assert "identical answers everywhere: True" in out
    assert re.search(r"parent pass: [\d.]+ s, \d+ tokens, [\d,]+ tokens/s", out)
