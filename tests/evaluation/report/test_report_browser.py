"""report.html opened in a real headless Chromium: it renders, its plots decode, and it is not blank.

The report is built the way a sweep builds it (lm-eval per-sample dicts -> build_rows ->
summarize_task/aggregate -> child_entry/new_report -> write_report): a Wanda sparsity sweep of
three children, a GPTQ child without a numeric strength, and the noise floor, on a
multiple-choice task and a generative task. Skipped when no Chromium/Chrome binary is installed.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from flipcheck.evaluation.report import child_entry, new_report, write_report
from flipcheck.evaluation.report.text import task_label
from flipcheck.evaluation.samples import aggregate, attach_vocab, build_rows, summarize_task

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WIDTH, HEIGHT = 1400, 3000
ANIMALS = ["cat", "dog", "horse", "mouse", "bird", "fish", "cow", "sheep", "goat", "lion"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]


def _browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


# ---------------------------------------------------------------------------------------------
# a realistic run: lm-eval per-sample dicts for the parent and for each child


def _mc_sample(doc_id: int, lls: np.ndarray, gold: int, choices: list[str]) -> dict:
    animal = ANIMALS[doc_id % len(ANIMALS)]
    pred = int(np.argmax(lls))
    return {
        "doc_id": doc_id, "target": gold,
        "arguments": [(f"Question: What color is the {animal} in picture {doc_id}?\nAnswer:", f" {c}") for c in choices],
        "filtered_resps": [(float(x), False) for x in lls], "metrics": ["acc"], "acc": float(pred == gold),
    }


def _gen_sample(doc_id: int, out: str, gold: str) -> dict:
    a, b = doc_id % 7 + 2, doc_id % 5 + 3
    return {
        "doc_id": doc_id, "target": gold,
        "arguments": [(f"Question: Tom has {a} apples and buys {b} more. How many apples does he have?\nAnswer:",
                       {"until": ["\n"]})],
        "resps": [[f"He has {out} apples."]], "filtered_resps": [out], "metrics": ["exact_match"],
        "exact_match": float(out == gold),
    }


def build_run(n_mc: int = 120, n_gen: int = 30, seed: int = 7) -> tuple[dict, list[dict]]:
    """(report, rows): parent vs four children and the noise floor on an MC and a generative task.

    Each child perturbs the parent's option log-likelihoods by Gaussian noise of a given scale plus
    a pull of 0.8 x scale towards the gold option (a compressed model keeps most of what the parent
    knows), so answers flip in both directions while accuracy barely moves (the paper's
    observation); it also rewrites a share of the parent's generative answers, half of them right.
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_mc, 4)) * 1.5
    right = rng.random(n_mc) < 0.62
    golds = [int(np.argmax(b)) if r else int((np.argmax(b) + 1 + rng.integers(0, 3)) % 4) for b, r in zip(base, right, strict=True)]
    choices = [list(rng.choice(COLORS, 4, replace=False)) for _ in range(n_mc)]
    gen_gold = [str(i % 7 + 2 + i % 5 + 3) for i in range(n_gen)]
    gen_parent = [g if rng.random() < 0.5 else str(int(g) + 1) for g in gen_gold]
    parent_mc = [_mc_sample(i, base[i], golds[i], choices[i]) for i in range(n_mc)]
    parent_gen = [_gen_sample(i, gen_parent[i], gen_gold[i]) for i in range(n_gen)]

    def child(name: str, method: str, strength: dict | None, scale: float, bits: float, sparsity: float,
              settings: dict):
        ll = base + scale * rng.standard_normal(base.shape) + 0.8 * scale * np.eye(4)[golds]
        changed = rng.random(n_gen) < min(1.0, scale)
        outs = [(gen_gold[i] if rng.random() < 0.5 else str(int(gen_gold[i]) - 1)) if changed[i] else gen_parent[i]
                for i in range(n_gen)]
        rows_by_task = {
            "arc_colors": build_rows("arc_colors", parent_mc, [_mc_sample(i, ll[i], golds[i], choices[i]) for i in range(n_mc)]),
            "gsm_apples": build_rows("gsm_apples", parent_gen, [_gen_sample(i, outs[i], gen_gold[i]) for i in range(n_gen)]),
        }
        for row in rows_by_task["arc_colors"]:  # per-token vocabulary KL and top-1 agreement
            kl = np.abs(rng.standard_normal(3)) * scale**2 * 0.05
            attach_vocab(row, kl, (rng.random(3) > scale / 4).astype(float))
        summaries = {t: summarize_task(r, n_boot=200) for t, r in rows_by_task.items()}
        agg = aggregate(summaries, rows_by_task, n_boot=200)
        entry = child_entry(
            name, summaries, micro=agg["micro"], macro=agg["macro"], source=f"/runs/sweep/children/{name}",
            fingerprint=f"fp-{name}", method=method, settings=settings,
            strength=strength, compression=[{"method": method, "bits_per_weight": bits, "sparsity": sparsity}],
        )
        return entry, [{"child": name, **r.to_dict()} for t in rows_by_task for r in rows_by_task[t]]

    entries, rows = [], []
    for name, method, strength, scale, bits, sparsity, settings in (
        ("wanda-20", "wanda", {"sparsity": 0.2}, 0.3, 16.0, 0.2, {"sparsity": 0.2}),
        ("wanda-40", "wanda", {"sparsity": 0.4}, 0.6, 16.0, 0.4, {"sparsity": 0.4}),
        ("wanda-60", "wanda", {"sparsity": 0.6}, 1.2, 16.0, 0.6, {"sparsity": 0.6}),
        ("gptq-w4a16", "gptq", None, 0.5, 4.25, 0.0, {"scheme": "W4A16", "group_size": 128}),
    ):
        e, r = child(name, method, strength, scale, bits, sparsity, settings)
        entries.append(e)
        rows += r
    floor, _ = child("noise floor (parent, batch size 1)", "noise_floor", None, 0.02, 32.0, 0.0, {"batch_size": 1})
    report = new_report(
        {"source": "/models/tiny-llama", "fingerprint": "fp-parent"},
        {"tasks": ["arc_colors", "gsm_apples"], "num_fewshot": 0, "limit": None, "seed": 0, "batch_size": 8,
         "dtype": "float32", "device": "cpu"},
        entries,
        noise_floor=floor,
    )
    return report, rows


# ---------------------------------------------------------------------------------------------
# the browser


def _chromium(binary: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile, HOME and working directory inside `tmp`."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}", *args]
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


class _Dom(HTMLParser):
    """Tables (rows of cell texts, rowspans filled in), <img> attributes and the text of a DOM."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.imgs: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self.pre: dict[str, str] = {}
        self._cell: list[str] | None = None
        self._pre: str | None = None
        self._spans: list[tuple[int, str, int]] = []  # (column, text, rows left) of the open table

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
            self._spans = []
        elif tag == "tr" and self.tables:
            row: list[str] = []
            for col, text, _ in sorted(self._spans):
                row.insert(col, text)
            self._spans = [(c, t, n - 1) for c, t, n in self._spans if n > 1]
            self.tables[-1].append(row)
        elif tag in ("td", "th"):
            self._cell = []
            self._rowspan = int(a.get("rowspan") or 1)
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "pre":
            self._pre = a.get("id") or ""
            self.pre[self._pre] = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            text = " ".join("".join(self._cell).split())
            row = self.tables[-1][-1]
            if self._rowspan > 1:
                self._spans.append((len(row), text, self._rowspan - 1))
            row.append(text)
            self._cell = None
        elif tag == "pre":
            self._pre = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._pre is not None:
            self.pre[self._pre] += data

    def table_with(self, *headers: str) -> list[dict[str, str]]:
        """The rows, as {column: text}, of the first table with a column named each of `headers`."""
        table = next(t for t in self.tables if t and all(h in t[0] for h in headers))
        return [dict(zip(table[0], r, strict=True)) for r in table[1:]]


# a check the test adds to a copy of the page (the report itself has no script): the size each
# <img> decoded to, written into the DOM once everything has loaded
_IMG_CHECK = ("<script>window.addEventListener('load', () => { const p = document.createElement('pre'); "
              "p.id = 'imgcheck'; p.textContent = [...document.images].map(i => `${i.complete} ${i.naturalWidth} "
              "${i.naturalHeight}`).join('\\n'); document.body.appendChild(p); });</script>")


@pytest.fixture(scope="module")
def browser():
    path = _browser()
    if path is None:
        pytest.skip(f"no Chromium/Chrome binary on PATH (looked for {', '.join(BROWSERS)})")
    return path


@pytest.fixture(scope="module")
def run():
    return build_run()


def test_screenshot_is_a_full_size_page_with_plots(browser, run, tmp_path):
    report, rows = run
    page = write_report(tmp_path / "run", report, rows) / "report.html"
    shot = tmp_path / "shot.png"
    _chromium(browser, tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", page.as_uri())

    from PIL import Image

    with Image.open(shot) as im:
        assert im.format == "PNG"
        assert im.size == (WIDTH, HEIGHT)
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    inked = (rgb.min(axis=2) < 235).mean()
    assert inked > 0.04, f"only {inked:.1%} of the screenshot is not white"
    q = rgb.reshape(-1, 3) // 8
    colours = len(np.unique(q[:, 0] * 1024 + q[:, 1] * 32 + q[:, 2]))
    assert colours > 200, f"only {colours} distinct colours (in steps of 8): no plots or colour on the page"
    # the top of the page is the report, not an error page: dark heading text in the first 60 rows
    assert (rgb[:60].max(axis=2) < 80).sum() > 200


def test_dumped_dom_has_the_figures_the_plots_and_the_flipped_questions(browser, run, tmp_path):
    report, rows = run
    folder = write_report(tmp_path / "run", report, rows)
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page
    check = folder / "check.html"
    check.write_text(page.replace("</body>", _IMG_CHECK + "</body>"), encoding="utf-8")
    res = _chromium(browser, tmp_path, "--virtual-time-budget=5000", "--dump-dom", check.as_uri())
    dom = _Dom()
    dom.feed(res.stdout)
    text = " ".join(" ".join(dom.text).split())

    # the line over all children and one card per child with its accuracy change and flips
    for c in report["children"]:
        s = c["micro"]
        assert f"{c['name']} " in text
        assert f"{100 * s['flips']:.1f}% of answers flipped" in text
    lo = min(c["micro"]["flips"] for c in report["children"])
    hi = max(c["micro"]["flips"] for c in report["children"])
    assert f"while {100 * lo:.1f}–{100 * hi:.1f}% of answers flipped" in text

    # the table: a row per child and task plus micro, the noise floor included, figures as computed
    table = dom.table_with("flips")
    entries = [*report["children"], report["noise_floor"]]
    assert len(table) == sum(len(c["tasks"]) + 1 for c in entries)
    for c in entries:
        label = c["name"]  # a floor row is labelled by its name, which starts with "noise floor"
        for task, s in [*c["tasks"].items(), ("micro (all questions)", c["micro"])]:
            row = next(r for r in table if r["child"] == label and r["task"] == task_label(task, s))
            assert row["n"] == str(s["n"])
            assert row["acc P"] == f"{100 * s['acc_P']:.1f}%" and row["acc C"] == f"{100 * s['acc_C']:.1f}%"
            assert row["flips"].startswith(f"{100 * s['flips']:.1f}% {100 * s['flips_c2i']:.1f}% c→i")

    # four plots, inline PNGs that the browser decoded to the size stored in them
    from PIL import Image

    assert [i.get("alt") for i in dom.imgs] == ["Accuracy change vs flips", "Flips vs KL", "Sweeps",
                                                "Flip rate vs the parent's top margin"]
    decoded = [line.split() for line in dom.pre["imgcheck"].strip().splitlines()]
    assert len(decoded) == 4
    for img, (complete, w, h) in zip(dom.imgs, decoded, strict=True):
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert (complete, int(w), int(h)) == ("true", *im.size)

    # the flipped questions: every row whose correctness changed, with its direction and answers
    flipped = [r for r in rows if r["correct_P"] != r["correct_C"]]
    assert f"Flipped questions ({len(flipped)})" in text
    listed = dom.table_with("question (end of prompt)", "child")  # the flipped list (the largest-KL list has no child column)
    assert [(r["child"], r["task"], r["doc_id"]) for r in listed] == [
        (r["child"], r["task"], str(r["doc_id"])) for r in flipped]
    for shown, r in zip(listed, flipped, strict=True):
        assert shown["flip"] == ("c→i" if r["correct_P"] else "i→c")
        assert shown["parent answer"].startswith("✓" if r["correct_P"] else "✗")
        assert shown["child answer"].startswith("✓" if r["correct_C"] else "✗")
        assert " ".join(r["question"].split()) in shown["question (end of prompt)"]
    mc = next((s, r) for s, r in zip(listed, flipped, strict=True) if r["task"] == "arc_colors")
    assert mc[0]["gold"] == f"{mc[1]['gold']}: {mc[1]['choices'][mc[1]['gold']]}"
