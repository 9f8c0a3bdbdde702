"""The offline demo: fact table, packaged lm-eval task folder, training loop and cache.

The full demo training (about a minute and a half) is exercised by ``make demo``; here training
runs a tiny recipe for a few steps.
"""

from __future__ import annotations

import collections
import json
import math
import os

import pytest
import torch

from flipcheck import demo
from flipcheck.errors import FlipcheckError
from flipcheck.models import fingerprint, load_model, load_tokenizer, read_provenance, resolve_source

N_FACTS = len(demo.RELATIONS) * demo.ENTITIES_PER_RELATION


def tiny_recipe(**overrides) -> demo.DemoRecipe:
    """One decoder layer, small batches: a few steps take well under a second."""
    settings = dict(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=128,
        num_layers=1,
        num_heads=2,
        seq_len=128,
        batch_size=4,
        steps=20,
        lr=3e-3,
    )
    return demo.make_recipe(**{**settings, **overrides})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from a second thread and stall badly on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo_tok():
    return demo.build_demo_tokenizer(tiny_recipe())


# --------------------------------------------------------------------------- facts and task data


def test_fact_table_is_fixed_and_well_formed():
    facts = demo.demo_facts()
    assert facts == demo.demo_facts()  # deterministic
    assert len(facts) == N_FACTS
    entities = [f.entity for f in facts]
    assert len(set(entities)) == len(entities)
    values = {v for r in demo.RELATIONS for v in r.values}
    assert not values & set(entities)
    for f in facts:
        rel = f.rel
        assert f.options == rel.values and len(f.options) == 4  # distractors: the same attribute's values
        assert f.options[f.label] == f.value
        assert f.alternative in f.options and f.alternative != f.value
        assert f.frequency in demo.FREQUENCIES and f.certainty in demo.CERTAINTIES
        assert f.entity in f.statement() and f.value in f.statement() and f.entity in f.question()
    # gold positions and training frequencies are balanced within every relation
    for rel in demo.RELATIONS:
        mine = [f for f in facts if f.relation == rel.name]
        assert max(collections.Counter(f.label for f in mine).values()) <= math.ceil(len(mine) / 4)
        assert max(collections.Counter(f.frequency for f in mine).values()) <= math.ceil(len(mine) / 4)
        assert max(collections.Counter(f.certainty for f in mine).values()) <= math.ceil(len(mine) / 4)
    texts = demo.demo_texts()
    assert texts[: len(facts)] == [f.statement() for f in facts]
    assert texts[len(facts) :] == [f"{demo.qa_prompt(f)} {f.value}" for f in facts]


def test_shipped_task_data_matches_the_generator(tmp_path):
    """facts.jsonl in the package is what the demo parent is trained on (regenerate with write_task_data)."""
    shipped = (demo.demo_task_dir() / demo.TASK_FILE).read_text()
    assert [json.loads(line) for line in shipped.splitlines()] == demo.task_docs()
    assert demo.write_task_data(tmp_path).read_text() == shipped


def test_task_folder_loads_through_lm_eval_from_any_cwd(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    tm = TaskManager(include_path=str(demo.demo_task_dir()), include_defaults=False)
    assert set(demo.DEMO_TASKS) <= set(tm.all_tasks)
    tasks = tm.load(demo.DEMO_TASKS)["tasks"]
    facts = demo.demo_facts()
    for name in demo.DEMO_TASKS:
        task = tasks[name]
        docs = list(task.test_docs())
        assert len(docs) == N_FACTS
        for doc, fact in zip(docs, facts, strict=True):
            choices = task.doc_to_choice(doc)
            target = task.doc_to_target(doc)
            assert len(choices) == 4 and len(set(choices)) == 4
            assert isinstance(target, int) and 0 <= target < 4
            text = task.doc_to_text(doc)
            if name == "flipcheck_demo_facts":
                assert text == demo.qa_prompt(fact)  # the format the parent is trained on
                assert choices[target] == fact.value
            else:
                assert text == demo.letters_prompt(fact)
                assert choices == list(demo.LETTERS) and choices[target] == demo.LETTERS[fact.label]
                assert f"\n{choices[target]}. {fact.value}\n" in text
    assert os.listdir(tmp_path) == []


def test_lm_eval_scores_match_direct_loglikelihoods(tmp_path, monkeypatch, demo_tok):
    """simple_evaluate on the packaged tasks, from another cwd, against our own forward pass."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from flipcheck.tiny import build_llama

    monkeypatch.chdir(tmp_path)
    model = build_llama(len(demo_tok), seed=3)
    lm = HFLM(pretrained=model, tokenizer=demo_tok, batch_size=8)
    tm = TaskManager(include_path=str(demo.demo_task_dir()), include_defaults=False)
    limit = 5
    out = simple_evaluate(model=lm, tasks=demo.DEMO_TASKS, task_manager=tm, limit=limit, log_samples=True)
    facts = demo.demo_facts()

    @torch.no_grad()
    def loglik(context: str, continuation: str) -> float:
        ctx = demo_tok(context, add_special_tokens=False)["input_ids"]
        whole = demo_tok(context + continuation, add_special_tokens=False)["input_ids"]
        assert whole[: len(ctx)] == ctx
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
        return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))

    for name in demo.DEMO_TASKS:
        samples = out["samples"][name]
        assert len(samples) == limit
        correct = []
        for s in samples:
            fact = facts[s["doc_id"]]
            prompt = demo.qa_prompt(fact) if name == "flipcheck_demo_facts" else demo.letters_prompt(fact)
            options = fact.options if name == "flipcheck_demo_facts" else demo.LETTERS
            assert [tuple(a) for a in s["arguments"]] == [(prompt, f" {o}") for o in options]
            lls = [r[0] for r in s["filtered_resps"]]
            mine = [loglik(prompt, f" {o}") for o in options]
            assert lls == pytest.approx(mine, abs=1e-4)
            assert s["target"] == fact.label
            correct.append(max(range(4), key=lambda j: mine[j]) == fact.label)
        assert out["results"][name]["acc,none"] == pytest.approx(sum(correct) / limit)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- training


def _doc_owners(sampler) -> dict[tuple[int, ...], tuple[int, bool]]:
    """token ids of every training document -> (fact index, shows the true value?)"""
    owner = {}
    for fi, variants in enumerate(sampler.docs):
        for true, per_template in enumerate(variants):
            for t in per_template:
                owner[tuple(t.tolist())] = (fi, bool(true))
    return owner


def test_training_documents_show_each_fact_true_and_contradicted():
    facts = demo.demo_facts()
    docs = demo.training_documents(facts)
    assert len(docs) == 6 * len(facts) == len({d[3] for d in docs})
    f = facts[0]
    mine = {(true, tmpl): text for fi, true, tmpl, text in docs if fi == 0}
    assert mine[(True, 0)] == f.statement()
    assert mine[(True, 1)] == f"{demo.qa_prompt(f)} {f.value}"
    assert mine[(True, 2)] == f"{demo.letters_prompt(f)} {demo.LETTERS[f.label]}"
    assert mine[(False, 1)] == f"{demo.qa_prompt(f)} {f.alternative}"
    assert mine[(False, 2)] == f"{demo.letters_prompt(f)} {demo.LETTERS[f.options.index(f.alternative)]}"


def test_batch_sampler_packs_whole_documents(demo_tok):
    recipe = tiny_recipe(batch_size=8)
    facts = demo.demo_facts()
    docs = set(_doc_owners(demo.BatchSampler(facts, demo_tok, recipe)))
    assert len(docs) == 6 * N_FACTS
    a, b = demo.BatchSampler(facts, demo_tok, recipe), demo.BatchSampler(facts, demo_tok, recipe)
    for _ in range(3):
        (ia, la), (ib, lb) = a.batch(), b.batch()
        assert torch.equal(ia, ib) and torch.equal(la, lb)  # seeded
        assert ia.shape == (recipe.batch_size, recipe.seq_len)
        for row, lab in zip(ia.tolist(), la.tolist(), strict=True):
            n = sum(x != -100 for x in lab)
            assert lab[:n] == row[:n] and all(x == -100 for x in lab[n:])
            assert all(x == demo_tok.pad_token_id for x in row[n:])
            assert row[n - 1] == demo_tok.eos_token_id
            # the used part is a sequence of whole documents, each ending with </s>
            pieces, cur = [], []
            for x in row[:n]:
                cur.append(x)
                if x == demo_tok.eos_token_id:
                    pieces.append(tuple(cur))
                    cur = []
            assert pieces and all(p in docs for p in pieces)
            assert recipe.seq_len - n < max(len(p) for p in docs)  # rows are filled


def test_sampler_follows_frequencies_certainties_and_template_weights(demo_tok):
    recipe = tiny_recipe(template_weights=(0.0, 1.0, 1.0))
    sampler = demo.BatchSampler(demo.demo_facts(), demo_tok, recipe)
    owner = _doc_owners(sampler)
    facts = demo.demo_facts()
    freq = [f.frequency for f in facts]
    statements = {tuple(demo_tok(f.statement(v), add_special_tokens=False)["input_ids"] + [demo_tok.eos_token_id])
                  for f in facts for v in (f.value, f.alternative)}
    draws = [tuple(sampler._draw().tolist()) for _ in range(6000)]
    assert not statements & set(draws)  # template weight 0: never drawn
    counts = collections.Counter(freq[owner[d][0]] for d in draws)
    total = sum(q * freq.count(q) for q in demo.FREQUENCIES)
    for q in demo.FREQUENCIES:
        assert counts[q] / len(draws) == pytest.approx(q * freq.count(q) / total, abs=0.03)
    for c in demo.CERTAINTIES:
        shown = [owner[d][1] for d in draws if facts[owner[d][0]].certainty == c]
        assert sum(shown) / len(shown) == pytest.approx(c, abs=0.05)


def test_learning_rate_schedule():
    r = tiny_recipe(steps=100, warmup=0.1, lr=1e-3)
    assert demo.lr_at(0, r) == pytest.approx(1e-4)
    assert demo.lr_at(9, r) == pytest.approx(1e-3)
    assert demo.lr_at(10, r) == pytest.approx(1e-3)
    assert demo.lr_at(55, r) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way through the cosine
    assert demo.lr_at(100, r) == pytest.approx(1e-4)


def _train(recipe, tok):
    model = demo.build_demo_model(recipe, len(tok))
    calls = []
    losses = demo.train(model, demo.BatchSampler(demo.demo_facts(), tok, recipe), recipe, progress=lambda *a: calls.append(a))
    return model, losses, calls


def test_training_reduces_loss_and_is_deterministic(demo_tok):
    recipe = tiny_recipe(steps=20)
    m1, losses1, calls = _train(recipe, demo_tok)
    assert len(losses1) == 20 and all(math.isfinite(x) for x in losses1)
    assert sum(losses1[-5:]) / 5 < 0.8 * sum(losses1[:5]) / 5
    assert [c[0] for c in calls] == list(range(1, 21)) and all(c[1] == 20 for c in calls)
    assert [c[2] for c in calls] == losses1
    assert not m1.training
    m2, losses2, _ = _train(recipe, demo_tok)
    assert losses2 == losses1 and fingerprint(m2) == fingerprint(m1)
    other = tiny_recipe(steps=20, seed=1)  # another seed: another initialisation and batch order
    assert fingerprint(demo.build_demo_model(other, len(demo_tok))) != fingerprint(demo.build_demo_model(recipe, len(demo_tok)))
    ids0, _ = demo.BatchSampler(demo.demo_facts(), demo_tok, recipe).batch()
    ids1, _ = demo.BatchSampler(demo.demo_facts(), demo_tok, other).batch()
    assert not torch.equal(ids0, ids1)


def test_train_demo_model_saves_a_loadable_parent(tmp_path):
    threads_seen = []
    torch.set_num_threads(2)
    try:
        out = demo.train_demo_model(
            tmp_path / "parent", steps=3, recipe=tiny_recipe(), progress=lambda *a: threads_seen.append(torch.get_num_threads())
        )
        assert threads_seen == [1, 1, 1] and torch.get_num_threads() == 2  # one thread while training, restored
    finally:
        torch.set_num_threads(1)
    prov = read_provenance(out)
    assert prov["kind"] == "demo parent" and "demo parent" in prov["description"]
    assert prov["demo_recipe"]["steps"] == 3 and "recipe" not in prov and prov["recipe_key"] == demo.recipe_key(tiny_recipe(steps=3))
    model = load_model(out, device="cpu")
    tok = load_tokenizer(out)
    assert prov["fingerprint"] == resolve_source(out).fingerprint  # bound to the saved weight files
    assert tok("Question: What colour is the")["input_ids"] == demo.build_demo_tokenizer(tiny_recipe())(
        "Question: What colour is the"
    )["input_ids"]
    assert model.config.hidden_size % 128 == 0 and model.config.intermediate_size % 128 == 0


# --------------------------------------------------------------------------- cache


def test_cache_reuses_the_parent_and_retrains_on_a_changed_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPCHECK_CACHE", str(tmp_path / "cache"))
    trained = []
    real = demo.train_demo_model

    def counting(*args, **kwargs):
        trained.append(kwargs.get("recipe"))
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "train_demo_model", counting)
    recipe = tiny_recipe(steps=2)
    first = demo.demo_model_path(recipe=recipe)
    assert first.parent.parent == tmp_path / "cache" and len(trained) == 1
    stamp = (first / "flipcheck.json").stat().st_mtime_ns
    again = demo.demo_model_path(recipe=recipe)
    assert again == first and len(trained) == 1
    assert (first / "flipcheck.json").stat().st_mtime_ns == stamp

    changed = demo.demo_model_path(recipe=tiny_recipe(steps=3))
    assert changed != first and len(trained) == 2
    assert read_provenance(changed)["demo_recipe"]["steps"] == 3

    demo.demo_model_path(recipe=recipe, retrain=True)
    assert len(trained) == 3

    (first / "flipcheck.json").unlink()  # an incomplete folder is not a cache hit
    assert demo.demo_model_path(recipe=recipe) == first and len(trained) == 4

    other = demo.demo_model_path(tmp_path / "elsewhere", recipe=recipe)
    assert other.is_relative_to(tmp_path / "elsewhere") and len(trained) == 5


def test_recipe_key_tracks_version_and_recipe(monkeypatch):
    base = demo.recipe_key(tiny_recipe())
    assert base == demo.recipe_key(tiny_recipe())
    assert demo.recipe_key(tiny_recipe(seed=1)) != base
    monkeypatch.setattr(demo, "DEMO_VERSION", demo.DEMO_VERSION + 1)
    assert demo.recipe_key(tiny_recipe()) != base


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"hidden_size": 100}, ["hidden_size", "multiple of 128"]),
        ({"num_heads": 3}, ["num_heads=3"]),
        ({"template_weights": (0, 0, 0)}, ["template_weights"]),
        ({"steps": 0}, ["steps"]),
        ({"bogus": 1}, ["bogus", "Settings:"]),
    ],
)
def test_bad_recipe_settings_fail_early(settings, words):
    with pytest.raises(FlipcheckError) as err:
        demo.make_recipe(**settings)
    for w in words:
        assert w in str(err.value)


def test_train_demo_model_rejects_bad_overrides(tmp_path):
    with pytest.raises(FlipcheckError, match="steps"):
        demo.train_demo_model(tmp_path / "x", steps=0, recipe=tiny_recipe())
    assert not (tmp_path / "x").exists()
