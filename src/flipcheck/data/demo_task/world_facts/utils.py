"""Data loader of ``flipcheck_world_facts``, for lm-eval's ``custom_dataset: !function utils.load``.

Like the toy demo's loader next door, it reads ``world_facts.jsonl`` from its own folder, so the
task works from any working directory. The questions are flipcheck's own (see
``flipcheck.demo.world_fact_docs``); one row per question: ``id``, ``category``, ``question``,
``options`` (four), ``label`` (index of the answer) and ``answer``.
"""

import json
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "world_facts.jsonl"


def load(**_metadata):
    """The test split as a ``datasets.DatasetDict``; lm-eval passes the task metadata, unused here."""
    import datasets

    with open(DATA_FILE, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
