"""The same weights on three engines: do the generation figures agree within the engine floor? (issue 23)

SmolLM2-135M-Instruct (float32) and two children, each compared with the parent through flipcheck's
own CLI (``flipcheck eval``) on the first `--questions` GSM8K test questions, zero-shot, greedy, up to
`--max-gen` tokens (the task of ``benchmarks/generation_divergence.py``):

- a Q8_0 GGUF child (llama.cpp's quantizer): parent on transformers and child on llama.cpp, with
  ``--engine-floor`` (the parent again on llama.cpp, an F32 GGUF of it); the same file dequantized by
  transformers (``--child-engine transformers``); both sides on llama.cpp (an F32 GGUF of the parent
  against the Q8_0 file); and the same file on vLLM (``--child-engine vllm``, refused: the reply is
  printed);
- a Gaussian weight-noise child (σ `--sigma`): both on transformers; both on vLLM with
  ``--engine-floor`` (the parent again on transformers); parent on transformers, child on vLLM.

vLLM runs from its own venv (``--vllm-python``, default $FLIPCHECK_VLLM_PYTHON, else .venv-vllm of this
checkout; flipcheck there is this checkout through PYTHONPATH). Every call shares one cache
(OUT/cache), so each call scores only the models not scored before; its wall time is printed with
which models it scored, so seconds per 100 questions per engine are read off the calls that scored
one model. Per comparison (and per floor row) the table gives the identical share, S(16), S(64), the
first divergent tokens of the diverged questions (recovered from S(t): n·(S(t) − S(t+1)) questions
diverge at token t), the teacher-forced mismatch and the mean KL(P‖C) along the parent's generations
with its p99, Δacc and flips.

    PYTHONPATH=src python benchmarks/generation_engines.py --out /tmp/engines --questions 20 --max-gen 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generation_divergence import GEN, make_child, make_task  # noqa: E402


def first_divergent(curve: list[float], n: int) -> list[int]:
    """The first divergent token of each diverged question, from S(t), t = 1..len(curve) (S(0) = 1)."""
    out, prev = [], 1.0
    for t, s in enumerate(curve):
        out += [t] * round(n * (prev - s))
        prev = s
    return out


def row(label: str, summary: dict) -> dict:
    g = summary.get("generation") or {}
    kl = summary.get("kl_vocab") or {}
    at = g.get("survival_at") or {}
    return {"pair": label, "identical": g.get("identical"), "S16": at.get("16"), "S64": at.get("64"),
            "first": first_divergent(g.get("survival") or [], g.get("pairs") or 0), "mismatch": g.get("tf_mismatch"),
            "kl_mean": kl.get("mean"), "kl_p99": kl.get("p99"), "delta_acc": summary.get("delta_acc"),
            "flips": summary.get("flips")}


def call(name: str, python: str, args: list[str], out: Path, env: dict) -> dict:
    """One ``flipcheck eval`` (skipped when OUT/name/report.json exists); its rows, wall time and reply."""
    folder = out / name
    done = out / f"{name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    cmd = [python, "-c", "from flipcheck.cli import app; app()", "eval", *args, "--out", str(folder)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    result = {"name": name, "args": args, "seconds": time.perf_counter() - start, "rc": proc.returncode,
              "reply": (proc.stdout + proc.stderr).strip().splitlines()[-3:], "rows": []}
    if proc.returncode == 0:
        report = json.loads((folder / "report.json").read_text())
        on = (report["parent"].get("engine") or {}).get("name")
        for e in report["children"]:
            result["rows"].append(row(f"{name}: P on {on}, C on {(e.get('engine') or {}).get('name')}", e["tasks"][GEN]))
        for e in report.get("noise_floor") or []:
            result["rows"].append(row(f"{name}: {e.get('name')} (P on {on})", e["tasks"][GEN]))
        result["engines"] = {"parent": report["parent"].get("engine"), "children": [e.get("engine") for e in report["children"]]}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(done)
    return result


def _f(x, pct: bool = False) -> str:
    return "–" if x is None else (f"{100 * x:.1f} %" if pct else f"{x:.2g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-gen", type=int, default=64)
    ap.add_argument("--sigma", default="0.01")
    ap.add_argument("--realdata", type=Path, default=HERE.parents[1] / "shared/realdata")
    ap.add_argument("--vllm-python", default=os.environ.get("FLIPCHECK_VLLM_PYTHON") or str(HERE.parent / ".venv-vllm/bin/python"))
    ap.add_argument("--batch-size", default="8")
    args = ap.parse_args()
    from flipcheck.tiny import smollm2_folder

    out = args.out.resolve()
    parent = smollm2_folder()
    tasks = make_task(out / "tasks", args.realdata / "data/gsm8k/test.jsonl", args.questions, args.max_gen)
    q8 = make_child(parent, "gguf:Q8_0", out / "children")
    f32 = make_child(parent, "gguf:F32", out / "children")
    noise = make_child(parent, f"noise:{args.sigma}", out / "children")
    env = {**os.environ, "FLIPCHECK_CACHE": str(out / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "VLLM_NO_USAGE_STATS": "1", "COLUMNS": "200",
           "PYTHONPATH": str(HERE.parent / "src")}
    common = ["--tasks", GEN, "--include-path", str(tasks), "--batch-size", args.batch_size]
    p, me, vl = str(parent), sys.executable, args.vllm_python
    calls = [  # (name, python, arguments, the models this call scores that no earlier call did)
        ("q8-tf-lc", me, [p, q8, "--engine-floor"], "P transformers, Q8_0 llama.cpp, P F32 llama.cpp"),
        ("noise-tf-tf", me, [p, noise], "noise transformers"),
        ("q8-tf-tfdeq", me, [p, q8, "--child-engine", "transformers"], "Q8_0 transformers (dequantized)"),
        ("q8-lc-lc", me, [f32, q8], "P F32 llama.cpp as parent, Q8_0 llama.cpp against it"),
        ("noise-vllm-vllm", vl, [p, noise, "--engine", "vllm", "--engine-floor"], "P vLLM, noise vLLM, (P transformers: cached)"),
        ("noise-tf-vllm", vl, [p, noise, "--child-engine", "vllm"], "noise vLLM against the transformers parent"),
        ("q8-tf-vllm", vl, [p, q8, "--child-engine", "vllm"], "refused"),
    ]
    results = []
    for name, python, a, scored in calls:
        r = call(name, python, [*a, *common], out, env)
        r["scored"] = scored
        results.append(r)
        print(f"{name}: rc {r['rc']}, {r['seconds']:.0f} s ({scored}); {' / '.join(r['reply'])}", flush=True)
    print(f"\n{args.questions} questions, max {args.max_gen} new tokens\n")
    print("| comparison | identical | S(16) | S(64) | first divergent tokens | TF mismatch | KL(P‖C) mean (p99) | Δacc | flips |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for x in r["rows"]:
            print(f"| {x['pair']} | {_f(x['identical'], True)} | {_f(x['S16'], True)} | {_f(x['S64'], True)} | "
                  f"{', '.join(map(str, x['first'])) or 'none'} | {_f(x['mismatch'], True)} | {_f(x['kl_mean'])} "
                  f"({_f(x['kl_p99'])}) | {_f(x['delta_acc'], True)} | {_f(x['flips'], True)} |")
    print("\n| call | wall s | s / 100 questions | models scored |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['seconds']:.0f} | {100 * r['seconds'] / args.questions:.0f} | {r['scored']} |")


if __name__ == "__main__":
    main()
