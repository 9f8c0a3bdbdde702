"""How much time flipcheck adds around llm-compressor: gptq, awq and wanda through flipcheck's
``apply`` versus ``llmcompressor.oneshot`` called directly with the same modifiers and data.

Two parents: a ~30M-parameter random Llama (hidden 512, intermediate 1536, 6 layers, vocab 8192)
with 32 x 256 calibration tokens, and the real SmolLM2-135M-Instruct (``flipcheck.tiny.smollm2_folder``;
hidden 576, so group size 64) with `--real-samples` x `--real-seq-len` tokens. Each timed run starts from a fresh copy of the model; both paths get one
untimed warm-up run per method, then `--repeats` timed runs each, alternating. The direct path's
set-up (config folder, dataset, modifiers) is not timed; flipcheck's ``apply`` is timed whole
(checks, config folder, calibration pass, weight materialization, the report), and the part of it
spent outside ``oneshot`` is printed too: that figure does not depend on other load.

    python benchmarks/compress_speed.py [--repeats 3] [--threads 1] [--methods gptq,awq,wanda]
                                        [--models random,smollm2]

Prints per-method timings and ``ratio METHOD: X.XX`` (``ratio smollm2 METHOD`` for the real model):
flipcheck's best time over oneshot's best (the best of several runs is the figure least disturbed
by other load on the machine).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flipcheck.compressors import llmc  # noqa: E402
from flipcheck.compressors.awq import AWQConfig  # noqa: E402
from flipcheck.compressors.calibration import Calibration, CalibrationConfig  # noqa: E402
from flipcheck.compressors.gptq import GPTQConfig  # noqa: E402
from flipcheck.compressors.registry import get_method  # noqa: E402
from flipcheck.compressors.wanda import WandaConfig  # noqa: E402
from flipcheck.tiny import build_llama, build_tokenizer  # noqa: E402

CONFIGS = {"gptq": GPTQConfig(), "awq": AWQConfig(), "wanda": WandaConfig(sparsity=0.5)}
# SmolLM2's hidden size 576 is not a multiple of 128
REAL_CONFIGS = {"gptq": GPTQConfig(group_size=64), "awq": AWQConfig(group_size=64), "wanda": WandaConfig(sparsity=0.5)}


def make_parent(vocab: int):
    return build_llama(
        vocab,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        max_position_embeddings=1024,
        seed=0,
    )


def make_calibration(vocab: int, samples: int, seq_len: int, tokenizer=None) -> Calibration:
    """Random token ids (the time does not depend on the text), with `tokenizer` or a toy one."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    if tokenizer is None:
        tokenizer = build_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], vocab_size=300)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=gen)
    return Calibration(tokenizer, ids, CalibrationConfig(source="random", samples=samples, seq_len=seq_len))


_INSIDE_ONESHOT: list[float] = []


def _timed_oneshot():
    """Wrap llmcompressor.oneshot (which run_oneshot imports at call time) to time the engine."""
    import llmcompressor

    engine = llmcompressor.oneshot

    def oneshot(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return engine(*args, **kwargs)
        finally:
            _INSIDE_ONESHOT.append(time.perf_counter() - t0)

    llmcompressor.oneshot = oneshot


def run_flipcheck(parent, method: str, calibration: Calibration, configs=CONFIGS) -> tuple[float, float]:
    """(wall time of apply, of which outside oneshot: flipcheck's own work)."""
    model = copy.deepcopy(parent)
    _INSIDE_ONESHOT.clear()
    t0 = time.perf_counter()
    get_method(method).apply(model, configs[method], calibration)
    total = time.perf_counter() - t0
    return total, total - sum(_INSIDE_ONESHOT)


def run_direct(parent, method: str, calibration: Calibration, configs=CONFIGS) -> float:
    """llmcompressor.oneshot with the same modifiers, data and batch size; set-up untimed."""
    from llmcompressor.entrypoints.oneshot import oneshot  # the engine itself, never the timing wrapper

    model = copy.deepcopy(parent)
    modifiers = llmc.modifiers_for(method, configs[method], model)
    ids = calibration.input_ids
    dataset = calibration.dataset()
    with tempfile.TemporaryDirectory() as folder, llmc._quiet_engine(), llmc._no_pinning_without_accelerator():
        model.config.save_pretrained(folder)
        model.config._name_or_path = folder
        t0 = time.perf_counter()
        oneshot(
            model=model,
            tokenizer=calibration.tokenizer,
            recipe=modifiers,
            dataset=dataset,
            num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False,
            batch_size=min(ids.shape[0], llmc.DEFAULT_BATCH_SIZE),
            output_dir=None,
        )
        return time.perf_counter() - t0


def compare(label: str, parent, calibration: Calibration, methods: list[str], repeats: int, configs) -> dict:
    n_params = sum(p.numel() for p in parent.parameters())
    ids = calibration.input_ids
    print(f"{label}: {n_params / 1e6:.1f}M parameters; calibration {ids.shape[0]} x {ids.shape[1]} tokens; "
          f"batch {min(ids.shape[0], llmc.DEFAULT_BATCH_SIZE)}")
    ratios = {}
    for method in methods:
        run_direct(parent, method, calibration, configs)  # warm-up, untimed
        run_flipcheck(parent, method, calibration, configs)
        flip, direct, own = [], [], []
        for _ in range(repeats):
            direct.append(run_direct(parent, method, calibration, configs))
            total, outside = run_flipcheck(parent, method, calibration, configs)
            flip.append(total)
            own.append(outside)
        ratios[method] = min(flip) / min(direct)
        print(f"{label} {method}: flipcheck {', '.join(f'{t:.2f}' for t in flip)} s (best {min(flip):.2f}, median "
              f"{statistics.median(flip):.2f}); oneshot {', '.join(f'{t:.2f}' for t in direct)} s "
              f"(best {min(direct):.2f}, median {statistics.median(direct):.2f}); flipcheck's own work outside "
              f"oneshot {max(own):.2f} s at most")
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--real-samples", type=int, default=16)
    ap.add_argument("--real-seq-len", type=int, default=128)
    ap.add_argument("--methods", default="gptq,awq,wanda")
    ap.add_argument("--models", default="random,smollm2", help="random (30M random Llama), smollm2 (the real model)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    print(f"{args.threads} thread(s), {args.repeats} timed run(s) per path")

    _timed_oneshot()
    ratios = {}
    if "random" in args.models.split(","):
        vocab = 8192
        calibration = make_calibration(vocab, args.samples, args.seq_len)
        ratios.update(compare("random", make_parent(vocab), calibration, methods, args.repeats, CONFIGS))
    if "smollm2" in args.models.split(","):
        from flipcheck.models import load_model, load_tokenizer
        from flipcheck.tiny import smollm2_folder

        folder = smollm2_folder()
        parent = load_model(folder, device="cpu", dtype="float32")
        tokenizer = load_tokenizer(folder)
        calibration = make_calibration(len(tokenizer), args.real_samples, args.real_seq_len, tokenizer)
        real = compare("smollm2", parent, calibration, methods, args.repeats, REAL_CONFIGS)
        ratios.update({f"smollm2 {m}": r for m, r in real.items()})
    for method, r in ratios.items():
        print(f"ratio {method}: {r:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
