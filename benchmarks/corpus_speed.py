"""What scoring a corpus in lock-step costs against two plain forward passes over the same tokens.

    python benchmarks/corpus_speed.py [--windows 8] [--ctx 512] [--repeats 3] [--sigma 0.05]

Parent: SmolLM2-135M-Instruct (``flipcheck.tiny.smollm2_folder()``, float32 on CPU); child: the parent
with Gaussian weight noise. Text: the demo's own facts (``flipcheck.demo.demo_texts``), repeated until
there are enough windows. Measured side by side, interleaved, `--repeats` times each:

- plain: ``parent(input_ids).logits`` and ``child(input_ids).logits`` for every window batch, nothing
  else (what a user's own script would at least do);
- flipcheck: :func:`flipcheck.evaluation.corpus.score_child` with the parent in lock-step, i.e. both
  forwards plus float32 log-softmax, the exact vocabulary KL in both directions, top-1 agreement, Δp
  and both NLLs at every scored position.

Prints the median time of each and ``ratio flipcheck/plain`` (target <= 1.2). Never run as a test.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flipcheck.compressors.noise import NoiseConfig, apply_noise
    from flipcheck.demo import demo_texts
    from flipcheck.evaluation.corpus import Corpus, _batches, score_child, windows
    from flipcheck.models import load_model, load_tokenizer
    from flipcheck.tiny import smollm2_folder

    folder = smollm2_folder()
    tok = load_tokenizer(str(folder))
    parent = load_model(str(folder), device="cpu", dtype="float32")
    child = copy.deepcopy(parent)
    apply_noise(child, NoiseConfig(sigma=args.sigma, seed=0), None)
    text = "\n\n".join(demo_texts())
    wins: list = []
    reps = 1
    while len(wins) < args.windows:
        wins = windows(tok, Corpus("demo", "demo", (text,) * reps), args.ctx)
        reps *= 2
    wins = [w for w in wins if len(w) == args.ctx][: args.windows]
    vocab = int(parent.config.vocab_size)
    tokens = sum(len(w) for w in wins)

    def plain() -> None:
        with torch.inference_mode():
            for _, ids in _batches(wins, vocab, args.batch):
                _ = parent(input_ids=ids).logits, child(input_ids=ids).logits

    def flipcheck() -> None:
        score_child(child, wins, scoring="all", parent_model=parent, batch_size=args.batch)

    plain()  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {"plain": [], "flipcheck": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("flipcheck", flipcheck)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    p, f = statistics.median(times["plain"]), statistics.median(times["flipcheck"])
    print(f"SmolLM2-135M, {len(wins)} windows x {args.ctx} tokens ({tokens} tokens), batch {args.batch}, "
          f"{args.threads} threads, {args.repeats} repeats")
    print(f"plain two forwards: {p:.2f} s   flipcheck lock-step (exact KL both ways, top-1, dp, NLL): {f:.2f} s")
    print(f"ratio flipcheck/plain: {f / p:.3f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
