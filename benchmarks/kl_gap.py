"""How far below the exact vocabulary KL the top-K + tail bound lies, on a real pretrained model.

    python benchmarks/kl_gap.py [--k 64,256] [--sigma 0.05] [--docs 40]

Parent: SmolLM2-135M-Instruct (``flipcheck.tiny.smollm2_folder()``, float32 on CPU); child: the parent
with Gaussian weight noise (``noise`` method, sigma x std(W) per Linear). Two local lm-eval tasks
written here: ARC-style (a question, four multi-token answers) and MMLU-style (a question with
options A-D, the four letters scored). Each task is scored with the exact KL (parent in lock-step)
and against the parent's cached records (its top-K log-probs plus S tokens sampled from the rest of
its distribution, ``kl="topk"``), for each K. Prints per task the mean KL over distinct scored
positions and the relative gap ``(mean exact - mean cached) / mean exact``. Never run as a test.
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import tempfile
import time
from pathlib import Path

FACTS = [  # (question, right answer, three wrong ones)
    ("What is the capital of France?", "Paris", ["Madrid", "Berlin", "Rome"]),
    ("What is the capital of Japan?", "Tokyo", ["Seoul", "Beijing", "Bangkok"]),
    ("What is the capital of Italy?", "Rome", ["Milan", "Vienna", "Athens"]),
    ("What is the capital of Spain?", "Madrid", ["Lisbon", "Paris", "Barcelona"]),
    ("What is the capital of Germany?", "Berlin", ["Munich", "Hamburg", "Vienna"]),
    ("What is the capital of Canada?", "Ottawa", ["Toronto", "Montreal", "Vancouver"]),
    ("What is the capital of Australia?", "Canberra", ["Sydney", "Melbourne", "Perth"]),
    ("What is the capital of Egypt?", "Cairo", ["Alexandria", "Tunis", "Khartoum"]),
    ("Which planet is closest to the sun?", "Mercury", ["Venus", "Mars", "Jupiter"]),
    ("Which planet is known as the red planet?", "Mars", ["Venus", "Saturn", "Neptune"]),
    ("What is the largest planet in the solar system?", "Jupiter", ["Saturn", "Earth", "Uranus"]),
    ("What gas do plants take in from the air?", "carbon dioxide", ["oxygen", "nitrogen", "helium"]),
    ("What is frozen water called?", "ice", ["steam", "fog", "sand"]),
    ("How many legs does a spider have?", "eight", ["six", "four", "ten"]),
    ("How many days are in a week?", "seven", ["five", "six", "ten"]),
    ("What do bees make?", "honey", ["milk", "silk", "wax paper"]),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees", ["50 degrees", "0 degrees",
                                                                                     "212 degrees"]),
    ("Which animal is known as the king of the jungle?", "the lion", ["the tiger", "the elephant", "the wolf"]),
    ("What color is the sky on a clear day?", "blue", ["green", "red", "purple"]),
    ("What is the opposite of hot?", "cold", ["warm", "wet", "loud"]),
    ("Which organ pumps blood through the body?", "the heart", ["the liver", "the lungs", "the brain"]),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Fe", "Gd"]),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", ["Charles Dickens", "Jane Austen", "Mark Twain"]),
    ("What is the square root of 81?", "nine", ["eight", "seven", "eleven"]),
    ("Which ocean is the largest?", "the Pacific Ocean", ["the Atlantic Ocean", "the Indian Ocean",
                                                          "the Arctic Ocean"]),
    ("What is the main language spoken in Brazil?", "Portuguese", ["Spanish", "French", "English"]),
    ("What do caterpillars turn into?", "butterflies", ["beetles", "spiders", "worms"]),
    ("Which metal is liquid at room temperature?", "mercury", ["iron", "copper", "aluminium"]),
    ("What is the freezing point of water in Celsius?", "0 degrees", ["10 degrees", "32 degrees",
                                                                      "-10 degrees"]),
    ("How many continents are there?", "seven", ["five", "six", "nine"]),
    ("What is the tallest animal?", "the giraffe", ["the elephant", "the horse", "the camel"]),
    ("Which instrument has 88 keys?", "the piano", ["the guitar", "the violin", "the flute"]),
    ("What is the largest mammal?", "the blue whale", ["the elephant", "the giraffe", "the shark"]),
    ("What do you call a baby cat?", "a kitten", ["a puppy", "a calf", "a cub"]),
    ("Which season comes after winter?", "spring", ["summer", "autumn", "fall"]),
    ("What is the hardest natural substance?", "diamond", ["gold", "iron", "quartz"]),
    ("Which star is at the center of our solar system?", "the Sun", ["Sirius", "Polaris", "the Moon"]),
    ("What is H2O commonly called?", "water", ["salt", "air", "sugar"]),
    ("How many hours are in a day?", "twenty-four", ["twelve", "twenty", "thirty"]),
    ("Which bird is a symbol of peace?", "the dove", ["the eagle", "the crow", "the owl"]),
]

ARC_BODY = (
    "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
    "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
    "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
)
MMLU_BODY = (
    "output_type: multiple_choice\n"
    "doc_to_text: \"{{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:\"\n"
    "doc_to_choice: [\"A\", \"B\", \"C\", \"D\"]\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n"
)


def docs(n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        q, right, wrong = FACTS[i % len(FACTS)]
        choices = [right, *wrong]
        rng.shuffle(choices)
        out.append({"id": i, "question": q, "choices": choices, "answer": choices.index(right)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="64,256", help="comma-separated top-K values to measure")
    ap.add_argument("--sigma", type=float, default=0.05, help="noise sigma of the child (x std(W))")
    ap.add_argument("--docs", type=int, default=40, help="questions per task")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from flipcheck.compressors.noise import NoiseConfig, apply_noise
    from flipcheck.evaluation.cache import ResultCache
    from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef
    from flipcheck.models import load_model, load_tokenizer
    from flipcheck.tiny import smollm2_folder, write_lm_eval_task

    folder = smollm2_folder()
    parent_model = load_model(str(folder), device="cpu", dtype="float32")
    tokenizer = load_tokenizer(str(folder))
    child_model = copy.deepcopy(parent_model)
    apply_noise(child_model, NoiseConfig(sigma=args.sigma, seed=0), None)
    ks = [int(k) for k in args.k.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks"
        write_lm_eval_task(tasks, "gap_arc", docs(args.docs), ARC_BODY)
        write_lm_eval_task(tasks, "gap_mmlu", docs(args.docs), MMLU_BODY)
        print(f"SmolLM2-135M-Instruct vs noise sigma={args.sigma}, {args.docs} questions per task")
        print(f"{'task':10s} {'method':10s} {'mean KL':>10s} {'rel. gap':>9s} {'positions':>9s} {'time':>7s}")
        results = {}
        for method, k in [("exact", max(ks)), *(("topk", k) for k in ks)]:
            settings = EvalSettings(tasks=["gap_arc", "gap_mmlu"], include_path=str(tasks), batch_size=16,
                                    n_boot=10, topk=k, kl=method, device="cpu", dtype="float32")
            parent = ModelRef("parent", str(folder), model=parent_model, tokenizer=tokenizer)
            ev = Evaluator(parent, settings, ResultCache(Path(tmp) / "cache"))
            child = ModelRef(f"noise {args.sigma}", None, model=child_model, tokenizer=tokenizer,
                             fingerprint=f"noise-{args.sigma}")
            t0 = time.perf_counter()
            entry, _ = ev.evaluate_child(child)
            dt = time.perf_counter() - t0
            for task in ("gap_arc", "gap_mmlu"):
                block = entry["tasks"][task]["kl_vocab"]
                results[(task, method, k)] = block["mean"]
                exact = results.get((task, "exact", max(ks)))
                gap = "" if method == "exact" else f"{100 * (exact - block['mean']) / exact:8.2f}%"
                label = "exact" if method == "exact" else f"K={k}"
                print(f"{task:10s} {label:10s} {block['mean']:10.5f} {gap:>9s} {block['tokens']:9d} {dt:6.1f}s")


if __name__ == "__main__":
    main()
