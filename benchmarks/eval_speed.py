"""How long flipcheck takes to score one parent/child pair, against lm-eval's HF backend run twice.

Both tools score the same instances of two local lm-eval tasks on a ~30M-parameter random Llama
(hidden 512, intermediate 1536, 6 layers, 8 heads, a byte-level BPE vocabulary of ~6k tokens):

- ``bench_single``: MMLU-style, a ~100-token question with four listed options, answered by one
  letter token (" A" .. " D"); with ``--models smollm2 --mmlu FOLDER`` the real model gets real MMLU
  test questions (hendrycks' original CSVs), whose lengths run from a few dozen tokens to hundreds;
- ``bench_multi``: HellaSwag-style, a 40-60-token context and four ~20-token endings (acc, acc_norm).

The models are saved with :func:`flipcheck.models.save_model`, so flipcheck finds them as a user's
folders. The child is the parent plus flipcheck's Gaussian weight noise (sigma 0.05); a second
child (sigma 0.1) measures the cached-parent path.

Timed, per task, wall-clock (``time.perf_counter``), best of ``--repeats``:

- flipcheck uncached: ``Evaluator.evaluate_child`` with a fresh :class:`ResultCache` in a temporary
  folder: loads both models, runs lm-eval's ``simple_evaluate`` with :class:`FlipLM` on the parent
  alone (top-K and sampled tail kept), caches it, runs the child against it (vocabulary KL from the
  cached parent, as for every child), builds the per-sample rows and every metric (bootstrap CI
  included);
- flipcheck cached-parent: a second ``evaluate_child`` of the sigma-0.1 child against the same
  parent with the cache of the first run, so the parent is never run;
- lm-eval: for each model, load it from its folder (transformers), wrap it in ``HFLM`` and run
  ``simple_evaluate`` with ``log_samples=True`` (what a user comparing per-sample answers needs).
  "uncached" compares flipcheck with lm-eval's parent run plus its child run; "cached-parent"
  with lm-eval's parent run plus its run of the second child.

Both tools use the same batch size, torch thread count and an lm-eval ``TaskManager`` restricted to
the task folder, and get one untimed warm-up run (``limit=4``) per task before timing. The timed runs
are interleaved (lm-eval parent, flipcheck uncached, lm-eval child, flipcheck cached-parent, lm-eval
child2), so a change in the machine's load hits both tools alike; the CPU time of each run (process
and subprocesses) is printed as well, since on a shared machine it is the steadier figure. As a sanity
check (not a test) the script verifies that flipcheck's per-sample correctness of parent and child
equals lm-eval's ``acc`` (and ``acc_norm``) for every document, and that the cached run never ran
the parent.

    python benchmarks/eval_speed.py [--docs 200] [--batch-size 32] [--threads 2] [--repeats 1]
                                    [--tasks single,multi] [--models random,smollm2] [--mmlu FOLDER]
                                    [--vocab 6144] [--profile [--profile-top N]]

Prints raw timings, then ``ratio TASK uncached: X.XX`` and ``ratio TASK cached-parent: X.XX``
(flipcheck time / lm-eval time). ``--profile`` then runs flipcheck once more per task under
cProfile and prints where its time goes outside the model forward.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import inspect
import logging
import os
import pstats
import random
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from flipcheck.compressors.noise import NoiseConfig, apply_noise  # noqa: E402
from flipcheck.evaluation.cache import ResultCache  # noqa: E402
from flipcheck.evaluation.model_ref import child_ref  # noqa: E402
from flipcheck.evaluation.runner import EvalSettings, Evaluator, ModelRef
from flipcheck.models import save_model  # noqa: E402
from flipcheck.tiny import build_llama, build_tokenizer, write_lm_eval_task  # noqa: E402

RUNS = ("lm-eval parent", "flipcheck uncached", "lm-eval child", "flipcheck cached-parent", "lm-eval child2")
TASKS = {"single": ("single-token", "bench_single"), "multi": ("multi-token", "bench_multi")}
LETTERS = "ABCD"

SINGLE_YAML = """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nA. {{options[0]}}\\nB. {{options[1]}}\\nC. {{options[2]}}\\nD. {{options[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

MULTI_YAML = """output_type: multiple_choice
doc_to_text: "{{ctx}}"
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


# --------------------------------------------------------------------------------------------------
# Data: pseudo-words, a tokenizer trained on them, two task folders


def lexicon(n_words: int, seed: int) -> list[str]:
    """`n_words` distinct pronounceable pseudo-words of 1-4 syllables."""
    rng = random.Random(seed)
    onsets = ["", "b", "br", "c", "ch", "d", "dr", "f", "g", "gl", "h", "k", "l", "m", "n", "p", "pr",
              "qu", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "oo", "ou", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
    words: set[str] = set()
    while len(words) < n_words:
        syll = rng.choices([1, 2, 3, 4], weights=[2, 5, 3, 1])[0]
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syll)))
    return sorted(words)


class TextMaker:
    """Zipf-distributed sentences over a pseudo-word lexicon, cut to a token budget."""

    def __init__(self, words: list[str], seed: int) -> None:
        self.words = words
        self.weights = [1.0 / (r + 1) ** 1.05 for r in range(len(words))]
        self.rng = random.Random(seed)

    def words_(self, n: int) -> list[str]:
        return self.rng.choices(self.words, weights=self.weights, k=n)

    def sentence(self, n_words: int) -> str:
        text = " ".join(self.words_(n_words))
        return text[0].upper() + text[1:] + "."

    def tokens(self, tok, n_tokens: int) -> str:
        """Text of `n_tokens` tokens or a little more: whole words added until the budget is met."""
        words: list[str] = []
        while True:
            words += self.words_(4)
            text = " ".join(words)
            if len(tok.encode(text, add_special_tokens=False)) >= n_tokens:
                return text


def make_tokenizer(words: list[str], vocab_size: int):
    maker = TextMaker(words, seed=1)
    corpus = [maker.sentence(30) for _ in range(6000)] + [" ".join(words)]
    corpus += ["Question: A. B. C. D. Answer: A B C D"] * 50
    return build_tokenizer(corpus, vocab_size=vocab_size)


def single_docs(maker: TextMaker, tok, n: int) -> list[dict]:
    docs = []
    for i in range(n):
        question = maker.tokens(tok, 100) + "?"
        options = [maker.tokens(tok, 6) for _ in LETTERS]
        docs.append({"id": i, "question": question, "options": options, "label": maker.rng.randrange(4)})
    return docs


def multi_docs(maker: TextMaker, tok, n: int) -> list[dict]:
    docs = []
    for i in range(n):
        ctx = maker.tokens(tok, maker.rng.randint(40, 60))
        endings = [maker.tokens(tok, maker.rng.randint(18, 22)) + "." for _ in range(4)]
        docs.append({"id": i, "ctx": ctx, "endings": endings, "label": maker.rng.randrange(4)})
    return docs


def mmlu_docs(folder: Path, n: int, seed: int = 0) -> list[dict]:
    """`n` real MMLU test questions, drawn across every subject of an original hendrycks release folder
    (``SUBJECT_test.csv`` rows: question, four options, answer letter), for the single-token task: the
    subject leads the question, and the options are listed as in ``bench_single``."""
    import csv

    rows = []
    for f in sorted(folder.glob("*_test.csv")):
        subject = f.name[: -len("_test.csv")].replace("_", " ")
        with open(f, newline="", encoding="utf-8") as fh:
            for r in csv.reader(fh):
                if len(r) == 6 and r[5].strip() in LETTERS:
                    rows.append((subject, r))
    if len(rows) < n:
        raise SystemExit(f"--mmlu {folder}: {len(rows)} questions found, {n} asked for")
    random.Random(seed).shuffle(rows)
    return [{"id": i, "question": f"({subject}) {r[0].strip()}", "options": [o.strip() for o in r[1:5]],
             "label": LETTERS.index(r[5].strip())} for i, (subject, r) in enumerate(rows[:n])]


def token_stats(tok, texts: list[str]) -> str:
    lens = sorted(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    return f"median {lens[len(lens) // 2]} (min {lens[0]}, max {lens[-1]})"


# --------------------------------------------------------------------------------------------------
# The two tools


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished subprocesses."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args, **kwargs):
    """(wall-clock seconds, CPU seconds, fn's result)."""
    gc.collect()
    w0, c0 = time.perf_counter(), cpu_seconds()
    out = fn(*args, **kwargs)
    return time.perf_counter() - w0, cpu_seconds() - c0, out


def run_flipcheck(parent: Path, child: Path, task: str, task_dir: Path, cache_dir: Path, batch_size: int,
                  limit: int | None = None):
    """One complete flipcheck evaluation of `child` against `parent`: (parent passes, summary, rows)."""
    settings = EvalSettings(tasks=[task], include_path=str(task_dir), batch_size=batch_size, limit=limit,
                            device="cpu")
    ev = Evaluator(ModelRef("parent", str(parent)), settings, ResultCache(cache_dir))
    entry, rows = ev.evaluate_child(child_ref(str(child)))
    return ev.parent_passes, entry["tasks"][task], rows


def run_lm_eval(model_dir: Path, task: str, task_manager, batch_size: int, limit: int | None = None):
    """lm-eval's HF backend on one model folder, loaded as `lm_eval --model hf` would: (load s, results)."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    loading = time.perf_counter() - t0
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
    res = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, limit=limit, log_samples=True,
                          verbosity="ERROR")
    return loading, res


def check_same_answers(label: str, task: str, rows: list[dict], parent_res: dict, child_res: dict) -> None:
    """flipcheck's per-sample correctness of parent and child equals lm-eval's acc (and acc_norm)."""
    mine = {r["doc_id"]: r for r in rows if r["task"] == task}
    for side, res in (("P", parent_res), ("C", child_res)):
        theirs = {s["doc_id"]: s for s in res["samples"][task]}
        if set(theirs) != set(mine):
            raise AssertionError(f"{label}: flipcheck and lm-eval scored different documents")
        for doc, s in theirs.items():
            for metric, key in (("acc", f"correct_{side}"), ("acc_norm", f"correct_norm_{side}")):
                if metric in s and bool(s[metric]) != bool(mine[doc][key]):
                    raise AssertionError(
                        f"{label}: doc {doc}: lm-eval {metric}={s[metric]} for the "
                        f"{'parent' if side == 'P' else 'child'}, flipcheck {key}={mine[doc][key]}"
                    )


def fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times) + f" s (best {min(times):.2f})"


# --------------------------------------------------------------------------------------------------
# Profile: where flipcheck's time goes


def profile_parts() -> list[tuple[str, object]]:
    """(label, function) pairs whose cumulative time the profile reports."""
    from lm_eval import evaluator
    from lm_eval.api.task import Task
    from lm_eval.loggers import utils as lm_eval_log_utils

    from flipcheck import models
    from flipcheck.evaluation import cache, forward, kl, lm, metrics, model_ref, runner, samples

    return [
        ("score_items: packing, forwards, log-softmax, top-K, KL", forward.score_items),
        ("  model forwards, decoder only (ModelRunner.selected)", forward.ModelRunner.selected),
        ("  head, log-softmax, top-K, token log-probs (_fill_side)", forward._fill_side),
        ("  exact KL over the vocabulary (kl_exact)", kl.kl_exact),
        ("  KL against the cached top-K (kl_topk_tensors)", kl.kl_topk_tensors),
        ("  packed inputs and 4-D masks (ModelRunner.inputs)", forward.ModelRunner.inputs),
        ("FlipLM probes (ModelRunner.__init__)", forward.ModelRunner.__init__),
        ("lm-eval simple_evaluate, every call", inspect.unwrap(evaluator.simple_evaluate)),
        ("  lm-eval building requests (Task.build_all_requests)", Task.build_all_requests),
        ("  tokenization (FlipLM.tok_encode)", lm.FlipLM.tok_encode),
        ("  lm-eval environment header (add_env_info)", lm_eval_log_utils.add_env_info),
        ("Evaluator init (task resolution, cache key fields)", runner.Evaluator.__init__),
        ("  task folder hash for the cache key (folder_content_hash)", cache.folder_content_hash),
        ("model loading (load_model)", models.load_model),
        ("tokenizer loading (load_tokenizer)", models.load_tokenizer),
        ("fingerprints (cached_fingerprint)", model_ref.cached_fingerprint),
        ("tokenizer comparison (tokenizer_hash)", model_ref.tokenizer_hash),
        ("cache writes (ResultCache.put)", cache.ResultCache.put),
        ("cache reads (ResultCache.get)", cache.ResultCache.get),
        ("rows (build_rows)", samples.build_rows),
        ("per-doc vocabulary KL (_vocab_by_task)", runner._vocab_by_task),
        ("per-task metrics (summarize_task)", samples.summarize_task),
        ("  bootstrap CI (stratified_bootstrap_delta_ci)", metrics.stratified_bootstrap_delta_ci),
        ("micro/macro figures (aggregate)", samples.aggregate),
    ]


def profile_breakdown(prof: cProfile.Profile, total: float) -> None:
    """Cumulative seconds of each part; pstats keys functions by (file, first line, name)."""
    stats = pstats.Stats(prof).stats
    print(f"  total {total:.2f} s; cumulative time per part (parts nest as indented):")
    for label, fn in profile_parts():
        code = inspect.unwrap(fn).__code__
        key = (code.co_filename, code.co_firstlineno, code.co_name)
        ct = stats[key][3] if key in stats else 0.0
        print(f"    {ct:7.2f} s {100 * ct / total:5.1f} %  {label}")


def profile_runs(args, parent: Path, child: Path, child2: Path, task: str, task_dir: Path, root: Path) -> None:
    cache = root / f"profile-cache-{task}"
    for label, target in (("uncached", child), ("cached-parent", child2)):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        run_flipcheck(parent, target, task, task_dir, cache, args.batch_size)
        prof.disable()
        seconds = time.perf_counter() - t0
        print(f"profile of flipcheck {task} {label}:")
        profile_breakdown(prof, seconds)
        if args.profile_top:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(args.profile_top)


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200, help="documents per task")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size of both tools")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per tool; the best is reported")
    ap.add_argument("--tasks", default="single,multi", help="comma list of: single, multi")
    ap.add_argument("--models", default="random,smollm2", help="comma list of: random, smollm2 (the real model)")
    ap.add_argument("--vocab", type=int, default=6144, help="tokenizer vocabulary size to train")
    ap.add_argument("--mmlu", type=Path, default=None,
                    help="folder of MMLU's original SUBJECT_test.csv files: the real model's single-token task asks "
                         "real MMLU questions (e.g. ../shared/realdata/data/mmlu/test)")
    ap.add_argument("--profile", action="store_true", help="then profile one flipcheck run per task")
    ap.add_argument("--profile-top", type=int, default=0, help="with --profile, also print the top N functions")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.tasks.split(",") if k.strip()]
    bad = [k for k in kinds if k not in TASKS]
    if bad or not kinds:
        ap.error(f"--tasks {args.tasks!r}: allowed values are {', '.join(TASKS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in ("random", "smollm2") for m in models):
        ap.error(f"--models {args.models!r}: allowed values are random, smollm2")
    if args.docs < 4 or args.batch_size < 1 or args.threads < 1 or args.repeats < 1:
        ap.error("--docs must be >= 4; --batch-size, --threads and --repeats >= 1")

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="flipcheck-eval-speed-") as tmp:
        root = Path(tmp)
        os.environ["FLIPCHECK_CACHE"] = str(root / "default-cache")  # nothing lands in ~/.cache/flipcheck

        all_ratios: dict[str, dict[str, tuple[float, float]]] = {}
        for model_kind in models:
            all_ratios[model_kind] = bench_model(model_kind, args, kinds, root / model_kind)

    print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    for model_kind, ratios in all_ratios.items():
        for kind, (unc, cached) in ratios.items():
            label = TASKS[kind][0]
            print(f"ratio {model_kind} {label} uncached: {unc:.2f}")
            print(f"ratio {model_kind} {label} cached-parent: {cached:.2f}")
    return 0


def make_models(model_kind: str, args, root: Path):
    """(parent folder, {child name: folder}, tokenizer, words, parameter count) for one model kind.

    `random`: a ~30M-parameter random Llama with a byte-level BPE vocabulary trained on pseudo-words;
    `smollm2`: the real SmolLM2-135M-Instruct (vocabulary 49,152). Children: Gaussian noise 0.05 / 0.1.
    """
    words = lexicon(6000, seed=0)
    if model_kind == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from flipcheck.tiny import smollm2_folder

        parent_dir = smollm2_folder(Path.home() / ".cache" / "flipcheck")  # built once, kept between runs
        tok = AutoTokenizer.from_pretrained(parent_dir)
        parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32).eval()
    else:
        tok = make_tokenizer(words, args.vocab)
        parent = build_llama(len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                             num_attention_heads=8, max_position_embeddings=1024, seed=0)
        parent_dir = save_model(parent, tok, root / "parent", {"parent": None})
    n_params = sum(p.numel() for p in parent.parameters())
    children = {}
    for name, sigma in (("child", 0.05), ("child2", 0.1)):
        model = copy.deepcopy(parent)
        report = apply_noise(model, NoiseConfig(sigma=sigma, seed=0))
        children[name] = save_model(model, tok, root / name,
                                    {"parent": str(parent_dir), "recipe": [{"method": "noise", "settings":
                                                                            report.config}]})
        del model
    del parent
    gc.collect()
    return parent_dir, children, tok, words, n_params


def bench_model(model_kind: str, args, kinds: list[str], root: Path) -> dict[str, tuple[float, float]]:
    """Both tools, interleaved, on one model kind: {task kind: (uncached ratio, cached-parent ratio)}."""
    root.mkdir(parents=True, exist_ok=True)
    parent_dir, children, tok, words, n_params = make_models(model_kind, args, root)
    maker = TextMaker(words, seed=2)
    task_dir = root / "tasks"
    task_dir.mkdir()
    real = model_kind == "smollm2" and args.mmlu is not None  # the real model on real questions
    single = mmlu_docs(args.mmlu, args.docs) if real else single_docs(maker, tok, args.docs)
    docs = {"single": single, "multi": multi_docs(maker, tok, args.docs)}
    write_lm_eval_task(task_dir, "bench_single", docs["single"], SINGLE_YAML)
    write_lm_eval_task(task_dir, "bench_multi", docs["multi"], MULTI_YAML)
    print(f"model {model_kind}: {n_params / 1e6:.1f}M parameters, vocabulary {len(tok)}; {args.docs} docs per task; "
          f"batch size {args.batch_size}; {args.threads} torch thread(s); best of {args.repeats}")
    print(f"bench_single ({'real MMLU test questions' if real else 'pseudo-words'}): question tokens {token_stats(tok, [d['question'] for d in docs['single']])}, "
          f"prompt tokens {token_stats(tok, [single_prompt(d) for d in docs['single']])}")
    print(f"bench_multi: context tokens {token_stats(tok, [d['ctx'] for d in docs['multi']])}, ending tokens "
          f"{token_stats(tok, [e for d in docs['multi'] for e in d['endings']])}")

    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    ratios: dict[str, tuple[float, float]] = {}
    for kind in kinds:
        label, task = TASKS[kind]
        # warm-up, untimed: a tiny run of each tool
        run_flipcheck(parent_dir, children["child"], task, task_dir, root / f"warm-{task}", args.batch_size, 4)
        run_lm_eval(parent_dir, task, task_manager, args.batch_size, 4)
        wall: dict[str, list[float]] = {k: [] for k in RUNS}
        cpu: dict[str, list[float]] = {k: [] for k in RUNS}
        loads: list[float] = []
        for rep in range(args.repeats):
            # interleaved, so a change in the machine's load hits both tools alike
            cache = root / f"cache-{task}-{rep}"
            lm_eval_res: dict[str, dict] = {}
            fc_rows: dict[str, list[dict]] = {}
            for run in RUNS:
                if run.startswith("lm-eval"):
                    model = {"lm-eval parent": parent_dir, "lm-eval child": children["child"],
                             "lm-eval child2": children["child2"]}[run]
                    w, c, (loading, res) = timed(run_lm_eval, model, task, task_manager, args.batch_size)
                    loads.append(loading)
                    lm_eval_res[run] = res
                else:
                    target = children["child"] if run == "flipcheck uncached" else children["child2"]
                    w, c, (passes, summary, rows) = timed(run_flipcheck, parent_dir, target, task, task_dir,
                                                          cache, args.batch_size)
                    want = 1 if run == "flipcheck uncached" else 0
                    if passes != want:
                        raise AssertionError(
                            f"{label}: {run} made {passes} parent passes, expected {want} (did a task file, "
                            "flipcheck's demo tasks included, change during the run?)"
                        )
                    fc_rows[run] = rows
                    if run == "flipcheck cached-parent":
                        summary2 = summary
                wall[run].append(w)
                cpu[run].append(c)
            check_same_answers(f"{label} uncached", task, fc_rows["flipcheck uncached"],
                               lm_eval_res["lm-eval parent"], lm_eval_res["lm-eval child"])
            check_same_answers(f"{label} cached-parent", task, fc_rows["flipcheck cached-parent"],
                               lm_eval_res["lm-eval parent"], lm_eval_res["lm-eval child2"])
        for run in RUNS:
            print(f"{label}: {run}: wall {fmt(wall[run])}; CPU {fmt(cpu[run])}")
        print(f"{label}: lm-eval model loading {min(loads):.2f}-{max(loads):.2f} s per run (included above)")
        print(f"{label}: per-sample acc of parent and both children identical to lm-eval's; child2: "
              f"acc_P {summary2['acc_P']:.3f} acc_C {summary2['acc_C']:.3f} flips {summary2['flips']:.3f} "
              f"KL(vocab) mean {summary2['kl_vocab']['mean']:.4f}")
        best = {run: min(wall[run]) for run in RUNS}
        best_cpu = {run: min(cpu[run]) for run in RUNS}
        lm_eval_pair = best["lm-eval parent"] + best["lm-eval child"]
        lm_eval_pair2 = best["lm-eval parent"] + best["lm-eval child2"]
        ratios[kind] = (best["flipcheck uncached"] / lm_eval_pair, best["flipcheck cached-parent"] / lm_eval_pair2)
        print(f"{label}: by CPU time (robust to other load on the machine): uncached "
              f"{best_cpu['flipcheck uncached'] / (best_cpu['lm-eval parent'] + best_cpu['lm-eval child']):.2f}, "
              f"cached-parent {best_cpu['flipcheck cached-parent'] / (best_cpu['lm-eval parent'] + best_cpu['lm-eval child2']):.2f}")

    if args.profile:
        for kind in kinds:
            profile_runs(args, parent_dir, children["child"], children["child2"], TASKS[kind][1], task_dir, root)

    return ratios


def single_prompt(doc: dict) -> str:
    opts = "".join(f"\n{letter}. {o}" for letter, o in zip(LETTERS, doc["options"], strict=True))
    return f"Question: {doc['question']}{opts}\nAnswer:"


if __name__ == "__main__":
    sys.exit(main())
