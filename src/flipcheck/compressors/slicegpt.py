"""SliceGPT: delete rows and columns after rotating each residual stream into its PCA basis.

Ashkboos et al. 2024, "SliceGPT: Compress Large Language Models by Deleting Rows and Columns"
(ICLR 2024, arXiv 2401.15024). The method rests on *computational invariance*: for an orthogonal
``Q`` (``Q Q^T = I``) and an RMSNorm without a scale, ``N(x Q) = N(x) Q`` because ``||x Q|| = ||x||``.
So, with row vectors ``x`` and ``y = x W^T``:

1. **Fuse the norm scales** into the Linears that read from each norm: ``W <- W diag(w)``, ``w <- 1``.
   RMSNorm has no mean to remove, so no centering step is needed (the paper's LayerNorm -> RMSNorm
   conversion is the identity here).
2. **Untie** the output head from the token embedding (they get different rotations).
3. **Rotate.** For every residual-stream position ``s`` compute the PCA basis ``Q_s``: the
   eigenvectors of ``C_s = sum_tokens x_s^T x_s`` (float64), ordered by decreasing eigenvalue,
   where ``x_s`` is the stream entering the block. A layer has two positions, attention input and
   MLP input; position ``2L`` is the input of the final norm. Then

   - the embedding writes ``E Q_0``; every Linear *reading* stream ``s`` becomes ``W Q_s``;
   - every Linear *writing* to stream ``s`` becomes ``Q_s^T W`` (bias ``b Q_s``);
   - the residual connection from position ``s`` to ``s+1`` gets the shortcut matrix
     ``Q_s^T Q_(s+1)``, i.e. each block computes ``y = x Q_s^T Q_(s+1) + f(N(x))``.

4. **Slice**: keep the first ``k`` coordinates of every stream (the largest principal
   directions): readers keep their first ``k`` columns, writers their first ``k`` rows, shortcuts
   their top-left ``k x k`` corner. ``k = (1 - slicing) * hidden_size`` rounded down to a multiple
   of ``round_to`` (8, as SliceGPT's ``round_interval``); ``slicing = 0`` keeps every direction
   (rotation only, the parent's function up to float rounding).

**The norm after slicing.** RMSNorm divides by the stream's width: ``N(z) = z / sqrt(sum(z_i^2)/D + eps)``.
After slicing, the stream holds ``k < D`` coordinates whose squared norm approximates ``||z||^2``
(the deleted directions carry the least energy). A stock RMSNorm of width ``k`` would divide the
sum by ``k`` instead of ``D``, shrinking every normalised activation by about ``sqrt(k/D)`` and
moving ``eps`` to the wrong scale. :class:`~flipcheck.compressors.slicegpt_model.SlicedRMSNorm` therefore divides by the parent's width ``D``:
``y = z_k / sqrt(sum_(i<=k) z_i^2 / D + eps)``, which is exactly the parent norm of the
reconstructed stream ``z_k Q_k^T`` (its norm equals ``||z_k||``). It has no weight (fused in step 1).

**Where the bases come from** (``pca``). ``sequential`` (default) is the reference procedure
(``rotate_and_slice_sequential`` of github.com/microsoft/TransformerCompression): the basis of
stream ``s+1`` is the PCA of the stream the *already-sliced* model produces there. flipcheck runs
the parent's layer ``l`` on the sliced stream mapped back to the parent's coordinates,
``x Q_k Q_k^T`` (which is exactly what the sliced layer computes, rotated), so each covariance is
accumulated, turned into a basis and dropped before the next one: one ``D x D`` covariance and
three bases alive at a time. ``parent`` computes every basis once on the parent's own streams
(:func:`~flipcheck.compressors.slicegpt_pca.pca_rotations`, memoised per calibration so a sweep over ``slicing`` reuses them); it
holds all ``2L+1`` bases. The two are identical at ``slicing = 0``.

**Departure from the reference implementation:**

- By default the stream read by ``lm_head`` is not sliced (SliceGPT's default, ``slice_head``);
  it is then not rotated either (``Q_2L = I``), which changes nothing in exact arithmetic.

The sliced model holds extra modules (a shortcut Linear per residual connection, the sliced
norms), so plain transformers cannot rebuild it: :func:`~flipcheck.compressors.slicegpt_model.load_sliced` does, registered as the
``slicegpt`` loader of :mod:`flipcheck.models`. The structure is stored in ``config.json`` under
``slicegpt`` (and repeated in ``report.extra["provenance"]``, to be merged into ``flipcheck.json``).

This module holds the configuration and the rotate-and-slice step; the bases come from
:mod:`flipcheck.compressors.slicegpt_pca`, the sliced model's modules and its loader from
:mod:`flipcheck.compressors.slicegpt_model`.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from pydantic import Field

from flipcheck.compressors.architectures import ModelAdapter, adapter_for, norm_eps
from flipcheck.compressors.calibration import memoized, require_ids
from flipcheck.compressors.registry import CompressionReport, MethodConfig, register
from flipcheck.compressors.slicegpt_model import (
    STRUCTURE_FORMAT,
    STRUCTURE_KEY,
    check_sliceable,
    install_blocks,
    load_sliced,
    set_linear,
)
from flipcheck.compressors.slicegpt_pca import Rotations, pca_rotations, stream_bases
from flipcheck.compressors.stats import logical_parameters, step_report
from flipcheck.errors import FlipcheckError
from flipcheck.loaders import register_loader

log = logging.getLogger(__name__)


class SliceGPTConfig(MethodConfig):
    """SliceGPT: rotate each residual stream into its PCA basis and delete the smallest directions."""

    slicing: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="fraction of the hidden size to delete (0 = rotation only, no deletion)",
    )
    round_to: int = Field(
        8, ge=1, le=1024, description="kept width rounded down to a multiple of this (hardware-friendly)"
    )
    slice_head: bool = Field(
        False, description="also slice the stream read by lm_head (SliceGPT's default: no)"
    )
    batch_size: int = Field(
        8, ge=1, description="calibration sequences per forward pass when computing the PCA bases"
    )
    pca: Literal["sequential", "parent"] = Field(
        "sequential",
        description="'sequential': each stream's PCA on the already-sliced model (the paper's reference); "
        "'parent': every basis from the parent, computed once per sweep (faster, differs when slicing > 0)",
    )


# --- math: pure functions on tensors ----------------------------------------------------------


def kept_dim(hidden_size: int, slicing: float, round_to: int = 8) -> int:
    """``k = floor((1 - slicing) * D)`` rounded down to a multiple of `round_to` (at least `round_to`).

    ``slicing = 0`` keeps all ``D`` (even when D is not a multiple of `round_to`).
    """
    if slicing == 0:
        return hidden_size
    k = math.floor(round((1.0 - slicing) * hidden_size, 6))
    k -= k % round_to
    return max(min(round_to, hidden_size), min(k, hidden_size))


def rotate_reader(
    weight: torch.Tensor, scale: torch.Tensor | None, basis: torch.Tensor, k: int
) -> torch.Tensor:
    """A Linear reading the stream: ``(W diag(scale) Q)[:, :k]`` (float64 result)."""
    w = weight.double()
    if scale is not None:
        w = w * scale.double()[None, :]
    return w @ basis[:, :k]


def rotate_writer(weight: torch.Tensor, basis: torch.Tensor, k: int) -> torch.Tensor:
    """A Linear writing the stream: ``(Q^T W)[:k, :]``; for a bias (1-D) ``(b Q)[:k]`` (float64 result)."""
    if weight.ndim == 1:
        return weight.double() @ basis[:, :k]
    return basis[:, :k].T @ weight.double()


def shortcut(basis_in: torch.Tensor, basis_out: torch.Tensor, k_in: int, k_out: int) -> torch.Tensor:
    """The residual map between consecutive streams: ``(Q_in^T Q_out)[:k_in, :k_out]`` (x @ S)."""
    return basis_in[:, :k_in].T @ basis_out[:, :k_out]


# --- apply ---------------------------------------------------------------------------------------


def _untie_head(adapter: ModelAdapter) -> None:
    """The head and the embedding are rotated differently: give the head its own weight."""
    model = adapter.model
    if adapter.tied_embeddings:
        head = adapter.lm_head
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        log.info("slicegpt: untied lm_head from embed_tokens")
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text_config is not model.config:
        text_config.tie_word_embeddings = False


def _rotate_and_slice(adapter: ModelAdapter, bases, dims: list[int], dtype: torch.dtype) -> tuple[list, list]:
    """Fuse the norm scales into the readers, rotate every reader and writer, slice (steps 1, 3, 4).

    `bases` yields ``(eigenvalues, Q_s)`` for ``s = 0 .. 2L`` in order; layer ``l`` is rewritten as
    soon as the bases of its three streams are known, and only those are held. Returns the
    shortcut matrices per layer and the eigenvalues seen.
    """

    def on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(device=like.device)

    bases = iter(bases)
    eigen, q_in = [], None

    def take() -> torch.Tensor:
        vals, q = next(bases)
        eigen.append(vals)
        return q

    emb = adapter.embed_tokens
    q_in = take()
    emb.weight = torch.nn.Parameter(
        (emb.weight.double() @ on(q_in, emb.weight)[:, : dims[0]]).to(dtype), requires_grad=False
    )
    emb.embedding_dim = dims[0]
    shortcuts = []
    for i, layer in enumerate(adapter.layers):
        s_attn, s_mlp, s_out = 2 * i, 2 * i + 1, 2 * i + 2
        q_mid = take()
        q_out = take()
        for norm, readers, q, s in (
            (layer.input_norm, layer.attention_inputs, q_in, s_attn),
            (layer.post_attention_norm, layer.mlp_inputs, q_mid, s_mlp),
        ):
            for lin in readers:
                set_linear(lin, rotate_reader(lin.weight, norm.weight, on(q, lin.weight), dims[s]).to(dtype), lin.bias)
        for lin, q, s in ((layer.attention_output, q_mid, s_mlp), (layer.mlp_output, q_out, s_out)):
            q = on(q, lin.weight)
            bias = None if lin.bias is None else rotate_writer(lin.bias, q, dims[s]).to(dtype)
            set_linear(lin, rotate_writer(lin.weight, q, dims[s]).to(dtype), bias)
        shortcuts.append(
            (
                shortcut(q_in, q_mid, dims[s_attn], dims[s_mlp]).to(dtype),
                shortcut(q_mid, q_out, dims[s_mlp], dims[s_out]).to(dtype),
            )
        )
        q_in = q_out
    head = adapter.lm_head
    set_linear(
        head, rotate_reader(head.weight, adapter.final_norm.weight, on(q_in, head.weight), dims[-1]).to(dtype), head.bias
    )
    return shortcuts, eigen


def _variance_kept(eigen: list, dims: list[int]) -> float | None:
    """Mean over the PCA'd streams of the fraction of each stream's energy in its kept directions."""
    fractions = [float(ev[:k].sum() / ev.sum()) for ev, k in zip(eigen, dims, strict=True) if ev is not None and ev.sum() > 0]
    return sum(fractions) / len(fractions) if fractions else None


def _bases_for(model, config: SliceGPTConfig, calibration, rotations: Rotations | None, dims: list[int]):
    """The bases to slice with, as an iterator, plus a description (source, tokens)."""
    adapter = adapter_for(model)
    d, num_layers = adapter.hidden_size, adapter.num_layers
    if rotations is None and config.pca == "parent":
        ids = require_ids(calibration, "slicegpt (its PCA runs on it)")
        rotations = memoized(
            calibration, "slicegpt.pca_rotations", lambda: pca_rotations(model, ids, batch_size=config.batch_size)
        )
    if rotations is None:
        ids = require_ids(calibration, "slicegpt (its PCA runs on it)")
        return stream_bases(model, ids, dims, sequential=True, batch_size=config.batch_size), "pca", int(ids.numel())
    if len(rotations.bases) != 2 * num_layers + 1 or rotations.hidden_size != d:
        raise FlipcheckError(
            f"slicegpt: precomputed rotations are for {rotations.num_layers} layers of width {rotations.hidden_size}, "
            f"the model has {num_layers} layers of width {d}"
        )
    bases = list(rotations.bases)
    eigen = list(rotations.eigenvalues) if rotations.eigenvalues is not None else [None] * len(bases)
    if dims[-1] == d:  # the head's stream keeps all D directions: no rotation needed
        bases[-1], eigen[-1] = torch.eye(d, dtype=torch.float64), None
    return zip(eigen, bases, strict=True), rotations.source, rotations.tokens


@torch.no_grad()
def apply_slicegpt(
    model: torch.nn.Module,
    config: SliceGPTConfig,
    calibration=None,
    *,
    rotations: Rotations | None = None,
) -> CompressionReport:
    """Rotate and slice `model` in place (see the module docstring).

    Bases: ``config.pca == "sequential"`` (default) computes each stream's PCA on the
    already-sliced model while slicing; ``"parent"`` uses :func:`pca_rotations` of the parent
    (memoised per calibration, so a sweep over ``slicing`` runs that pass once). `rotations`
    overrides both (precomputed bases for this very model, e.g. random ones).
    """
    adapter = adapter_for(model)
    check_sliceable(adapter)
    d, num_layers = adapter.hidden_size, adapter.num_layers
    k = kept_dim(d, config.slicing, config.round_to)
    dims = [k] * (2 * num_layers) + [k if config.slice_head else d]
    params_before = logical_parameters(model)
    was_training = model.training
    model.eval()
    bases, source, tokens = _bases_for(model, config, calibration, rotations, dims)
    _untie_head(adapter)  # 2.
    dtype = adapter.embed_tokens.weight.dtype
    eps = []
    for layer in adapter.layers:
        eps += [norm_eps(layer.input_norm), norm_eps(layer.post_attention_norm)]
    eps.append(norm_eps(adapter.final_norm))
    try:
        shortcuts, eigen = _rotate_and_slice(adapter, bases, dims, dtype)  # 1, 3, 4.
    finally:
        getattr(bases, "close", lambda: None)()
        model.train(was_training)
    install_blocks(adapter, dims, d, eps, device=torch.device("meta"), dtype=dtype)
    for layer, (attn_s, mlp_s) in zip(adapter.layers, shortcuts, strict=True):
        device = layer.attention_output.weight.device
        layer.layer.attn_shortcut.weight = torch.nn.Parameter(attn_s.T.contiguous().to(device), requires_grad=False)
        layer.layer.mlp_shortcut.weight = torch.nn.Parameter(mlp_s.T.contiguous().to(device), requires_grad=False)
    structure = {"format": STRUCTURE_FORMAT, "hidden_size": d, "dims": dims}
    setattr(model.config, STRUCTURE_KEY, structure)
    log.info("slicegpt: kept %d of %d directions per stream (%s bases, pca %s)", k, d, source, config.pca)
    return step_report(  # parameters, bits and sparsity read off the model the step leaves
        "slicegpt",
        config,
        model,
        calibration=calibration.describe() if calibration is not None and tokens else None,
        targeted=7 * num_layers + 1,
        extra={
            "hidden_size": d,
            "kept_dim": k,
            "slicing_effective": 1.0 - k / d,
            "dims": dims,
            "rotations": source,
            "pca": config.pca if rotations is None else "given",
            "rotation_tokens": tokens,
            "variance_kept": _variance_kept(eigen, dims),
            "parameters_before": params_before,
            "linear_weights": sum(isinstance(m, torch.nn.Linear) for m in model.modules()),
            "provenance": {"loader": "slicegpt", STRUCTURE_KEY: structure},
        },
    )


register_loader("slicegpt", load_sliced)
register("slicegpt", SliceGPTConfig, apply_slicegpt, needs_calibration=True, produces="sliced")
