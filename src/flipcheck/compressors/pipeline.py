"""Apply an ordered list of compression steps to a parent and save the child.

Every step's settings, and what the parent's config.json and the calibration source allow
(:mod:`checks`), are validated before the parent or any data is loaded; calibration data is prepared
once and shared by every step; consecutive llm-compressor steps (e.g. wanda 2:4 then gptq W4A16)
run in one ``oneshot`` call, as llm-compressor runs a multi-modifier recipe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flipcheck import __version__
from flipcheck.compressors import llmc
from flipcheck.compressors.calibration import Calibration, CalibrationConfig
from flipcheck.compressors.calibration_data import build_calibration, resolve_calibration
from flipcheck.compressors.checks import check_plan
from flipcheck.compressors.registry import (
    CompressionReport,
    MethodConfig,
    check_chain,
    get_method,
    make_config,
    timed_apply,
)
from flipcheck.compressors.stats import logical_parameters
from flipcheck.models import fingerprint, load_model, load_tokenizer, resolve_source, save_model

log = logging.getLogger(__name__)

Step = tuple[str, MethodConfig]


@dataclass
class CompressResult:
    model: torch.nn.Module
    tokenizer: Any
    reports: list[CompressionReport]
    out: Path | None
    provenance: dict[str, Any] = field(default_factory=dict)


def validate_steps(steps: Sequence[tuple[str, Mapping[str, Any] | MethodConfig]]) -> list[Step]:
    """Turn (method, settings) pairs into validated configs; fails before any work is done.

    Also checks that each step can follow the one before it (:func:`registry.check_chain`).
    """
    out: list[Step] = []
    for name, settings in steps:
        method = get_method(name)
        cfg = settings if isinstance(settings, method.config_cls) else make_config(name, dict(settings or {}))
        out.append((name, cfg))
    check_chain([name for name, _ in out])
    return out


def step_needs_calibration(name: str, config: MethodConfig) -> bool:
    return get_method(name).needs_data(config)


def prepare_calibration(tokenizer, steps: list[Step], config: CalibrationConfig | None) -> Calibration:
    """Tokenize calibration samples once when any step needs them; else carry only the tokenizer."""
    config = config or CalibrationConfig()
    if any(step_needs_calibration(n, c) for n, c in steps):
        return build_calibration(tokenizer, config)
    return Calibration(tokenizer=tokenizer, input_ids=None, config=config)


def apply_steps(
    model: torch.nn.Module, steps: list[Step], calibration: Calibration, *, parent_key: str | None = None
) -> list[CompressionReport]:
    """Apply steps in order, in place; consecutive llm-compressor steps share one oneshot.

    `parent_key` (the parent's fingerprint) lets the first step reuse statistics of the parent
    computed by an earlier child of the same run (:func:`calibration.memoized`).
    """
    with _release_traced_code():
        return _apply_steps(model, steps, calibration, parent_key)


@contextlib.contextmanager
def _release_traced_code():
    """Drop what torch.fx keeps of the code llm-compressor traces for each model.

    Its sequential pipeline generates one module of code per traced model and registers the
    wrapped functions in torch.fx's global ``_wrapped_fns_to_patch``, whose values are that code's
    globals, the model included: without this every child of a sweep stays in memory (measured:
    +520 MB per SmolLM2-135M child). Entries whose globals belong to a real module stay.
    """
    try:
        from torch.fx import _symbolic_trace as fx_trace
    except ImportError:  # pragma: no cover - torch without fx
        yield
        return
    table = getattr(fx_trace, "_wrapped_fns_to_patch", None)
    before = set(table) if isinstance(table, dict) else set()
    try:
        yield
    finally:
        if isinstance(table, dict):
            for key in [k for k in table if k not in before]:
                g = table[key]
                module = sys.modules.get(g.get("__name__", "")) if isinstance(g, dict) else None
                if module is None or vars(module) is not g:
                    del table[key]


def _apply_steps(
    model: torch.nn.Module, steps: list[Step], calibration: Calibration, parent_key: str | None
) -> list[CompressionReport]:
    reports: list[CompressionReport] = []
    i = 0
    while i < len(steps):
        name, cfg = steps[i]
        calibration.parent_key = parent_key if i == 0 else None
        if get_method(name).modifiers is not None:  # llm-compressor methods: consecutive ones share a oneshot
            j = i
            while j < len(steps) and get_method(steps[j][0]).modifiers is not None:
                j += 1
            if j - i > 1:
                t0 = time.perf_counter()
                reports.extend(llmc.apply_chain(model, steps[i:j], calibration))
                log.info("llm-compressor chain %s took %.1fs", [s[0] for s in steps[i:j]], time.perf_counter() - t0)
                i = j
                continue
        report = timed_apply(get_method(name), model, cfg, calibration)
        report.calibration = report.calibration if report.calibration is not None else (
            calibration.describe() if step_needs_calibration(name, cfg) else None
        )
        log.info("%s: %.1fs, %d parameters", name, report.wall_time_s, report.parameters)
        reports.append(report)
        i += 1
    calibration.parent_key = None
    return reports


def compress(
    parent: str | os.PathLike,
    steps: Sequence[tuple[str, Mapping[str, Any] | MethodConfig]],
    *,
    out: str | os.PathLike | None = None,
    calibration: CalibrationConfig | Mapping[str, Any] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    strength: dict[str, Any] | None = None,
) -> CompressResult:
    """Compress `parent` with `steps` ([("wanda", {"sparsity": 0.5}), ("gptq", {...})]).

    With `out`, the child is saved there (Hugging Face folder + flipcheck.json). Returns the
    in-memory child, its tokenizer and one report per step.
    """
    validated = validate_steps(steps)
    cal_cfg = calibration if isinstance(calibration, CalibrationConfig) else CalibrationConfig(**dict(calibration or {}))
    source = resolve_source(parent)  # hub id or folder, resolved once; provenance records source.ref

    check_plan(validated, source, cal_cfg)  # shapes from config.json, calibration reachable: before any loading
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    if cal_cfg.source is None:
        cal_cfg = resolve_calibration(cal_cfg, source.folder)  # the parent's default
    cal = prepare_calibration(tokenizer, validated, cal_cfg)  # before the weights load: a bad source fails fast
    model = load_model(source, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return compress_model(
        model, tokenizer, validated, parent_source=source.ref, out=out, calibration=cal, strength=strength,
        parent_fingerprint=source.fingerprint,
    )


def compress_model(
    model: torch.nn.Module,
    tokenizer,
    steps: list[Step],
    *,
    parent_source: str | None,
    out: str | os.PathLike | None = None,
    calibration: CalibrationConfig | Calibration | None = None,
    strength: dict[str, Any] | None = None,
    parent_fingerprint: str | None = None,
    extra_provenance: dict[str, Any] | None = None,
) -> CompressResult:
    """Compress an in-memory model (changed in place) and optionally save it; `extra_provenance` is
    written into the child's flipcheck.json with the rest, in the same atomic save."""
    parent_fp = parent_fingerprint or fingerprint(model)
    cal = calibration if isinstance(calibration, Calibration) else prepare_calibration(tokenizer, steps, calibration)
    reports = apply_steps(model, steps, cal, parent_key=parent_fp)
    gguf_file = next((r.extra.pop("gguf_file") for r in reports if "gguf_file" in r.extra), None)
    provenance: dict[str, Any] = {
        "flipcheck_version": __version__,
        "parent": parent_source,
        "parent_fingerprint": parent_fp,
        "recipe": [{"method": n, "settings": c.model_dump(mode="json")} for n, c in steps],
        "strength": strength,
        "calibration": cal.describe(),
        "parameters": logical_parameters(model),
        "reports": [r.to_dict() for r in reports],
    }
    for r in reports:  # methods whose children need flipcheck to load (slicegpt) or load quantized (bnb)
        provenance.update(r.extra.get("provenance", {}))
    provenance.update(extra_provenance or {})
    out_path = None
    if out is not None:
        save_fn = None
        if gguf_file is not None:  # a GGUF child: the file llama.cpp wrote, not the float model in memory
            def save_fn(_model, folder: Path) -> None:
                shutil.move(gguf_file, folder / Path(gguf_file).name)
                shutil.rmtree(Path(gguf_file).parent, ignore_errors=True)

        out_path = save_model(model, tokenizer, out, provenance, save_fn=save_fn)
        log.info("saved child to %s", out_path)
    elif gguf_file is not None:
        log.warning("gguf: no output folder given; the GGUF file stays at %s", gguf_file)
    _reset_engine_session()
    return CompressResult(model, tokenizer, reports, out_path, provenance)


def _reset_engine_session() -> None:
    """llm-compressor's global session holds the last model it compressed until the next
    ``oneshot``; once the child is saved, let go of it (a sweep holds one child at a time)."""
    session_functions = sys.modules.get("llmcompressor.core.session_functions")
    if session_functions is not None:
        session_functions.active_session().reset()
