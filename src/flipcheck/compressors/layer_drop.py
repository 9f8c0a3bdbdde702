"""Layer dropping: remove ``n`` whole decoder layers.

Three ways to choose the layers: an explicit list (``layers: [3, 5, 7]``, or ``--set
layers=3,5-7``: those decoder layers, 0-based, as a search or a user picks them), or ``n``/``fraction``
layers chosen by one of two selections:

``last``
    Drop the last ``n`` layers (the setting of Dutta et al. 2024, "Accuracy is Not All You Need").

``angular``
    Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers" (arXiv 2403.17887):
    drop the block of ``n`` consecutive layers ``l .. l+n-1`` whose input and output residual
    streams point in the most similar directions,

        d(x^l, x^(l+n)) = arccos(cos_sim(x^l, x^(l+n))) / pi,    l* = argmin_l d(x^l, x^(l+n)),

    where ``x^l`` is the hidden state entering layer ``l`` (``x^0`` the embeddings, ``x^L`` the
    stream entering the final norm, before it), averaged over calibration samples. Like Gromov et
    al. the default compares the **last token** of each calibration sequence (``angular_tokens``);
    ``all`` averages over every token instead. The angle is computed as
    ``2 asin(||u - v|| / 2)`` for the unit vectors ``u, v``, which equals ``arccos(u . v)`` but stays
    accurate for nearly parallel vectors. Gromov et al. then heal the pruned model with QLoRA
    fine-tuning; flipcheck does not (it measures what dropping alone does).

:func:`angular_distances` returns the whole ``[l, n]`` matrix from one forward pass, so a sweep
over ``n`` computes it once and passes it to :func:`apply_layer_drop` (``distances=``) or picks the
block with :func:`choose_block`. After dropping, the model is a stock transformers model with
fewer layers: ``config.num_hidden_layers``, every kept attention's ``layer_idx`` (the KV-cache slot)
and ``config.layer_types`` are updated, so it saves with ``save_pretrained``, reloads with plain
transformers and generates with a cache.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from flipcheck.compressors.architectures import ModelAdapter, adapter_for
from flipcheck.compressors.calibration import memoized, require_ids
from flipcheck.compressors.registry import CompressionReport, MethodConfig, register
from flipcheck.compressors.stats import logical_parameters, step_report
from flipcheck.errors import FlipcheckError

log = logging.getLogger(__name__)


class LayerDropConfig(MethodConfig):
    """Remove n decoder layers: the last ones, or the block with the least angular change (Gromov et al.)."""

    n: int | None = Field(None, ge=0, description="number of decoder layers to drop (give n or fraction)")
    fraction: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="fraction of num_hidden_layers to drop, rounded to a whole layer (give n or fraction)",
    )
    selection: Literal["last", "angular"] = Field(
        "last",
        description="'last': drop the last n layers; 'angular': the n consecutive layers changing the stream least",
    )
    angular_tokens: Literal["last", "all"] = Field(
        "last",
        description="tokens the angular distance averages over: each sequence's last token (Gromov et al.) or all",
    )
    batch_size: int = Field(
        4, ge=1, description="calibration sequences per forward pass when measuring angular distances"
    )
    layers: list[int] | None = Field(
        None, description="explicit decoder layers to drop, 0-based (e.g. [3, 5, 6], --set layers=3,5-6); "
        "instead of n/fraction"
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any):
        from flipcheck.compressors.per_layer import parse_range

        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")):
            return None
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, str | list | tuple):
            raise ValueError(f"layers: {v!r} is not a list of layer indices; e.g. [3, 5] or 3,5-7")
        parts = [p for p in v.split(",") if p.strip()] if isinstance(v, str) else list(v)
        out: set[int] = set()
        for p in parts:
            if isinstance(p, bool) or (not isinstance(p, int) and not isinstance(p, str)):
                raise ValueError(f"layers: {p!r} is not a layer index; give indices or ranges, e.g. [3, 5] or 3,5-7")
            lo, hi = parse_range(p)
            out.update(range(lo, hi + 1))
        return sorted(out)

    @model_validator(mode="after")
    def _one_amount(self) -> LayerDropConfig:
        given = [k for k in ("n", "fraction", "layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of n (layers to drop), fraction (of num_hidden_layers) or layers (which ones); "
                f"got n={self.n}, fraction={self.fraction}, layers={self.layers}"
            )
        return self


def needs_calibration(config: LayerDropConfig) -> bool:
    """Only ``selection='angular'`` (with something to drop, not an explicit list) reads calibration data."""
    return config.layers is None and config.selection == "angular" and config.n != 0 and config.fraction != 0.0


def layers_to_drop(config: LayerDropConfig, num_layers: int) -> int:
    """``n``, or ``fraction * num_layers`` rounded half up; must leave at least one layer."""
    if config.layers is not None:
        n, setting = len(config.layers), f"layers={config.layers}"
        if config.layers and config.layers[-1] >= num_layers:
            raise FlipcheckError(f"layer_drop: layers={config.layers} names layer {config.layers[-1]}, but the model has "
                                 f"{num_layers} decoder layers; allowed: 0-{num_layers - 1}")
    elif config.n is not None:
        n, setting = config.n, f"n={config.n}"
    else:
        n = math.floor(config.fraction * num_layers + 0.5)
        setting = f"fraction={config.fraction} (-> {n} layers)"
    if n >= num_layers:
        raise FlipcheckError(
            f"layer_drop: {setting} would drop every layer of a {num_layers}-layer model; "
            f"allowed: n in 0..{num_layers - 1} (fraction < {(num_layers - 0.5) / num_layers:.3g})"
        )
    return n


# --- math: pure functions on tensors ----------------------------------------------------------


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``arccos(cos_sim(a, b)) / pi`` in [0, 1], via ``2 asin(||a/|a| - b/|b| || / 2) / pi``."""
    ua = a / a.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    ub = b / b.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
    half_chord = ((ua - ub).norm(dim=-1) / 2).clamp(0.0, 1.0)
    return 2 * torch.asin(half_chord) / math.pi


def distance_sums(states: list[torch.Tensor]) -> torch.Tensor:
    """``S[l, n] = sum_rows d(x^l, x^(l+n))`` for streams ``states[0..L]`` of shape (rows, d).

    Returns an (L, L) float64 tensor; entries with ``l + n > L`` are 0 (undefined).
    """
    num_layers = len(states) - 1
    out = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    for l in range(num_layers):  # noqa: E741
        for n in range(1, num_layers - l + 1):
            if n < num_layers:
                out[l, n] = angular_distance(states[l], states[l + n]).double().sum().cpu()
    return out


def choose_block(distances: torch.Tensor, n: int) -> int:
    """First layer ``l*`` of the block of ``n`` layers to drop: ``argmin_l distances[l, n]``.

    `distances` is the (L, L) matrix of :func:`angular_distances` (NaN where ``l + n > L``). Ties go
    to the shallowest block. ``n = 0`` returns 0 (nothing is dropped).
    """
    num_layers = distances.shape[0]
    if distances.ndim != 2 or distances.shape[1] != num_layers:
        raise ValueError(f"distances must be a square (L, L) matrix; got shape {tuple(distances.shape)}")
    if not 0 <= n < num_layers:
        raise ValueError(f"n must be in 0..{num_layers - 1}; got {n}")
    if n == 0:
        return 0
    column = distances[: num_layers - n + 1, n]
    return int(torch.argmin(column).item())


# --- orchestration -----------------------------------------------------------------------------


def _capture_streams(adapter: ModelAdapter) -> tuple[list[torch.Tensor | None], list]:
    """Hooks that record the stream entering each layer and the final norm (x^0 .. x^L)."""
    streams: list[torch.Tensor | None] = [None] * (adapter.num_layers + 1)

    def layer_hook(i):
        def hook(module, args, kwargs):
            streams[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [
        layer.layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True)
        for i, layer in enumerate(adapter.layers)
    ]
    handles.append(
        adapter.final_norm.register_forward_pre_hook(layer_hook(adapter.num_layers), with_kwargs=True)
    )
    return streams, handles


@torch.no_grad()
def angular_distances(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    tokens: Literal["last", "all"] = "last",
    batch_size: int = 4,
) -> torch.Tensor:
    """The (L, L) matrix ``D[l, n] = mean d(x^l, x^(l+n))`` over calibration sequences (or tokens).

    One forward pass over `input_ids` (N, T). ``D[l, 0] = 0``; ``D[l, n]`` is NaN where ``l + n > L``.
    Hidden states are taken from hooks on each layer's input and on the final norm's input, so
    ``x^L`` is the residual stream before the final norm (``output_hidden_states`` would give it
    after the norm).
    """
    if tokens not in ("last", "all"):
        raise FlipcheckError(f"angular tokens {tokens!r}; allowed: last, all")
    adapter = adapter_for(model)
    num_layers = adapter.num_layers
    device = adapter.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    streams, handles = _capture_streams(adapter)
    sums = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    rows = 0
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            adapter.decoder(input_ids=batch, use_cache=False)
            if tokens == "last":
                states = [s[:, -1, :].to(streams[0].device, torch.float64) for s in streams]
            else:
                states = [s.reshape(-1, s.shape[-1]).to(streams[0].device, torch.float32) for s in streams]
            sums += distance_sums(states)
            rows += states[0].shape[0]
            streams[:] = [None] * len(streams)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = sums / max(rows, 1)
    idx = torch.arange(num_layers)
    out[idx[:, None] + idx[None, :] > num_layers] = float("nan")
    return out


def drop_layers(model: torch.nn.Module, drop: list[int]) -> None:
    """Remove the decoder layers at indices `drop`, in place, leaving a consistent stock model."""
    adapter = adapter_for(model)
    keep = [i for i in range(adapter.num_layers) if i not in set(drop)]
    adapter.keep_layers(keep)


def apply_layer_drop(
    model: torch.nn.Module,
    config: LayerDropConfig,
    calibration=None,
    *,
    distances: torch.Tensor | None = None,
) -> CompressionReport:
    """Drop ``n`` layers of `model` in place; see the module docstring.

    `distances`: a precomputed :func:`angular_distances` matrix of this very model (with the same
    ``angular_tokens``), so a sweep over ``n`` runs the calibration pass once.
    `calibration` may be ``None`` (or hold no ``input_ids``) for ``selection='last'``.
    """
    if getattr(model.config, "slicegpt", None):
        raise FlipcheckError("layer_drop cannot follow slicegpt in a recipe; put layer_drop before slicegpt")
    adapter = adapter_for(model)
    num_layers = adapter.num_layers
    n = layers_to_drop(config, num_layers)
    params_before = logical_parameters(model)
    extra: dict = {"selection": "explicit" if config.layers is not None else config.selection, "layers_before": num_layers}
    if config.layers is not None:
        drop = list(config.layers)
    elif config.selection == "angular" and n > 0:
        if distances is None:
            ids = require_ids(calibration, "layer_drop selection='angular'", "use selection='last' to drop without it")
            distances = memoized(
                calibration,
                f"layer_drop.angular_distances.{config.angular_tokens}",
                lambda: angular_distances(model, ids, tokens=config.angular_tokens, batch_size=config.batch_size),
            )
        elif tuple(distances.shape) != (num_layers, num_layers):
            raise FlipcheckError(
                f"layer_drop: precomputed distances have shape {tuple(distances.shape)}, "
                f"but the model has {num_layers} layers (expected ({num_layers}, {num_layers}))"
            )
        start = choose_block(distances, n)
        extra["angular_distance"] = float(distances[start, n])
        extra["angular_tokens"] = config.angular_tokens
        extra["distances"] = [
            [None if math.isnan(v) else round(v, 6) for v in row] for row in distances.tolist()
        ]
        drop = list(range(start, start + n))
    else:
        drop = list(range(num_layers - n, num_layers))
    removed_linears = sum(
        isinstance(m, torch.nn.Linear) for i in drop for m in adapter.layer_list[i].modules()
    )
    if drop:
        drop_layers(model, drop)
    log.info("layer_drop: dropped layers %s of %d", drop, num_layers)
    extra.update(
        dropped_layers=drop,
        layers_after=num_layers - n,
        parameters_before=params_before,
    )
    used_calibration = needs_calibration(config) and calibration is not None and n > 0
    return step_report(  # parameters, bits and sparsity read off the model the step leaves
        "layer_drop",
        config,
        model,
        targeted=removed_linears,
        calibration=calibration.describe() if used_calibration else None,
        extra=extra,
    )


register("layer_drop", LayerDropConfig, apply_layer_drop, needs_calibration=needs_calibration)
