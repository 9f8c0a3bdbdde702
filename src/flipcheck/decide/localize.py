"""Where the damage is: per decoder layer and per Linear module, how far the child departs from its
parent on the same text, and how much of the text KL each layer causes on its own.

For a child whose decoder layers map one-to-one onto the parent's (quantized, pruned, noise, bnb),
on windows of calibration text (the same token ids for both models):

**Output error on the same input** (for a layer: its output given the parent's input to that
layer; for a Linear: its output given the parent's input to that Linear), from the parent's output
p and the child's output c over every token and channel:

    relative error = ‖c − p‖ / ‖p‖,    cosine = ⟨c, p⟩ / (‖c‖ ‖p‖),    SQNR = 10 log10(‖p‖² / ‖c − p‖²) dB

(the signal-to-quantization-noise ratio of e.g. Nagel et al. 2021, "A White Paper on Neural
Network Quantization", §2; higher is better; identical outputs give ∞, written null in JSON).

**Residual stream**: the same three figures for the hidden state after each layer when each model
runs on its own, which accumulates the damage of every layer before; ``stream_added`` is a layer's
increase of the relative error over the previous layer's.

**Swaps** (the text KL is the mean over tokens of KL(P(·|ctx) ‖ M(·|ctx)) over the whole vocabulary,
P the parent, M the model tested; each swap replays the host model from the swapped layer's recorded
input on, so layers before it are not run again):

- ``kl_swap_in``: the parent with the child's version of that one layer, fed what the parent's
  earlier layers give it: the damage the layer causes alone;
- ``kl_restored``: the child with the parent's version of that one layer; ``kl_removed`` =
  KL(child) − KL(restored) is the damage taken away by undoing that layer alone.

``share_swap_in`` is a layer's kl_swap_in over the sum over layers (where damage adds up, its share
of the child's KL); ``share_removed`` is kl_removed over KL(child). Layers are ranked by
kl_swap_in. Layer-dropped and sliced children (layer count, hidden size or a Linear's shape differ)
are refused: their layers have no one-to-one counterpart.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from flipcheck.errors import FlipcheckError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- math


def error_sums(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """[‖p‖², ‖c − p‖², ⟨c, p⟩, ‖c‖²] in float64, to accumulate over batches."""
    p, c = ref.detach().double().reshape(-1), test.detach().double().reshape(-1)
    d = c - p
    return torch.stack([p @ p, d @ d, c @ p, c @ c]).cpu()


def error_figures(sums: torch.Tensor) -> dict[str, float | None]:
    """Relative error, cosine and SQNR (dB) from accumulated :func:`error_sums`; SQNR None when identical."""
    pp, dd, cp, cc = (float(x) for x in sums)
    rel = math.sqrt(dd / pp) if pp > 0 else (0.0 if dd == 0 else math.inf)
    cos = cp / math.sqrt(pp * cc) if pp > 0 and cc > 0 else (1.0 if dd == 0 else 0.0)
    sqnr = None if dd == 0 else (10 * math.log10(pp / dd) if pp > 0 else -math.inf)
    return {"rel_error": rel, "cosine": min(1.0, cos), "sqnr_db": sqnr}


def _mean_kl(logp_ref: torch.Tensor, logits: torch.Tensor) -> tuple[float, int]:
    """(Σ over positions of KL(P ‖ M) over the vocabulary, number of positions)."""
    from flipcheck.evaluation.kl import kl_exact

    kl = kl_exact(logp_ref, torch.log_softmax(logits.float(), dim=-1))
    return float(kl.double().sum()), int(kl.numel())


# --------------------------------------------------------------------------- the models


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    from flipcheck.compressors.architectures import adapter_for

    return adapter_for(model).layer_list


def _linears(layer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


def _shape(m: torch.nn.Module) -> tuple[int, int]:
    return int(m.in_features), int(m.out_features)


def check_one_to_one(parent: torch.nn.Module, child: torch.nn.Module) -> None:
    """Refuse, in one line, children whose decoder layers do not map one-to-one onto the parent's."""
    why = "localize compares the child layer by layer with its parent and needs layers that map one-to-one " \
          "(quantized, pruned, noise, bnb children)"
    if getattr(child.config, "slicegpt", None):
        raise FlipcheckError(f"localize: the child is a SliceGPT child (rotated, narrower layers); {why}")
    lp, lc = _layers(parent), _layers(child)
    if len(lp) != len(lc):
        raise FlipcheckError(f"localize: the child has {len(lc)} decoder layers, the parent {len(lp)} (a layer-dropped child?); {why}")
    hp, hc = int(parent.config.hidden_size), int(child.config.hidden_size)
    if hp != hc:
        raise FlipcheckError(f"localize: the child's hidden size is {hc}, the parent's {hp} (a sliced child?); {why}")
    for i, (a, b) in enumerate(zip(lp, lc, strict=True)):
        la, lb = dict(_linears(a)), dict(_linears(b))
        if la.keys() != lb.keys() or any(_shape(la[k]) != _shape(lb[k]) for k in la):
            raise FlipcheckError(f"localize: layer {i} of the child has other Linear modules or shapes than the parent's "
                                 f"(a sliced child?); {why}")


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    """A decoder layer's recorded call with its hidden-state input replaced by `h`."""
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@torch.no_grad()
def _replay(model: torch.nn.Module, calls: list[tuple[tuple, dict]], start: int, first: torch.nn.Module) -> torch.Tensor:
    """`model`'s logits when its layer `start` is `first`, from that layer's recorded input on:
    layers before `start` are not run again (their outputs are what was recorded). Equal to a full
    forward with the layer swapped, at (L − start)/L of its layer cost."""
    from flipcheck.compressors.architectures import adapter_for

    adapter = adapter_for(model)
    layers = adapter.layer_list
    args, kwargs = calls[start]
    h = _hidden(first(*args, **kwargs))
    for j in range(start + 1, len(layers)):
        a, k = _with_hidden(*calls[j], h)
        h = _hidden(layers[j](*a, **k))
    return adapter.lm_head(adapter.final_norm(h))


def _recorder(calls: list, i: int):
    def hook(m, args, kwargs):
        calls[i] = (tuple(args), dict(kwargs))

    return hook


def localize_models(
    parent: torch.nn.Module,
    child: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    swaps: bool = True,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Every figure of the module docstring for `child` against `parent` on `input_ids` [windows, ctx].

    Returns {"kl_total", "positions", "windows", "ctx", "layers": [...], "modules": [...]} with
    one entry per decoder layer (index order) and per Linear (ranked by relative error).
    """
    check_one_to_one(parent, child)
    lp, lc = _layers(parent), _layers(child)
    n_layers = len(lp)
    device = next(parent.parameters()).device
    for model in (parent, child):
        # a compressed-tensors checkpoint loads with packed weights that its first whole-model forward
        # unpacks; its Linears cannot be called on their own before that (AttributeError: weight)
        _logits(model, input_ids[:1, :2].to(device))
    own = [torch.zeros(4, dtype=torch.float64) for _ in range(n_layers)]
    stream = [torch.zeros(4, dtype=torch.float64) for _ in range(n_layers)]
    mods: dict[tuple[int, str], torch.Tensor] = {}
    kl_in, kl_back = [0.0] * n_layers, [0.0] * n_layers
    kl_total, positions = 0.0, 0
    batches = [input_ids[i:i + batch_size].to(device) for i in range(0, input_ids.shape[0], batch_size)]
    for b, ids in enumerate(batches):
        parent_stream: list[torch.Tensor | None] = [None] * n_layers
        handles = []
        for i, (a, c) in enumerate(zip(lp, lc, strict=True)):
            def layer_hook(m, args, kwargs, out, i=i, c=c, saved=parent_stream):
                h = _hidden(out)
                saved[i] = h.detach()
                own[i] += error_sums(h, _hidden(c(*args, **kwargs)))

            handles.append(a.register_forward_hook(layer_hook, with_kwargs=True))
            child_mods = dict(_linears(c))
            for name, m in _linears(a):
                def mod_hook(m, args, out, i=i, name=name, twin=child_mods[name]):
                    key = (i, name)
                    mods[key] = mods.get(key, torch.zeros(4, dtype=torch.float64)) + error_sums(out, twin(args[0]))

                handles.append(m.register_forward_hook(mod_hook))
        parent_calls: list = [None] * n_layers
        handles += [a.register_forward_pre_hook(_recorder(parent_calls, i), with_kwargs=True) for i, a in enumerate(lp)]
        with _hooks(handles), torch.no_grad():
            logp_parent = torch.log_softmax(_logits(parent, ids).float(), dim=-1)

        def stream_hook(m, args, out, i: int, saved=parent_stream):
            stream[i] += error_sums(saved[i], _hidden(out))

        handles = [c.register_forward_hook(lambda m, a, o, i=i: stream_hook(m, a, o, i)) for i, c in enumerate(lc)]
        child_calls: list = [None] * n_layers
        handles += [c.register_forward_pre_hook(_recorder(child_calls, i), with_kwargs=True) for i, c in enumerate(lc)]
        with _hooks(handles):
            kl, n = _mean_kl(logp_parent, _logits(child, ids))
        kl_total, positions = kl_total + kl, positions + n
        if swaps:
            for i in range(n_layers):
                kl_in[i] += _mean_kl(logp_parent, _replay(parent, parent_calls, i, lc[i]))[0]
                kl_back[i] += _mean_kl(logp_parent, _replay(child, child_calls, i, lp[i]))[0]
        if progress is not None:
            progress(f"localize: batch {b + 1}/{len(batches)} done")
    total = kl_total / positions
    layers = _layer_rows(own, stream, kl_in, kl_back, total, positions, swaps)
    modules = [{"layer": i, "module": name, **error_figures(s)} for (i, name), s in mods.items()]
    modules.sort(key=lambda r: -r["rel_error"])
    return {"kl_total": total, "positions": positions, "windows": int(input_ids.shape[0]), "ctx": int(input_ids.shape[1]),
            "layers": layers, "modules": modules}


def _layer_rows(own: list, stream: list, kl_in: list[float], kl_back: list[float], total: float, positions: int,
                swaps: bool) -> list[dict[str, Any]]:
    """One row per decoder layer from the summed errors and swap KLs: its own and stream error, the stream
    error it adds, and (with `swaps`) its swap-in and restored KL and their shares."""
    layers = []
    prev_rel = 0.0
    sum_in = sum(kl_in) / positions if swaps else None
    for i in range(len(own)):
        st = error_figures(stream[i])
        row: dict[str, Any] = {"layer": i, "own": error_figures(own[i]), "stream": st,
                               "stream_added": st["rel_error"] - prev_rel}
        prev_rel = st["rel_error"]
        if swaps:
            ki, kb = kl_in[i] / positions, kl_back[i] / positions
            row.update(kl_swap_in=ki, kl_restored=kb, kl_removed=total - kb,
                       share_swap_in=ki / sum_in if sum_in else None,
                       share_removed=(total - kb) / total if total > 0 else None)
        layers.append(row)
    return layers


def ranking(block: dict[str, Any], figure: str) -> list[int]:
    """Layer indices from most to least damaged by `figure`: kl_swap_in, kl_removed, own_rel_error,
    own_cosine, own_sqnr_db, stream_added (higher error, lower cosine, lower SQNR first)."""
    allowed = ("kl_swap_in", "kl_removed", "own_rel_error", "own_cosine", "own_sqnr_db", "stream_added")
    if figure not in allowed:
        raise FlipcheckError(f"localize: unknown figure {figure!r}; allowed: {', '.join(allowed)}")

    def key(row: dict[str, Any]) -> float:
        if figure.startswith("own_"):
            v = row["own"][figure[4:]]
            if figure == "own_sqnr_db":
                return math.inf if v is None else v  # identical outputs last
            return v if figure == "own_cosine" else -v
        v = row.get(figure)
        if v is None:
            raise FlipcheckError(f"localize: figure {figure} was not measured (swaps off)")
        return -v

    return [r["layer"] for r in sorted(block["layers"], key=key)]


# --------------------------------------------------------------------------- from sources


def localize(
    parent: str,
    child: str,
    *,
    text: str | None = None,
    tasks: Sequence[str] = (),
    include_path: str | None = None,
    windows: int = 8,
    ctx: int = 256,
    seed: int = 0,
    batch_size: int = 4,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Load `parent` and `child` (hub ids or folders; parent '-' reads it from the child's
    flipcheck.json), cut `windows` windows of `ctx` tokens from `text` (a calibration source; default:
    the one the parent's flipcheck.json names, else the prompts of `tasks`, which need no network) and
    return the localize block with its sources. The text is read before either model loads."""
    from flipcheck.compressors.calibration import CalibrationConfig
    from flipcheck.compressors.calibration_data import build_calibration, evaluated_text_source
    from flipcheck.models import (  # looked up at call time: tests count models.load_model
        load_model,
        load_tokenizer,
        read_provenance,
        resolve_source,
    )

    if parent == "-":
        prov = read_provenance(child) or {}
        parent = prov.get("parent") or ""
        if not parent:
            raise FlipcheckError(f"localize: parent '-' but {child} has no flipcheck.json naming its parent; give the parent")
    ps, cs = resolve_source(parent), resolve_source(child)
    tokenizer = load_tokenizer(ps, trust_remote_code=trust_remote_code)
    note = None
    if text is None:
        text, note = evaluated_text_source(ps.folder, tasks, include_path)
    cfg = CalibrationConfig(source=text, samples=windows, seq_len=ctx, seed=seed)
    ids = build_calibration(tokenizer, cfg).input_ids
    pm = load_model(ps, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    cm = load_model(cs, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if pm.get_output_embeddings().weight.shape[0] != cm.get_output_embeddings().weight.shape[0]:
        raise FlipcheckError("localize: parent and child have different vocabularies; they must share the tokenizer")
    block = localize_models(pm, cm, ids, batch_size=batch_size, progress=progress)
    block.update(parent=ps.ref, child=cs.ref, text=cfg.source, seed=seed, **({"text_note": note} if note else {}))
    return block


class SkipLayer(torch.nn.Module):
    """A decoder layer that passes its hidden-state input through unchanged: a dropped layer, as a
    swap donor for :func:`swap_in_kl`."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def swap_in_kl(
    parent: torch.nn.Module,
    donors: dict[int, torch.nn.Module],
    input_ids: torch.Tensor,
    *,
    batch_size: int = 4,
) -> dict[int, float]:
    """{layer i: text KL of the parent with its layer i replaced by ``donors[i]`` alone} (the
    ``kl_swap_in`` figure of :func:`localize_models`, for any donor: a compressed child's layer, or
    :class:`SkipLayer` for dropping it), each swap replayed from the parent's recorded input to that
    layer, so one parent forward per batch serves every donor."""
    lp = _layers(parent)
    n_layers = len(lp)
    for i in donors:
        if not 0 <= i < n_layers:
            raise FlipcheckError(f"swap_in_kl: layer {i} does not exist; the parent has {n_layers} decoder layers")
    device = next(parent.parameters()).device
    sums = dict.fromkeys(donors, 0.0)
    positions = 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size].to(device)
        calls: list = [None] * n_layers
        handles = [a.register_forward_pre_hook(_recorder(calls, i), with_kwargs=True) for i, a in enumerate(lp)]
        with _hooks(handles):
            logp = torch.log_softmax(_logits(parent, ids).float(), dim=-1)
        for i, donor in donors.items():
            kl, n = _mean_kl(logp, _replay(parent, calls, i, donor))
            sums[i] += kl
        positions += n if donors else int(ids.numel())
    return {i: s / positions for i, s in sums.items()}
