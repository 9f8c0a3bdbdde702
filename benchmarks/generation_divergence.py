"""Divergence over whole generations on SmolLM2-135M-Instruct and real GSM8K prompts, and whether
its figures rank children where answer flips and mean KL do not (issue 23, item 6).

The parent is SmolLM2-135M-Instruct (``flipcheck.tiny.smollm2_folder``); the questions the first
`--questions` of GSM8K's test split from ``--gsm8k`` (default ../shared/realdata/data/gsm8k/test.jsonl),
zero-shot "Question: ...\\nAnswer:", greedy, up to `--max-gen` tokens, exact match after lm-eval's
flexible number extraction. Children (``--children``): ``noise:SIGMA`` (Gaussian weight noise),
``rtn:SCHEME`` (llm-compressor round-to-nearest, e.g. W8A16) and ``gguf:TYPE`` (llama.cpp's quantizer,
scored by llama.cpp, e.g. Q8_0, Q6_K, Q5_K_M). Each child is evaluated against the parent (scored
once, cached); the script prints per child: Δacc, flips, mean vocabulary KL along the parent's
generations and its p99, S(64), the median first divergent token, the length ratio and the token-limit
rates, and seconds per 100 questions of the child's evaluation (generation plus teacher forcing);
then, with three children or more, Spearman's ρ between each figure and the accuracy loss.

    python benchmarks/generation_divergence.py --questions 20 --max-gen 64 \\
        --children noise:0.005,noise:0.02,gguf:Q8_0 --out /tmp/gendiv

``--parent tiny`` swaps in a random 2-layer Llama (a smoke run of the script in about a minute).
Full size (the issue's benchmark) is ``--questions 1319 --max-gen 256`` with every near-lossless
child; that is hours on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASK = """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer.split('####')[-1].strip()}}"
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  do_sample: false
  max_gen_toks: MAX_GEN
filter_list:
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
"""

FIGURES = ("flips", "kl_mean", "kl_p99", "S64", "length_ratio")


def make_task(folder: Path, gsm8k: Path, n: int, max_gen: int) -> Path:
    from flipcheck.tiny import write_lm_eval_task

    docs = [json.loads(line) for line in gsm8k.read_text().splitlines()[:n]]
    return write_lm_eval_task(folder, "gsm8k_gen", docs, TASK.replace("MAX_GEN", str(max_gen)))


def make_parent(name: str, gsm8k: Path, out: Path) -> Path:
    """SmolLM2-135M-Instruct, a folder, or (``tiny``) a random 2-layer Llama with a tokenizer trained on the questions."""
    if name == "smollm2":
        from flipcheck.tiny import smollm2_folder

        return smollm2_folder()
    if name != "tiny":
        return Path(name)
    from flipcheck.models import save_model
    from flipcheck.tiny import build_llama, build_tokenizer

    folder = out / "tiny-parent"
    if not (folder / "config.json").is_file():
        docs = [json.loads(line) for line in gsm8k.read_text().splitlines()[:500]]
        tok = build_tokenizer([d["question"] + " " + d["answer"] for d in docs], vocab_size=512)
        save_model(build_llama(len(tok), seed=0), tok, folder, {"parent": None})
    return folder


def make_child(parent: Path, spec: str, out: Path) -> str:
    from flipcheck.compressors.pipeline import compress

    kind, _, value = spec.partition(":")
    target = out / spec.replace(":", "-")
    if kind == "noise":
        steps = [("noise", {"sigma": float(value), "seed": 1})]
    elif kind == "rtn":
        steps = [("rtn", {"scheme": value, "group_size": 64})]
    elif kind == "gguf":
        steps = [("gguf", {"type": value})]
    else:
        raise SystemExit(f"--children {spec!r}: use noise:SIGMA, rtn:SCHEME or gguf:TYPE")
    if not (target / "flipcheck.json").is_file() and not list(target.glob("*.gguf")):
        compress(str(parent), steps, out=target)
    ggufs = sorted(target.glob("*.gguf"))
    return str(ggufs[0]) if ggufs else str(target)


def figures(entry: dict) -> dict:
    s = entry["tasks"]["gsm8k_gen"]
    g = s.get("generation") or {}
    kl = s.get("kl_vocab") or {}
    return {"delta_acc": s["delta_acc"], "flips": s["flips"], "kl_mean": kl.get("mean"), "kl_p99": kl.get("p99"),
            "S64": (g.get("survival_at") or {}).get("64"), "median_first": g.get("median_first_divergent_token"),
            "length_ratio": (g.get("length_ratio") or {}).get("median"),
            "limit_P": (g.get("termination_P") or {}).get("length"), "limit_C": (g.get("termination_C") or {}).get("length"),
            "identical": g.get("identical")}


def spearman(rows: list[dict]) -> dict:
    from scipy import stats

    loss = [-r["delta_acc"] for r in rows]
    out = {}
    for k in FIGURES:
        vals = [r[k] for r in rows]
        if any(v is None for v in vals):
            continue
        sign = -1.0 if k == "S64" else 1.0  # survival falls as damage grows
        out[k] = float(stats.spearmanr([sign * v for v in vals], loss).statistic)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-gen", type=int, default=64)
    ap.add_argument("--children", default="noise:0.005,noise:0.02,gguf:Q8_0")
    ap.add_argument("--gsm8k", type=Path, default=Path(__file__).resolve().parents[2] / "shared/realdata/data/gsm8k/test.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--parent", default="smollm2", help="smollm2, tiny (a random Llama: a smoke run) or a folder")
    args = ap.parse_args()
    from flipcheck.orchestrate.evaluate import evaluate

    if not args.gsm8k.is_file():
        raise SystemExit(f"--gsm8k {args.gsm8k}: no such file")
    parent = make_parent(args.parent, args.gsm8k, args.out)
    tasks = make_task(args.out / "tasks", args.gsm8k, args.questions, args.max_gen)
    cache = args.out / "cache"
    t0 = time.perf_counter()
    rows = []
    for spec in args.children.split(","):
        child = make_child(parent, spec, args.out / "children")
        start = time.perf_counter()
        report = evaluate(str(parent), [child], tasks=["gsm8k_gen"], include_path=str(tasks), cache_dir=cache,
                          batch_size=args.batch_size, out=args.out / "runs" / spec.replace(":", "-"))
        secs = time.perf_counter() - start
        row = {"child": spec, **figures(report["children"][0]), "s_per_100": 100 * secs / args.questions}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s (the first child's time includes the parent's generations)")
    print("| child | Δacc | flips | KL mean | KL p99 | identical | S(64) | median first div. | length C/P | limit P→C | s / 100 q |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def f(x, pct=False):
            return "-" if x is None else (f"{100 * x:.1f}%" if pct else f"{x:.3g}")
        print(f"| {r['child']} | {f(r['delta_acc'], True)} | {f(r['flips'], True)} | {f(r['kl_mean'])} | {f(r['kl_p99'])} | "
              f"{f(r['identical'], True)} | {f(r['S64'], True)} | {f(r['median_first'])} | {f(r['length_ratio'])} | "
              f"{f(r['limit_P'], True)} → {f(r['limit_C'], True)} | {r['s_per_100']:.0f} |")
    if len(rows) >= 3:
        print("Spearman rho with the accuracy loss:", json.dumps(spearman(rows)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
