"""The offline demo: a tiny Llama that flipcheck trains itself on a synthetic knowledge task.

``flipcheck demo`` must run without the Hugging Face hub, so the parent model is built in-process
(:func:`flipcheck.tiny.build_llama`) and trained here on a fixed table of made-up facts
("The capital of Zorvia is Mekton.", "The colour of the blorf is green.", ...). The same facts are
asked back as four-option questions by two lm-eval tasks shipped in ``flipcheck/data/demo_task``:

- ``flipcheck_demo_facts``: continuation style (HellaSwag/ARC-like), the options are the values
  themselves: ``Question: What is the capital of Zorvia?\\nAnswer:`` -> `` Mekton``.
- ``flipcheck_demo_letters``: MMLU style, the options are listed and the answer is the single
  token letter `` A``..`` D``.

Each relation has exactly four values, always listed in the same order, so the distractors are
the other values of the same attribute and a letter names the same value in all of a relation's
questions. (With options shuffled per question a model this small must learn to search the list,
which it did not within a demo's training budget: still at chance after 1,500 steps.)

Nothing is held out: this is a knowledge test, as MMLU is for a real model. The parent learns
each fact from its statement, its question with the answer and its lettered question. Facts are
shown with different frequencies (1x to 8x) and, like facts on the web, some are contradicted in
part of their showings (a fact's *certainty*, 55 % to 100 %, is the share of showings that give the
true value). A model trained on such text answers certain facts with a large top margin and
contested ones barely. That spread is what makes compression visible: Dutta et al. 2024
("Accuracy is Not All You Need", arXiv 2407.09141) explain flips by low-margin answers, which a
small perturbation tips over in both directions while the accuracy stays put.

The trained model and its tokenizer are cached in ``$FLIPCHECK_CACHE`` (default
``~/.cache/flipcheck``) under a key that hashes the recipe, the data and :data:`DEMO_VERSION`, so a
changed recipe retrains and an unchanged one loads in a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flipcheck.compressors.registry import format_validation_error
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.tasks import packaged_task_dir
from flipcheck.models import read_provenance, save_model
from flipcheck.tiny import build_llama, build_tokenizer

log = logging.getLogger(__name__)

DEMO_VERSION = 1  # bump when the facts, templates or training code change meaning
DATA_SEED = 20240711  # seed of the fact table; part of the data, not of a training run
TASK_FILE = "facts.jsonl"
DEMO_TASKS: list[str] = ["flipcheck_demo_facts", "flipcheck_demo_letters"]
LETTERS = ("A", "B", "C", "D")
ProgressFn = Callable[[int, int, float], None]


# --------------------------------------------------------------------------- the fact table


@dataclass(frozen=True)
class Relation:
    """One kind of fact: how it is stated, how it is asked, and the values it can take."""

    name: str
    statement: str  # "{e}" entity, "{v}" value
    question: str
    values: tuple[str, ...]
    kind: str  # how entity names look: "place" (Capitalised + suffix), "thing" (lower case), "name"


RELATIONS: tuple[Relation, ...] = (
    Relation("capital", "The capital of {e} is {v}.", "What is the capital of {e}?",
             ("Mekton", "Dravel", "Quenhold", "Ostrin"), "place"),
    Relation("colour", "The colour of the {e} is {v}.", "What colour is the {e}?",
             ("red", "blue", "green", "yellow"), "thing"),
    Relation("moons", "The planet {e} has {v} moons.", "How many moons does the planet {e} have?",
             ("two", "three", "five", "seven"), "name"),
    Relation("job", "{e} works as a {v}.", "What does {e} work as?",
             ("baker", "pilot", "farmer", "doctor"), "name"),
    Relation("food", "The {e} eats {v}.", "What does the {e} eat?",
             ("fish", "grass", "seeds", "fruit"), "thing"),
    Relation("language", "The people of {e} speak {v}.", "What language do the people of {e} speak?",
             ("Velic", "Marran", "Sothi", "Quarish"), "place"),
)
ENTITIES_PER_RELATION = 100
FREQUENCIES = (1, 2, 4, 8)  # relative number of times a fact is shown in training
CERTAINTIES = (1.0, 0.8, 0.65, 0.55)  # share of a fact's showings that give its true value

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kl", "st", "tr", "th", "sh", "qu", "pl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "x", "k", "m")
_PLACE_SUFFIXES = ("ia", "land", "stan", "ovia", "era", "mar")


@dataclass(frozen=True)
class Fact:
    """One row of the table: `entity` has `value` for `relation`, asked with four `options`.

    Like facts on the web, some are contradicted in the training text: a share ``1 - certainty``
    of the fact's showings give `alternative` instead. The true value stays the majority, so a
    model that learned the text well answers it, with a margin that shrinks with the certainty.
    """

    id: int
    relation: str
    entity: str
    value: str
    options: tuple[str, ...]  # the relation's four values in a fixed order, the answer at `label`
    label: int
    frequency: int  # relative training frequency, one of FREQUENCIES
    certainty: float  # share of showings with the true value, one of CERTAINTIES
    alternative: str  # the competing value the other showings give

    @property
    def rel(self) -> Relation:
        return _RELATION_BY_NAME[self.relation]

    def statement(self, value: str | None = None) -> str:
        return self.rel.statement.format(e=self.entity, v=value or self.value)

    def question(self) -> str:
        return self.rel.question.format(e=self.entity)


_RELATION_BY_NAME = {r.name: r for r in RELATIONS}


def _pseudoword(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _entity_name(rng: random.Random, kind: str) -> str:
    if kind == "place":
        return (_pseudoword(rng, 1) + rng.choice(_ONSETS) + rng.choice(_PLACE_SUFFIXES)).capitalize()
    if kind == "thing":
        return _pseudoword(rng, rng.choice((1, 2)))
    return _pseudoword(rng, 2).capitalize()


def _balanced(levels: Sequence, n: int, rng: random.Random) -> list:
    out = [levels[i % len(levels)] for i in range(n)]
    rng.shuffle(out)
    return out


def demo_facts() -> list[Fact]:
    """The fixed table of made-up facts (deterministic: seeded by :data:`DATA_SEED`).

    Each relation gets :data:`ENTITIES_PER_RELATION` distinct invented entities. The options of a
    question are the relation's four values in a fixed order, so the distractors are the other
    values of the same attribute and a letter always names the same value. Values (hence gold
    positions), training frequencies and certainties are each spread evenly and shuffled.
    """
    rng = random.Random(DATA_SEED)
    taken: set[str] = {v.lower() for r in RELATIONS for v in r.values}
    facts: list[Fact] = []
    for rel in RELATIONS:
        if len(rel.values) != len(LETTERS):
            raise ValueError(f"relation {rel.name!r} needs exactly {len(LETTERS)} values")
        n = ENTITIES_PER_RELATION
        labels = _balanced(range(len(LETTERS)), n, rng)
        freqs = _balanced(FREQUENCIES, n, rng)
        certs = _balanced(CERTAINTIES, n, rng)
        for label, freq, cert in zip(labels, freqs, certs, strict=True):
            name = _entity_name(rng, rel.kind)
            while name.lower() in taken or len(name) < 4:
                name = _entity_name(rng, rel.kind)
            taken.add(name.lower())
            alt = rng.choice([v for i, v in enumerate(rel.values) if i != label])
            facts.append(Fact(len(facts), rel.name, name, rel.values[label], rel.values, label, freq, cert, alt))
    return facts


def qa_prompt(fact: Fact) -> str:
    """The continuation task's context; the answer follows after one space."""
    return f"Question: {fact.question()}\nAnswer:"


def letters_prompt(fact: Fact) -> str:
    """The MMLU-style context: the question, the lettered options, then ``Answer:``."""
    listed = "".join(f"{letter}. {o}\n" for letter, o in zip(LETTERS, fact.options, strict=True))
    return f"Question: {fact.question()}\n{listed}Answer:"


def task_docs(facts: Sequence[Fact] | None = None) -> list[dict]:
    """The evaluation documents of both demo tasks, one per fact (what ``facts.jsonl`` holds)."""
    facts = demo_facts() if facts is None else facts
    return [
        {
            "id": f.id,
            "relation": f.relation,
            "entity": f.entity,
            "question": f.question(),
            "options": list(f.options),
            "label": f.label,
            "answer": f.value,
            "frequency": f.frequency,
            "certainty": f.certainty,
            "alternative": f.alternative,
        }
        for f in facts
    ]


def demo_texts() -> list[str]:
    """The facts as text: each fact's statement, then each question with its answer.

    This is the knowledge the demo parent is trained on (it also sees the lettered form of each
    question, and the contradicting showings of less certain facts: :func:`training_documents`)
    and the calibration text of ``--calibration demo``.
    """
    facts = demo_facts()
    return [f.statement() for f in facts] + [f"{qa_prompt(f)} {f.value}" for f in facts]


def demo_task_dir() -> Path:
    """The packaged lm-eval task folder, to pass as ``include_path`` (works from any cwd)."""
    return packaged_task_dir()


def write_task_data(folder: str | os.PathLike | None = None) -> Path:
    """(Re)write ``facts.jsonl`` of the task folder from :func:`task_docs` (a maintainer's step)."""
    path = Path(folder or demo_task_dir()) / TASK_FILE
    path.write_text("".join(json.dumps(d) + "\n" for d in task_docs()))
    return path


# --------------------------------------------------------------------------- the training recipe


class DemoRecipe(BaseModel):
    """How the demo parent is built and trained. Every field is part of the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(1536, ge=300, le=8192, description="byte-level BPE vocabulary trained on the demo text")
    hidden_size: int = Field(128, ge=128, le=2048, multiple_of=128, description="model width (multiple of 128 for group-128 schemes)")
    intermediate_size: int = Field(256, ge=128, le=8192, multiple_of=128, description="MLP width (multiple of 128)")
    num_layers: int = Field(3, ge=1, le=32, description="decoder layers")
    num_heads: int = Field(4, ge=1, le=32, description="attention heads (hidden_size must divide by it)")
    seq_len: int = Field(128, ge=64, le=1024, description="tokens per packed training row")
    batch_size: int = Field(8, ge=1, le=1024, description="rows per optimizer step")
    steps: int = Field(800, ge=1, le=1_000_000, description="optimizer steps (about 80 s on one busy CPU core)")
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="peak AdamW learning rate (linear warm-up, cosine decay)")
    warmup: float = Field(0.05, ge=0.0, lt=1.0, description="fraction of the steps spent warming up")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW decoupled weight decay")
    template_weights: tuple[float, float, float] = Field(
        (0.25, 0.5, 0.25), description="how often a shown fact is its statement, its question+answer, its lettered question"
    )
    seed: int = Field(0, ge=0, description="seed of the initialisation and of the sampled batches")

    @field_validator("template_weights")
    @classmethod
    def _weights(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(w < 0 for w in v) or sum(v) <= 0:
            raise ValueError("template weights must be >= 0 with a positive sum")
        return v

    @model_validator(mode="after")
    def _heads(self) -> DemoRecipe:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        return self


def make_recipe(**settings) -> DemoRecipe:
    """A validated :class:`DemoRecipe`; a bad setting raises FlipcheckError naming it."""
    try:
        return DemoRecipe(**settings)
    except ValidationError as err:
        allowed = ", ".join(DemoRecipe.model_fields)
        raise FlipcheckError(format_validation_error("demo recipe", err) + f". Settings: {allowed}") from err


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("FLIPCHECK_CACHE") or Path.home() / ".cache" / "flipcheck").expanduser()


def recipe_key(recipe: DemoRecipe) -> str:
    """Hash of :data:`DEMO_VERSION`, the recipe and the data: changes whenever the parent would."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"v{DEMO_VERSION}|".encode())
    h.update(recipe.model_dump_json().encode())
    facts = demo_facts()
    h.update(json.dumps(task_docs(facts), sort_keys=True).encode())
    h.update(json.dumps(training_documents(facts)).encode())
    return h.hexdigest()


def demo_cache_path(recipe: DemoRecipe | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    recipe = recipe or DemoRecipe()
    return _cache_root(cache_dir) / "demo" / f"parent-{recipe_key(recipe)}"


# --------------------------------------------------------------------------- data for training


def training_documents(facts: Sequence[Fact]) -> list[tuple[int, bool, int, str]]:
    """Every text a fact is shown as: ``(fact index, true?, template, text)``.

    Templates: 0 the statement, 1 the question with its answer (the continuation task's
    format), 2 the lettered question with its answer letter (the MMLU-style task's format); each
    once with the true value and once with the fact's contradicting alternative.
    """
    docs: list[tuple[int, bool, int, str]] = []
    for i, f in enumerate(facts):
        for true, value in ((True, f.value), (False, f.alternative)):
            docs.append((i, true, 0, f.statement(value)))
            docs.append((i, true, 1, f"{qa_prompt(f)} {value}"))
            docs.append((i, true, 2, f"{letters_prompt(f)} {LETTERS[f.options.index(value)]}"))
    return docs


class BatchSampler:
    """Packs sampled documents into rows of ``seq_len`` tokens, seeded.

    A fact is drawn with probability proportional to its frequency; it is shown with its true
    value with probability ``certainty``, else with its alternative; the template is drawn in
    proportion to ``template_weights``. Documents end with ``</s>`` and are packed whole (a row
    starts at a document start, as an evaluation context does); the tail of a row is padding
    whose labels are ignored (-100).
    """

    def __init__(self, facts: Sequence[Fact], tokenizer, recipe: DemoRecipe):
        self.recipe = recipe
        self.pad_id = tokenizer.pad_token_id
        docs = training_documents(facts)
        ids = tokenizer([d[3] for d in docs], add_special_tokens=False)["input_ids"]
        # docs[fact][0 = alternative, 1 = true][template]
        self.docs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in facts]
        for (fi, true, _, _), toks in zip(docs, ids, strict=True):
            toks = list(toks) + [tokenizer.eos_token_id]
            if len(toks) > recipe.seq_len:
                raise FlipcheckError(f"seq_len={recipe.seq_len} is shorter than a demo document ({len(toks)} tokens)")
            self.docs[fi][int(true)].append(torch.tensor(toks))
        self.fact_weights = torch.tensor([float(f.frequency) for f in facts])
        self.certainty = torch.tensor([f.certainty for f in facts])
        self.template_weights = torch.tensor(recipe.template_weights, dtype=torch.float)
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self._pending: torch.Tensor | None = None  # drawn but did not fit the previous row

    def _draw(self) -> torch.Tensor:
        fi = int(torch.multinomial(self.fact_weights, 1, generator=self.gen))
        true = bool(torch.rand((), generator=self.gen) < self.certainty[fi])
        tmpl = int(torch.multinomial(self.template_weights, 1, generator=self.gen))
        return self.docs[fi][int(true)][tmpl]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of shape ``(batch_size, seq_len)``; padding labelled -100.

        The document that does not fit a row is kept for the next row, so no draw is wasted.
        """
        r = self.recipe
        input_ids = torch.full((r.batch_size, r.seq_len), self.pad_id, dtype=torch.long)
        labels = torch.full((r.batch_size, r.seq_len), -100, dtype=torch.long)
        for row in range(r.batch_size):
            filled = 0
            while True:
                if self._pending is None:
                    self._pending = self._draw()
                doc = self._pending
                if filled + len(doc) > r.seq_len:
                    break
                input_ids[row, filled : filled + len(doc)] = doc
                filled += len(doc)
                self._pending = None
            labels[row, :filled] = input_ids[row, :filled]
        return input_ids, labels


def lr_at(step: int, recipe: DemoRecipe) -> float:
    """Linear warm-up to ``lr`` over ``warmup * steps``, then cosine decay to ``lr / 10``."""
    warm = max(1, int(recipe.warmup * recipe.steps))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(1, recipe.steps - warm)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


# --------------------------------------------------------------------------- training


def build_demo_tokenizer(recipe: DemoRecipe | None = None):
    """Byte-level BPE trained on the demo text and the lettered prompts (deterministic)."""
    recipe = recipe or DemoRecipe()
    facts = demo_facts()
    return build_tokenizer(demo_texts() + [f"{letters_prompt(f)} {LETTERS[f.label]}" for f in facts], recipe.vocab_size)


def build_demo_model(recipe: DemoRecipe, vocab_size: int):
    """The untrained demo Llama (float32, initialised from ``recipe.seed``)."""
    return build_llama(
        vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        max_position_embeddings=max(512, recipe.seq_len),
        seed=recipe.seed,
    )


def train(model, sampler: BatchSampler, recipe: DemoRecipe, progress: ProgressFn | None = None) -> list[float]:
    """Plain AdamW on next-token cross-entropy over the packed rows; returns the loss per step.

    loss = mean over non-padding positions t of -log p(x_{t+1} | x_{<=t}); weight decay on
    matrices only; gradient norm clipped to 1; learning rate from :func:`lr_at`. Leaves the model
    in eval mode.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    losses: list[float] = []
    every = max(1, recipe.steps // 10)
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        input_ids, labels = sampler.batch()
        loss = model(input_ids=input_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, recipe.steps, losses[-1])
        if (step + 1) % every == 0 or step + 1 == recipe.steps:
            log.info("demo training: step %d/%d loss %.3f (%.0f s)", step + 1, recipe.steps, losses[-1], time.perf_counter() - t0)
    model.eval()
    return losses


def train_demo_model(
    out: str | os.PathLike | None = None,
    *,
    seed: int | None = None,
    steps: int | None = None,
    progress: ProgressFn | None = None,
    recipe: DemoRecipe | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = 1,
) -> Path:
    """Train the demo parent and save it (model, tokenizer, ``flipcheck.json``) to `out`.

    `seed` and `steps` override the recipe's; `out` defaults to the recipe's cache folder.
    `progress(step, total, loss)` is called after every optimizer step. `num_threads` is torch's
    intra-op thread count while training (restored after; None keeps the current one). One
    thread is the default: the demo's small matrices gain little from more, the result does not
    depend on the machine's core count, and on a busy 2-core machine 2 threads measured 6x slower.
    """
    recipe = recipe or DemoRecipe()
    overrides = {k: v for k, v in {"seed": seed, "steps": steps}.items() if v is not None}
    if overrides:
        recipe = make_recipe(**{**recipe.model_dump(), **overrides})
    out = Path(out) if out is not None else demo_cache_path(recipe, cache_dir)
    t0 = time.perf_counter()
    tok = build_demo_tokenizer(recipe)
    facts = demo_facts()
    model = build_demo_model(recipe, len(tok))
    sampler = BatchSampler(facts, tok, recipe)
    log.info("training the demo parent (%d facts, %d steps) into %s", len(facts), recipe.steps, out)
    threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        losses = train(model, sampler, recipe, progress)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    provenance = {
        "kind": "demo parent",
        "description": "demo parent: tiny Llama trained by flipcheck on its synthetic facts",
        "demo_version": DEMO_VERSION,
        "demo_recipe": recipe.model_dump(),  # not "recipe": that key lists a child's compression steps
        "recipe_key": recipe_key(recipe),
        "tasks": DEMO_TASKS,
        "calibration_source": "demo",  # the default calibration of this parent: its own facts
        "train": {"first_loss": losses[0], "final_loss": losses[-1], "wall_time_s": round(wall, 2)},
    }
    save_model(model, tok, out, provenance)
    return out


def demo_model_path(
    cache_dir: str | os.PathLike | None = None,
    *,
    retrain: bool = False,
    recipe: DemoRecipe | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """The demo parent's folder: cached if a complete one with the same key exists, else trained."""
    recipe = recipe or DemoRecipe()
    path = demo_cache_path(recipe, cache_dir)
    prov = read_provenance(path) if path.is_dir() else None
    # a parent cached by an older flipcheck lacks calibration_source: retrain it so it names its own text
    current = prov is not None and prov.get("recipe_key") == recipe_key(recipe) and prov.get("calibration_source")
    if not retrain and current:
        log.info("demo parent cached at %s", path)
        return path
    return train_demo_model(path, progress=progress, recipe=recipe)


# --------------------------------------------------------------------------- the real-model demo's task

WORLD_TASK = "flipcheck_world_facts"
WORLD_FILE = "world_facts.jsonl"


def world_task_dir() -> Path:
    """The packaged folder of ``flipcheck_world_facts`` (inside the demo task folder, so lm-eval,
    which indexes that folder recursively, knows the task by name everywhere)."""
    return demo_task_dir() / "world_facts"


def world_fact_docs() -> list[dict]:
    """The questions of ``flipcheck_world_facts``, as shipped: widely known real-world facts in
    geography, science, history, the arts and language, written for flipcheck (not taken from any
    benchmark), four options each with the answer at ``label``, gold positions balanced per category."""
    path = world_task_dir() / WORLD_FILE
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def world_fact_texts() -> list[str]:
    """Calibration text of ``demo --real`` (the named source ``world_facts``): every question's prompt
    as the task asks it, without its answer, so GPTQ and Wanda calibrate offline on in-domain text
    and never see a label."""
    return [f"Question: {d['question']}\nAnswer:" for d in world_fact_docs()]
