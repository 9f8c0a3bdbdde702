"""Does localize name the layers that matter? SmolLM2-135M, RTN W4A16 g64 child, real ARC-Easy.

    PYTHONPATH=src python benchmarks/localize_w4.py ARC-Easy-Test.jsonl TEXT.txt [QUESTIONS] [DRAWS]

1. RTN W4A16 (group 64) on every layer of SmolLM2; localize it against the parent on TEXT
   (2 windows of 128 tokens).
2. The same child with localize's top-3 layers (by swap-in KL) at W8A16, and with 3 layers drawn
   at random (DRAWS draws, seeded) at W8A16.
3. Every child evaluated against the parent on the first QUESTIONS ARC-Easy questions (a local
   lm-eval task written from the ARC jsonl file); prints flips and KL over options of each.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from flipcheck.compressors.pipeline import compress
from flipcheck.decide.localize import localize, ranking
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


def arc_docs(path: str, n: int) -> list[dict]:
    docs = []
    for line in Path(path).read_text().splitlines()[:n]:
        d = json.loads(line)
        labels = [c["label"] for c in d["question"]["choices"]]
        docs.append({"question": d["question"]["stem"], "choices": [c["text"] for c in d["question"]["choices"]],
                     "answer": labels.index(d["answerKey"])})
    return docs


def main(arc: str, text: str, questions: int = 200, draws: int = 5) -> None:
    parent = str(smollm2_folder())
    work = Path(tempfile.mkdtemp(prefix="flipcheck-loc-w4-"))
    tasks = write_lm_eval_task(work / "tasks", "arc_easy_local", arc_docs(arc, questions), BODY)
    t0 = time.perf_counter()
    base = {"scheme": "W4A16", "group_size": 64}
    w4 = compress(parent, [("rtn", base)], out=work / "w4", device="cpu").out
    block = localize(parent, str(w4), text=text, windows=2, ctx=128, device="cpu")
    top3 = ranking(block, "kl_swap_in")[:3]
    print(f"localize {time.perf_counter() - t0:.0f} s; child KL {block['kl_total']:.4f}; top-3 by swap-in KL: {top3}; "
          f"their shares {[round(block['layers'][i]['share_swap_in'], 3) for i in top3]}")
    rng = random.Random(0)
    sets = {"top3": top3, **{f"random{k}": sorted(rng.sample(range(len(block['layers'])), 3)) for k in range(draws)}}
    children = [str(w4)]
    for name, layers in sets.items():
        settings = {**base, "layers": {str(i): "W8A16" for i in layers}}
        children.append(str(compress(parent, [("rtn", settings)], out=work / name, device="cpu").out))
    t1 = time.perf_counter()
    report = evaluate(parent, children, tasks="arc_easy_local", include_path=str(tasks), device="cpu", metric="acc")
    print(f"evaluation {time.perf_counter() - t1:.0f} s")
    labels = ["w4 (all layers)", *(f"{k} {v}" for k, v in sets.items())]
    for label, child in zip(labels, report["children"], strict=True):
        s = child["tasks"]["arc_easy_local"]
        print(f"{label:28s} flips {s['flips']:.3f} ({s['n_c2i'] + s['n_i2c']}/{s['n']})  "
              f"KL options {s['kl_options']['mean']:.4f}  Δacc {s['delta_acc']:+.3f}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], *(int(x) for x in a[2:4]))
