"""The same 4-point sweep run locally (one process, 2 torch threads) and on a 2-worker local Ray
cluster (2 CPUs, one thread per worker), with the parent scored once in the driver either way.

Model and tasks are built in-process (no network, no input files): a random Llama (hidden 512,
intermediate 1536, 6 layers, ~30M parameters with its ~6k-token vocabulary) and the two local
lm-eval tasks of ``eval_speed.py`` (MMLU-style single-token and HellaSwag-style multi-token),
``--docs`` questions each. The sweep is flipcheck's Gaussian weight noise at four strengths; each
point (compress, save, score both tasks against the cached parent) takes a minute or more on the
2-core machine at the default ``--docs``.

Each run has its own result cache, so both score the parent. An untimed warm-up (the parent on 4
questions per task) runs first in the driver, so the local run is not charged this process's
one-time costs; the Ray run's workers pay theirs (that is Ray's overhead). Printed: the wall time of each run,
``ratio ray/local`` (target <= 0.75), and for the Ray run where its time goes: connecting (starting
the local cluster), scoring the parent in the driver, the children phase, and inside the workers
(summed over tasks) imports on fresh worker processes, set-up with lm-eval's task indexing, reading
the parent from the cache, and the work itself. Both runs' per-question answers are checked equal.

    python benchmarks/ray_sweep.py [--docs 150] [--quick]

``--quick``: 40 questions per task and a 4-layer hidden-256 model (a point takes seconds; the ratio
then mostly measures Ray's fixed costs, not the speed-up).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIGMAS = [0.02, 0.05, 0.1, 0.2]


def build(root: Path, docs: int, quick: bool) -> tuple[Path, Path]:
    """(parent folder, task folder)."""
    from eval_speed import (
        MULTI_YAML,
        SINGLE_YAML,
        TextMaker,
        lexicon,
        make_tokenizer,
        multi_docs,
        single_docs,
    )

    from flipcheck.models import save_model
    from flipcheck.tiny import build_llama, write_lm_eval_task

    words = lexicon(6000, seed=0)
    tok = make_tokenizer(words, 6144)
    size = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4) if quick else dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8)
    parent = build_llama(len(tok), max_position_embeddings=1024, seed=0, **size)
    parent_dir = save_model(parent, tok, root / "parent", {"parent": None})
    maker = TextMaker(words, seed=2)
    task_dir = root / "tasks"
    write_lm_eval_task(task_dir, "bench_single", single_docs(maker, tok, docs), SINGLE_YAML)
    write_lm_eval_task(task_dir, "bench_multi", multi_docs(maker, tok, docs), MULTI_YAML)
    return parent_dir, task_dir


def warm_up(parent: Path, task_dir: Path, root: Path) -> None:
    """An untimed parent pass on 4 questions per task in the driver: the one-time costs of this
    process (imports, lm-eval's task loading, the first forward) are not charged to the local run."""
    from flipcheck.evaluation.cache import ResultCache
    from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef

    settings = EvalSettings(tasks=["bench_single", "bench_multi"], include_path=str(task_dir), limit=4, batch_size=16)
    Evaluator(ModelRef("parent", str(parent)), settings, ResultCache(root / "cache-warm-up")).score_parent()


def run(parent: Path, task_dir: Path, root: Path, name: str, executor=None) -> tuple[float, dict, list[str]]:
    from flipcheck.orchestrate.recipe import sweep

    said: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    report = sweep(str(parent), "noise", {"sigma": SIGMAS}, tasks=["bench_single", "bench_multi"],
                   include_path=str(task_dir), out=root / name, cache_dir=root / f"cache-{name}", batch_size=16,
                   executor=executor, progress=lambda m: said.append((time.perf_counter() - t0, m)))
    wall = time.perf_counter() - t0
    for t, m in said:
        print(f"  {name} {t:7.1f}s  {m}")
    return wall, report, [line for line in (root / name / "samples.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=None, help="questions per task (default 150, --quick 40)")
    ap.add_argument("--quick", action="store_true", help="a small model and 40 questions: seconds per point")
    args = ap.parse_args(argv)
    docs = args.docs or (40 if args.quick else 150)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # token authentication with a token of this run, not one written to ~/.ray for later clusters
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray

    from flipcheck.executors import ExecutorOptions

    with tempfile.TemporaryDirectory(prefix="fc-ray-bench-") as tmp:
        root = Path(tmp)
        parent, task_dir = build(root, docs, args.quick)
        print(f"4-point noise sweep, 2 tasks x {docs} questions, {'quick' if args.quick else 'full'} model")

        torch.set_num_threads(2)
        warm_up(parent, task_dir, root)
        print(f"load average before the local run: {os.getloadavg()[0]:.2f} (2 cores; other work on the machine skews both runs)")
        local_wall, local_report, local_rows = run(parent, task_dir, root, "local")
        print(f"load average before the Ray run: {os.getloadavg()[0]:.2f}")

        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        start = time.perf_counter() - t
        ray_wall, ray_report, ray_rows = run(parent, task_dir, root, "ray",
                                             ExecutorOptions("ray", cpus_per_child=1))
        ray.shutdown()

    assert not ray_report["failed"], ray_report["failed"]
    same = [json.loads(a)["correct_C"] for a in local_rows] == [json.loads(b)["correct_C"] for b in ray_rows]
    info = ray_report["executor"]
    print(f"local (1 process, 2 threads): {local_wall:.1f} s")
    print(f"ray (2 workers x 1 thread):   {ray_wall:.1f} s  (+ {start:.1f} s starting the local cluster)")
    print(f"same answers: {same}; parent passes: local {local_report['executor']['parent_passes']}, "
          f"ray {info['parent_passes']}")
    print("ray workers, seconds summed over the 4 tasks: "
          + ", ".join(f"{k} {v:.1f}" for k, v in info.get("worker_seconds", {}).items()))
    print(f"ratio ray/local: {(ray_wall + start) / local_wall:.2f}  (without cluster start: {ray_wall / local_wall:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
