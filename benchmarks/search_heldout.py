"""Does the search meet its budget on questions it never saw? SmolLM2-135M, RTN W4A16/W8A16 per layer.

    PYTHONPATH=src python benchmarks/search_heldout.py REALDATA WORK [BUDGET] [CONFIDENCE] [MAX_CANDIDATES] [CONFIRM]

REALDATA is the folder holding ``data/arc/ARC-Easy-Test.jsonl`` and ``data/mmlu/test/*.csv``. Two
disjoint question sets, each one lm-eval task (so the gate judges their pooled counts):

- search set: ARC-Easy test questions 0–79 and 40 MMLU test questions (seeded draw over all subjects);
- held-out set: ARC-Easy test questions 80–229 and 60 further MMLU questions.

The sensitivities are measured on ARC-Challenge dev questions with their answers (8 windows of 128
tokens), text neither set contains.

1. ``flipcheck search`` on the search set: rtn, scheme W4A16 or W8A16 per layer (group 64), flips
   judged by their Clopper–Pearson upper bound at CONFIDENCE against BUDGET. With CONFIRM (default
   0.3; ``none`` for the unconfirmed search of the README's first table) the search set is split,
   seeded: candidates are verified on its search split at the Bonferroni-tightened confidence and the
   winner is the smallest that also passes on its confirmation split (``flipcheck search --confirm``).
2. On the held-out set: the winner, every uniform child, and the best uniform W4A16 child no larger
   than the winner (group 32 or 16, whichever is the largest that fits), each evaluated against the
   parent; prints flips with their two-sided 95 % Clopper–Pearson interval, the gate verdict at
   CONFIDENCE, size and bits per weight.

Everything is written under WORK (a re-run resumes: the search verifies nothing anew, evaluations
come from WORK/cache).
"""

from __future__ import annotations

import csv
import json
import random
import sys
import time
from pathlib import Path

from flipcheck.compressors.pipeline import compress
from flipcheck.decide.search import search
from flipcheck.evaluation.confidence import cp_lower, cp_upper
from flipcheck.gate import check
from flipcheck.orchestrate.evaluate import evaluate
from flipcheck.tiny import smollm2_folder, write_lm_eval_task

BODY = """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def arc_docs(path: Path, lo: int, hi: int) -> list[dict]:
    docs = []
    for line in path.read_text().splitlines()[lo:hi]:
        d = json.loads(line)
        labels = [c["label"] for c in d["question"]["choices"]]
        docs.append({"question": d["question"]["stem"], "choices": [c["text"] for c in d["question"]["choices"]],
                     "answer": labels.index(d["answerKey"])})
    return docs


def mmlu_docs(folder: Path) -> list[dict]:
    docs = []
    for f in sorted(folder.glob("*_test.csv")):
        for row in csv.reader(f.read_text(encoding="utf-8").splitlines()):
            if len(row) == 6 and row[5] in "ABCD":
                docs.append({"question": row[0], "choices": row[1:5], "answer": "ABCD".index(row[5])})
    random.Random(0).shuffle(docs)
    return docs


def main(realdata: str, work: str, budget: str = "10%", confidence: str = "0.95", max_candidates: int = 8,
         confirm: str = "0.3") -> None:
    data, work_dir = Path(realdata) / "data", Path(work)
    arc, mmlu = data / "arc" / "ARC-Easy-Test.jsonl", mmlu_docs(data / "mmlu" / "test")
    tasks = work_dir / "tasks"
    for i, d in enumerate(mmlu):
        d["id"] = i
    write_lm_eval_task(tasks, "search_set", arc_docs(arc, 0, 80) + mmlu[:40], BODY)
    write_lm_eval_task(tasks, "heldout_set", arc_docs(arc, 80, 230) + mmlu[40:100], BODY)
    probe = work_dir / "probe.txt"  # calibration and sensitivity text: ARC-Challenge dev questions with their answers
    probe.write_text("\n\n".join(f"Question: {d['question']}\nAnswer: {d['choices'][d['answer']]}"
                                   for d in arc_docs(data / "arc" / "ARC-Challenge-Dev.jsonl", 0, 300)) + "\n")
    parent = str(smollm2_folder())
    cache = work_dir / "cache"
    t0 = time.perf_counter()
    confirmed = confirm.lower() != "none"
    block = search(parent, "rtn", "scheme=W4A16,W8A16", out=work_dir / ("search-confirmed" if confirmed else "search"),
                   settings={"group_size": 64}, confirm=confirm if confirmed else None,
                   budgets={"max_flips": budget}, confidence=confidence, metric="acc", tasks=["search_set"],
                   include_path=str(tasks), calibration={"source": str(probe)}, probe_windows=8, probe_ctx=128,
                   max_candidates=max_candidates, device="cpu", cache_dir=cache, progress=lambda m: print(m, flush=True))
    print(f"search {time.perf_counter() - t0:.0f} s; cost {json.dumps(block['cost'])}")
    by = {c["name"]: c for c in block["candidates"]}
    c_s = block.get("search_confidence") or float(confidence)  # the search (split) is judged at this confidence
    for c in sorted(block["candidates"], key=lambda c: c["size_bits"]):
        s = c["tasks"]["search_set"]
        conf = c.get("confirmation") or {}
        cs = (conf.get("tasks") or {}).get("search_set")
        k = cs["n_c2i"] + cs["n_i2c"] if cs else 0
        shown = (f"  confirmation flips {cs['flips']:.3f} ({k}/{cs['n']}, upper {cp_upper(k, cs['n'], float(confidence)):.3f}) "
                 f"{'PASS' if conf['passed'] else 'FAIL'}" if cs else "")
        print(f"  {c['name']:22s} {c['kind']:8s} {c['allocation_summary']:24s} {c['bits_per_weight']:.3f} b/w  "
              f"flips {s['flips']:.3f} ({s['n_c2i'] + s['n_i2c']}/{s['n']}, upper {cp_upper(s['n_c2i'] + s['n_i2c'], s['n'], c_s):.3f})  "
              f"{'PASS' if c['passed'] else 'FAIL'}{shown}{'  <- winner' if c['winner'] else ''}")
    if confirmed:
        print(f"search split judged at {block['search_confidence']:.4f}; confirmed in order: "
              f"{', '.join(block['confirmation']['confirmed']) or '-'}")
    winner = by.get(block["winner"] or "")
    if winner is None:
        print("no winner: nothing to hold out")
        return
    children = {c["name"]: c["folder"] for c in block["candidates"]
                if c["kind"] == "uniform" or c["winner"] or c.get("search_winner")}
    same = None
    for g in (16, 32):  # the largest uniform W4A16 group layout no larger than the winner
        bpw = 4 + 32 / g  # fp32 scales, symmetric: no zero points
        if bpw <= winner["bits_per_weight"] + 1e-9:
            same = f"uniform W4A16 g{g}"
            children[same] = str(compress(parent, [("rtn", {"scheme": "W4A16", "group_size": g})],
                                          out=work_dir / f"w4g{g}", device="cpu").out)
            break
    t1 = time.perf_counter()
    names = list(children)
    for label, task in (("search set", "search_set"), ("held-out set", "heldout_set")):
        if label == "search set" and same is None:
            continue
        report = evaluate(parent, [children[n] for n in names], tasks=[task], include_path=str(tasks), device="cpu",
                          metric="acc", cache_dir=cache)
        print(f"{label} ({time.perf_counter() - t1:.0f} s so far):")
        for name, entry in zip(names, report["children"], strict=True):
            s = entry["tasks"][task]
            k, n = s["n_c2i"] + s["n_i2c"], s["n"]
            [v] = check({"children": [entry]}, max_flips=budget, confidence=confidence, metric="acc")
            bits = (entry.get("compression") or [{}])[-1].get("bits_per_weight")
            print(f"  {name:22s} {bits if bits is None else round(bits, 3)} b/w  flips {s['flips']:.3f} ({k}/{n}), "
                  f"95% CI [{cp_lower(k, n, 0.975):.3f}, {cp_upper(k, n, 0.975):.3f}]  KL {s['kl_options']['mean']:.4f}  "
                  f"Δacc {s['delta_acc']:+.3f}  gate: {v.text}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], *a[2:4], *(int(x) for x in a[4:5]), *a[5:6])
