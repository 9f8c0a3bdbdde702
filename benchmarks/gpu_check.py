"""One prepared GPU check: a ~1B-parameter Llama built in-process, a noise child and a gptq child,
scored by flipcheck on a generated task, against lm-eval's HF backend on the same GPU.

No network and no input files: the tokenizer is trained on pseudo-words and the task (MMLU-style,
a ~100-token question with four lettered options) is generated, as in ``eval_speed.py``. The model
is a random Llama of TinyLlama's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
heads; ~1.0B parameters with the 6k vocabulary), saved in bf16 and loaded by flipcheck with its GPU
defaults: bf16 on CUDA, ``device_map="auto"`` where several GPUs are visible, a batch size that fits
the free memory (:func:`flipcheck.models.suggest_batch_size`) unless ``--batch-size`` is given.

Printed:

- agreement: for the parent and each child, the documents on which flipcheck's answer (correct or
  not, ``acc``) equals lm-eval's HF backend (``HFLM``, same dtype and device, same batch size);
- tokens/s of flipcheck's parent pass (context tokens plus one answer token per question), and the
  forward's fraction of the GPU's dense bf16 peak (2 x non-embedding parameters x tokens / time /
  peak; the peak from the device name, or ``--peak-tflops``);
- peak GPU memory (``torch.cuda.max_memory_allocated``) over the whole check;
- each child's flips and KL against the parent.

    python benchmarks/gpu_check.py [--docs 300] [--batch-size N] [--peak-tflops 989]
    python benchmarks/gpu_check.py --cpu-small    # the reduced CPU form the test suite runs (< 60 s)

Designed to finish in under 8 minutes on one H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by device-name fragment
PEAKS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
}


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((tf * 1e12 for frag, tf in PEAKS.items() if frag in device_name), None)


def build(root: Path, shape: str, docs: int, dtype: torch.dtype, cal_samples: int):
    """(parent folder, task folder, calibration file, tokenizer, parameter counts)."""
    from eval_speed import SINGLE_YAML, TextMaker, lexicon, make_tokenizer, single_docs

    from flipcheck.models import save_model
    from flipcheck.tiny import build_llama, write_lm_eval_task

    words = lexicon(6000, seed=0)
    tok = make_tokenizer(words, 6144)
    parent = build_llama(len(tok), max_position_embeddings=2048, seed=0, dtype=dtype, **SHAPES[shape])
    n_params = sum(p.numel() for p in parent.parameters())
    n_embed = parent.get_input_embeddings().weight.numel() + parent.get_output_embeddings().weight.numel()
    parent_dir = save_model(parent, tok, root / "parent", {"parent": None})
    del parent
    maker = TextMaker(words, seed=2)
    task_dir = root / "tasks"
    write_lm_eval_task(task_dir, "gpu_single", single_docs(maker, tok, docs), SINGLE_YAML)
    cal = root / "calibration.txt"
    cal.write_text("\n\n".join(maker.tokens(tok, 300) for _ in range(cal_samples)))
    return parent_dir, task_dir, cal, tok, n_params, n_params - n_embed


def context_tokens(tok, task_dir: Path, task: str) -> int:
    """Tokens of the parent pass: each question's prompt once (its four options share it) + one answer token."""
    import json

    from eval_speed import single_prompt

    docs = [json.loads(line) for line in (task_dir / f"{task}.jsonl").read_text().splitlines() if line.strip()]
    return sum(len(tok.encode(single_prompt(d))) + 1 for d in docs)


def lm_eval_hf(model_dir: Path, task: str, task_dir: Path, device: str, dtype: torch.dtype, batch_size: int) -> dict:
    """lm-eval's HF backend on one folder (its samples by doc_id)."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from flipcheck.evaluation.tasks import task_manager
    from flipcheck.models import load_model, load_tokenizer

    model = load_model(str(model_dir), device=device, dtype=dtype)  # the same loader (a gptq child decompresses)
    lm = HFLM(pretrained=model, tokenizer=load_tokenizer(str(model_dir)), batch_size=batch_size, device=device)
    res = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager(str(task_dir), [task]), log_samples=True,
                          verbosity="ERROR")
    del model, lm
    return {s["doc_id"]: s for s in res["samples"][task]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-small", action="store_true", help="a 2-layer model on CPU, float32, --docs 16")
    ap.add_argument("--docs", type=int, default=None, help="questions (default 300; --cpu-small 16)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: what fits the free GPU memory")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")

    from flipcheck.compressors.pipeline import compress
    from flipcheck.evaluation.cache import ResultCache
    from flipcheck.evaluation.model_ref import child_ref
    from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef
    from flipcheck.models import load_model, resolve_device, resolve_dtype, suggest_batch_size

    if args.cpu_small:
        device, shape, docs, cal_samples = "cpu", "small", args.docs or 16, 8
    else:
        if not torch.cuda.is_available():
            print("no CUDA device here: run with --cpu-small for the reduced CPU check", file=sys.stderr)
            return 2
        device, shape, docs, cal_samples = None, "1b", args.docs or 300, 64
    dev = resolve_device(device)
    dtype = resolve_dtype(None, dev)  # bf16 on CUDA, float32 on CPU: flipcheck's defaults
    task = "gpu_single"
    t_start = time.perf_counter()
    if dev != "cpu":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="fc-gpu-check-") as tmp:
        root = Path(tmp)
        parent_dir, task_dir, cal, tok, n_params, n_body = build(root, shape, docs, dtype, cal_samples)
        print(f"device {dev} ({torch.cuda.get_device_name(0) if dev != 'cpu' else 'CPU'}), dtype {dtype}, "
              f"model {n_params / 1e9:.2f}B parameters, {docs} questions")
        seq = max(len(tok.encode(line)) for line in (task_dir / f"{task}.jsonl").read_text().splitlines()[:50]) + 16
        if args.batch_size:
            bs = args.batch_size
        else:
            probe = load_model(str(parent_dir), device=device, dtype=dtype)
            bs = suggest_batch_size(probe, seq, device=device)
            del probe
        print(f"batch size {bs} ({'given' if args.batch_size else 'chosen to fit memory'}), sequences up to ~{seq} tokens")

        children = {}
        for name, steps in (("noise", [("noise", {"sigma": 0.05})]),
                            ("gptq", [("gptq", {"scheme": "W4A16", "group_size": 128})])):
            t = time.perf_counter()
            compress(str(parent_dir), steps, out=root / name, device=device, dtype=str(dtype).replace("torch.", ""),
                     calibration={"source": str(cal), "samples": cal_samples, "seq_len": 256})
            children[name] = root / name
            print(f"child {name}: compressed in {time.perf_counter() - t:.1f} s")

        settings = EvalSettings(tasks=[task], include_path=str(task_dir), batch_size=bs, device=device)
        ev = Evaluator(ModelRef("parent", str(parent_dir)), settings, ResultCache(root / "cache"))
        ev.parent.ensure_loaded(settings)  # loading is not the forward: time the parent pass alone
        if dev != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ev.score_parent()
        if dev != "cpu":
            torch.cuda.synchronize()
        parent_s = time.perf_counter() - t
        tokens = context_tokens(tok, task_dir, task)
        rows_by_child = {}
        for name, folder in children.items():
            entry, rows = ev.evaluate_child(child_ref(str(folder), name=name))
            rows_by_child[name] = rows
            s = entry["tasks"][task]
            print(f"child {name}: acc {s['acc_P']:.3f} -> {s['acc_C']:.3f}, flips {s['flips']:.3f}, "
                  f"KL options {s['kl_options']['mean']:.4g}")

        agree_all = True
        sides = [("parent", parent_dir, "correct_P", rows_by_child["noise"])]
        sides += [(name, children[name], "correct_C", rows_by_child[name]) for name in children]
        for name, folder, key, rows in sides:
            theirs = lm_eval_hf(folder, task, task_dir, device or "cuda", dtype, bs)
            mine = {r["doc_id"]: r for r in rows}
            same = sum(bool(theirs[d]["acc"]) == bool(mine[d][key]) for d in mine)
            agree_all &= same == len(mine)
            print(f"agreement with lm-eval HF backend, {name}: {same}/{len(mine)} identical answers")

        print(f"parent pass: {parent_s:.2f} s, {tokens} tokens, {tokens / parent_s:,.0f} tokens/s")
        peak = peak_flops(torch.cuda.get_device_name(0), args.peak_tflops) if dev != "cpu" else None
        achieved = 2 * n_body * tokens / parent_s
        print(f"forward: {achieved / 1e12:.2f} TFLOP/s" + (f", {achieved / peak:.1%} of the bf16 peak" if peak else
                                                            " (peak unknown here: pass --peak-tflops)"))
        if dev != "cpu":
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(f"total: {time.perf_counter() - t_start:.1f} s; identical answers everywhere: {agree_all}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
