"""localize on a planted fault: SmolLM2-135M with Gaussian noise on one layer's Linears.

    PYTHONPATH=src python benchmarks/localize_planted.py [LAYER] [SIGMA] [WINDOWS] [CTX]

Prints the child's text KL, the planted layer's figures, the top-3 layers by every figure, the
three worst modules and the wall time of localize_models. Needs the SmolLM2 folder that
``flipcheck.tiny.smollm2_folder()`` builds (PyPI on first use).
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from flipcheck.compressors.calibration import CalibrationConfig
from flipcheck.compressors.calibration_data import build_calibration
from flipcheck.compressors.registry import get_method, make_config
from flipcheck.decide.localize import localize_models, ranking
from flipcheck.models import load_model, load_tokenizer
from flipcheck.tiny import smollm2_folder

TEXT = ["The quick brown fox jumps over the lazy dog. " * 3,
        "Water boils at one hundred degrees Celsius at sea level, and freezes at zero."] * 10
FIGURES = ("kl_swap_in", "kl_removed", "own_rel_error", "own_cosine", "own_sqnr_db", "stream_added")


def main(layer: int = 7, sigma: float = 0.5, windows: int = 2, ctx: int = 32) -> None:
    folder = smollm2_folder()
    parent = load_model(folder, device="cpu", dtype="float32")
    child = copy.deepcopy(parent)
    get_method("noise").apply(child, make_config("noise", {"sigma": sigma, "include": [f"model.layers.{layer}.*"]}), None)
    ids = build_calibration(load_tokenizer(folder), CalibrationConfig(samples=windows, seq_len=ctx), texts=TEXT).input_ids
    t0 = time.perf_counter()
    block = localize_models(parent, child, ids, batch_size=windows)
    print(f"time {time.perf_counter() - t0:.1f} s, threads {torch.get_num_threads()}")
    print(f"child KL {block['kl_total']:.4f} over {block['positions']} positions")
    print(f"layer {layer}: {block['layers'][layer]}")
    for f in FIGURES:
        print(f"top-3 by {f}: {ranking(block, f)[:3]}")
    print("worst modules:", block["modules"][:3])


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(int(args[0]), float(args[1]), int(args[2]), int(args[3])) if len(args) == 4 else ())
