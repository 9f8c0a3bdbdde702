"""Divergence over whole generations on SmolLM2-135M-Instruct and real GSM8K prompts, and whether
its figures rank children where answer flips and mean KL do not (issue 23, item 6).

The parent is SmolLM2-135M-Instruct (``flipcheck.tiny.smollm2_folder``); the questions the first
`--questions` of GSM8K's test split from ``--realdata`` (default ../shared/realdata:
data/gsm8k/test.jsonl), zero-shot "Question: ...\\nAnswer:", greedy, up to `--max-gen` tokens, exact
match after lm-eval's flexible number extraction. Beside it, a multiple-choice task read from the same
folder: the first `--arc` ARC-Easy test questions (data/arc/ARC-Easy-Test.jsonl) and `--mmlu` MMLU test
questions (data/mmlu/test/*.csv, a seeded draw over all subjects), one lm-eval ``multiple_choice`` task
(``mc_real``, "Question: ...\\nAnswer:" + each option; headline acc_norm, flipcheck's default), so its
flips, Δacc and KL pool every question. Children (``--children``): ``noise:SIGMA`` (Gaussian weight
noise), ``rtn:SCHEME`` (llm-compressor round-to-nearest, e.g. W8A16) and ``gguf:TYPE`` (llama.cpp's
quantizer, scored by llama.cpp, e.g. Q8_0, Q6_K, Q5_K_M). Each child is evaluated against the parent
(scored once, cached) through flipcheck's ``evaluate``, one call per task so each gets its own time.

Per child it prints and writes (OUT/rows.json, OUT/table.md): on GSM8K Δacc, flips, mean vocabulary KL
along the parent's generations and its p99, the identical share, S(64), the median first divergent
token, the teacher-forced mismatch, the length ratio, the token-limit rates and seconds per 100
questions; on the multiple-choice task Δacc, flips, mean option KL and mean vocabulary KL and seconds
per 100 questions. Then Spearman's ρ between each figure (damage-signed: survival and the identical
share enter negated) and the accuracy loss −Δacc on GSM8K, on the multiple-choice task and pooled over
both (−Σ n_t Δacc_t / Σ n_t), over all children and over the near-lossless ones (``--near``). A ρ over
k children moves in steps of 6/(k³ − k); a constant column (e.g. every Δacc 0) gives none ("–").

    python benchmarks/generation_divergence.py --questions 20 --max-gen 64 --arc 50 \\
        --children noise:0.005,noise:0.02,gguf:Q8_0 --out /tmp/gendiv

``--parent tiny`` swaps in a random 2-layer Llama (a smoke run of the script in about a minute).
Everything lands under OUT (children, tasks, flipcheck's cache, each evaluation's report): a re-run
resumes from the cache. Full size (the issue's benchmark) is ``--questions 1319 --max-gen 256`` with
every near-lossless child; that is hours on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
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

MC_TASK = """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN, MC = "gsm8k_gen", "mc_real"
NEAR = "gguf:Q8_0,gguf:Q6_K,gguf:Q5_K_M,rtn:W8A16,noise:0.005,noise:0.01"
# (key, label, sign): sign -1 where a larger value means less damage
FIGURES = (("flips", "GSM8K flips", 1), ("kl_mean", "GSM8K KL mean", 1), ("kl_p99", "GSM8K KL p99", 1),
           ("S64", "GSM8K S(64)", -1), ("identical", "GSM8K identical share", -1),
           ("mismatch", "GSM8K teacher-forced mismatch", 1), ("length_ratio", "GSM8K length ratio C/P", 1),
           ("mc_flips", "MC flips", 1), ("mc_kl", "MC option KL mean", 1), ("mc_kl_vocab", "MC vocabulary KL mean", 1))
LOSSES = (("loss_gen", "GSM8K"), ("loss_mc", "MC"), ("loss_pooled", "pooled"))


def make_task(folder: Path, gsm8k: Path, n: int, max_gen: int) -> Path:
    from flipcheck.tiny import write_lm_eval_task

    docs = [json.loads(line) for line in gsm8k.read_text().splitlines()[:n]]
    return write_lm_eval_task(folder, GEN, docs, TASK.replace("MAX_GEN", str(max_gen)))


def arc_docs(path: Path, n: int) -> list[dict]:
    """The first `n` questions of an ARC jsonl file (question.stem, question.choices[].text/label, answerKey)."""
    docs = []
    for line in path.read_text().splitlines()[:n]:
        d = json.loads(line)
        labels = [c["label"] for c in d["question"]["choices"]]
        docs.append({"question": d["question"]["stem"], "choices": [c["text"] for c in d["question"]["choices"]],
                     "answer": labels.index(d["answerKey"])})
    return docs


def mmlu_docs(folder: Path, n: int) -> list[dict]:
    """`n` MMLU test questions drawn (seed 0) over every subject's ``*_test.csv`` (question, A–D, answer letter)."""
    docs = []
    for f in sorted(folder.glob("*_test.csv")):
        for row in csv.reader(f.read_text(encoding="utf-8").splitlines()):
            if len(row) == 6 and row[5] in "ABCD":
                docs.append({"question": row[0], "choices": row[1:5], "answer": "ABCD".index(row[5])})
    random.Random(0).shuffle(docs)
    return docs[:n]


def make_mc_task(folder: Path, realdata: Path, n_arc: int, n_mmlu: int) -> int:
    """Write ``mc_real`` (ARC-Easy then MMLU questions) into `folder`; returns its number of questions."""
    from flipcheck.tiny import write_lm_eval_task

    docs = arc_docs(realdata / "data/arc/ARC-Easy-Test.jsonl", n_arc) if n_arc else []
    docs += mmlu_docs(realdata / "data/mmlu/test", n_mmlu) if n_mmlu else []
    if docs:
        write_lm_eval_task(folder, MC, docs, MC_TASK)
    return len(docs)


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


def gen_figures(entry: dict) -> dict:
    s = entry["tasks"][GEN]
    g = s.get("generation") or {}
    kl = s.get("kl_vocab") or {}
    return {"delta_acc": s["delta_acc"], "acc_P": s.get("acc_P"), "n_gen": s.get("n"), "flips": s["flips"],
            "kl_mean": kl.get("mean"), "kl_p99": kl.get("p99"),
            "S64": (g.get("survival_at") or {}).get("64"), "median_first": g.get("median_first_divergent_token"),
            "length_ratio": (g.get("length_ratio") or {}).get("median"), "mismatch": g.get("tf_mismatch"),
            "limit_P": (g.get("termination_P") or {}).get("length"), "limit_C": (g.get("termination_C") or {}).get("length"),
            "identical": g.get("identical")}


def mc_figures(entry: dict) -> dict:
    s = entry["tasks"][MC]
    return {"mc_delta_acc": s["delta_acc"], "mc_acc_P": s.get("acc_P"), "n_mc": s.get("n"), "mc_flips": s["flips"],
            "mc_kl": (s.get("kl_options") or {}).get("mean"), "mc_kl_vocab": (s.get("kl_vocab") or {}).get("mean"),
            "mc_metric": s.get("metric")}


def losses(row: dict) -> dict:
    """−Δacc per task and pooled over both, weighted by their numbers of questions."""
    out = {"loss_gen": -row["delta_acc"]}
    if "mc_delta_acc" in row:
        out["loss_mc"] = -row["mc_delta_acc"]
        n_g, n_m = row["n_gen"], row["n_mc"]
        out["loss_pooled"] = -(n_g * row["delta_acc"] + n_m * row["mc_delta_acc"]) / (n_g + n_m)
    return out


def spearman(rows: list[dict]) -> dict:
    """{figure: {loss: ρ or None}}: Spearman's ρ of each damage-signed figure against each accuracy loss
    (None where fewer than three children have both, or either column is constant)."""
    from scipy import stats

    out: dict[str, dict] = {}
    for key, _, sign in FIGURES:
        out[key] = {}
        for loss, _ in LOSSES:
            pairs = [(sign * r[key], r[loss]) for r in rows if r.get(key) is not None and r.get(loss) is not None]
            if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
                out[key][loss] = None
                continue
            rho = float(stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
            out[key][loss] = None if math.isnan(rho) else rho
    return out


def _f(x, pct: bool = False) -> str:
    return "–" if x is None else (f"{100 * x:.1f} %" if pct else f"{x:.3g}")


def tables(rows: list[dict], near: set[str]) -> str:
    """The per-child table and the ρ table (all children; near-lossless only) as markdown."""
    has_mc = any("mc_delta_acc" in r for r in rows)
    head = ("| child | GSM8K Δacc | flips | KL mean (p99) | identical | S(64) | median first div. | mismatch | "
            "length C/P | limit P→C | s / 100 q |")
    lines = [head + (" MC Δacc | MC flips | MC KL options | MC KL vocab | MC s / 100 q |" if has_mc else ""),
             "|---" * (11 + 5 * has_mc) + "|"]
    for r in rows:
        line = (f"| {r['child']}{' *' if r['child'] in near else ''} | {_f(r['delta_acc'], True)} | {_f(r['flips'], True)} | "
                f"{_f(r['kl_mean'])} ({_f(r['kl_p99'])}) | {_f(r['identical'], True)} | {_f(r['S64'], True)} | "
                f"{_f(r['median_first'])} | {_f(r['mismatch'], True)} | {_f(r['length_ratio'])} | "
                f"{_f(r['limit_P'], True)} → {_f(r['limit_C'], True)} | {r['s_per_100']:.0f} |")
        if has_mc:
            line += (f" {_f(r.get('mc_delta_acc'), True)} | {_f(r.get('mc_flips'), True)} | {_f(r.get('mc_kl'))} | "
                     f"{_f(r.get('mc_kl_vocab'))} | {r.get('mc_s_per_100', 0):.0f} |")
        lines.append(line)
    sets = (("all", rows), ("near-lossless", [r for r in rows if r["child"] in near]))
    cols = [(name, sub, loss, label) for name, sub in sets for loss, label in LOSSES if has_mc or loss == "loss_gen"]
    rho = {name: spearman(sub) for name, sub in sets}
    lines += ["", "| figure | " + " | ".join(f"ρ vs {label} loss, {name} ({len(sub)})" for name, sub, _, label in cols) + " |",
              "|---" * (1 + len(cols)) + "|"]
    for key, label, _ in FIGURES:
        if all(r.get(key) is None for r in rows):
            continue
        lines.append(f"| {label} | " + " | ".join(_f(rho[name][key][loss]) for name, _, loss, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def run_child(parent: Path, spec: str, args, tasks: Path, n_mc: int) -> dict:
    """Evaluate one child on GSM8K (and the multiple-choice task) against the parent; its row."""
    from flipcheck.orchestrate.evaluate import evaluate

    child = make_child(parent, spec, args.out / "children")
    common = {"include_path": str(tasks), "cache_dir": args.out / "cache", "batch_size": args.batch_size}
    start = time.perf_counter()
    report = evaluate(str(parent), [child], tasks=[GEN], out=args.out / "runs" / spec.replace(":", "-"), **common)
    row = {"child": spec, **gen_figures(report["children"][0]), "s_per_100": 100 * (time.perf_counter() - start) / args.questions}
    if n_mc:
        start = time.perf_counter()
        report = evaluate(str(parent), [child], tasks=[MC], out=args.out / "runs-mc" / spec.replace(":", "-"), **common)
        row.update(mc_figures(report["children"][0]), mc_s_per_100=100 * (time.perf_counter() - start) / n_mc)
    return {**row, **losses(row)}


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-gen", type=int, default=64)
    ap.add_argument("--arc", type=int, default=0, help="ARC-Easy test questions in the multiple-choice task")
    ap.add_argument("--mmlu", type=int, default=0, help="MMLU test questions in the multiple-choice task")
    ap.add_argument("--children", default="noise:0.005,noise:0.02,gguf:Q8_0")
    ap.add_argument("--near", default=NEAR, help="the children counted near-lossless (a second ρ column)")
    ap.add_argument("--realdata", type=Path, default=Path(__file__).resolve().parents[2] / "shared/realdata")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--parent", default="smollm2", help="smollm2, tiny (a random Llama: a smoke run) or a folder")
    args = ap.parse_args()
    gsm8k = args.realdata / "data/gsm8k/test.jsonl"
    if not gsm8k.is_file():
        raise SystemExit(f"--realdata {args.realdata}: no data/gsm8k/test.jsonl there")
    parent = make_parent(args.parent, gsm8k, args.out)
    tasks = make_task(args.out / "tasks", gsm8k, args.questions, args.max_gen)
    n_mc = make_mc_task(args.out / "tasks", args.realdata, args.arc, args.mmlu)
    near = set(args.near.split(","))
    t0 = time.perf_counter()
    rows = []
    for spec in args.children.split(","):
        rows.append(run_child(parent, spec, args, tasks, n_mc))
        print(json.dumps(rows[-1]), flush=True)
        _write(args.out / "rows.json", json.dumps(rows, indent=1))
    print(f"total {time.perf_counter() - t0:.0f} s (the first child's times include the parent's)")
    text = tables(rows, near)
    _write(args.out / "table.md", text)
    print(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
