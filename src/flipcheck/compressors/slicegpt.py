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
moving ``eps`` to the wrong scale. :class:`SlicedRMSNorm` therefore divides by the parent's width ``D``:
``y = z_k / sqrt(sum_(i<=k) z_i^2 / D + eps)``, which is exactly the parent norm of the
reconstructed stream ``z_k Q_k^T`` (its norm equals ``||z_k||``). It has no weight (fused in step 1).

**Where the bases come from** (``pca``). ``sequential`` (default) is the reference procedure
(``rotate_and_slice_sequential`` of github.com/microsoft/TransformerCompression): the basis of
stream ``s+1`` is the PCA of the stream the *already-sliced* model produces there. flipcheck runs
the parent's layer ``l`` on the sliced stream mapped back to the parent's coordinates,
``x Q_k Q_k^T`` (which is exactly what the sliced layer computes, rotated), so each covariance is
accumulated, turned into a basis and dropped before the next one: one ``D x D`` covariance and
three bases alive at a time. ``parent`` computes every basis once on the parent's own streams
(:func:`pca_rotations`, memoised per calibration so a sweep over ``slicing`` reuses them); it
holds all ``2L+1`` bases. The two are identical at ``slicing = 0``.

**Departure from the reference implementation:**

- By default the stream read by ``lm_head`` is not sliced (SliceGPT's default, ``slice_head``);
  it is then not rotated either (``Q_2L = I``), which changes nothing in exact arithmetic.

The sliced model holds extra modules (a shortcut Linear per residual connection, the sliced
norms), so plain transformers cannot rebuild it: :func:`load_sliced` does, registered as the
``slicegpt`` loader of :mod:`flipcheck.models`. The structure is stored in ``config.json`` under
``slicegpt`` (and repeated in ``report.extra["provenance"]``, to be merged into ``flipcheck.json``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from flipcheck.compressors.architectures import (
    ArchitectureSpec,
    LayerAdapter,
    ModelAdapter,
    adapter_for,
    norm_eps,
)
from flipcheck.compressors.calibration import memoized, require_ids
from flipcheck.compressors.registry import CompressionReport, MethodConfig, register
from flipcheck.compressors.stats import logical_parameters, step_report
from flipcheck.errors import FlipcheckError
from flipcheck.loaders import register_loader

log = logging.getLogger(__name__)

STRUCTURE_KEY = "slicegpt"  # config.json entry describing the sliced structure
STRUCTURE_FORMAT = 1


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


@dataclass
class Rotations:
    """One orthogonal basis per residual-stream position of a model with L layers.

    ``bases[2l]``: stream entering layer l's attention block, ``bases[2l+1]``: entering its MLP block,
    ``bases[2L]``: entering the final norm. Each is a (D, D) float64 CPU tensor whose column j is
    the j-th direction kept first (decreasing eigenvalue for PCA).
    """

    bases: list[torch.Tensor]
    eigenvalues: list[torch.Tensor] | None = None  # decreasing, per stream; None for random bases
    source: str = "pca"  # "pca" or "random"
    tokens: int = 0  # calibration tokens the covariances summed over

    @property
    def num_layers(self) -> int:
        return (len(self.bases) - 1) // 2

    @property
    def hidden_size(self) -> int:
        return int(self.bases[0].shape[0])


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


def principal_basis(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (decreasing) and eigenvectors (as columns) of a symmetric PSD matrix, in float64."""
    vals, vecs = torch.linalg.eigh(covariance.double())
    return vals.flip(0), vecs.flip(1)


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal (size, size) float64 matrix: QR of a Gaussian with signs fixed."""
    g = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)


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


# --- modules of a sliced model ------------------------------------------------------------------


class SlicedRMSNorm(torch.nn.Module):
    """RMSNorm of a sliced stream, normalised by the parent's width ``D`` (not the kept ``k``).

    ``y = z / sqrt(sum_(i<k) z_i^2 / D + eps)``; no weight (SliceGPT fuses it into the readers).
    Computed in float32 like transformers' RMSNorm, returned in the input dtype.
    """

    def __init__(self, size: int, full_size: int, eps: float):
        super().__init__()
        self.size = size
        self.full_size = full_size
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        mean_square = x.pow(2).sum(-1, keepdim=True) / self.full_size
        return (x * torch.rsqrt(mean_square + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.size}, full_size={self.full_size}, eps={self.eps}"


def _sliced_layer_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values=None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The pre-norm decoder layer with SliceGPT's shortcut matrices on both residual connections."""
    spec: ArchitectureSpec = self._slicegpt_spec
    residual = self.attn_shortcut(hidden_states)
    hidden_states = self.get_submodule(spec.input_norm)(hidden_states)
    hidden_states, _ = self.get_submodule(spec.attention)(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states = residual + hidden_states
    residual = self.mlp_shortcut(hidden_states)
    hidden_states = self.get_submodule(spec.post_attention_norm)(hidden_states)
    hidden_states = self.get_submodule(spec.mlp)(hidden_states)
    return residual + hidden_states


_SLICED_CLASSES: dict[type, type] = {}


def _sliced_layer_class(base: type, spec: ArchitectureSpec) -> type:
    """A subclass of the decoder layer's class whose forward applies the shortcut matrices.

    Subclassing keeps ``isinstance`` checks (transformers' output recording) working.
    """
    if base.__name__.startswith("Sliced"):
        return base
    if base not in _SLICED_CLASSES:
        _SLICED_CLASSES[base] = type(
            f"Sliced{base.__name__}",
            (base,),
            {"forward": _sliced_layer_forward, "_slicegpt_spec": spec, "__module__": __name__},
        )
    return _SLICED_CLASSES[base]


def _set_linear(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def _empty_like_shape(param: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, device=param.device, dtype=param.dtype)


def stream_dims(structure: dict) -> list[int]:
    return [int(k) for k in structure["dims"]]


def is_sliced(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), STRUCTURE_KEY, None))


def _install_blocks(
    adapter: ModelAdapter, dims: list[int], full_size: int, eps: list[float], device, dtype
) -> None:
    """Swap in the sliced norms, add (uninitialised) shortcut Linears, switch the layer classes."""
    for i, layer in enumerate(adapter.layers):
        attn_in, mlp_in, out = dims[2 * i], dims[2 * i + 1], dims[2 * i + 2]
        adapter.set_module(
            layer.qualified(adapter.spec.input_norm), SlicedRMSNorm(attn_in, full_size, eps[2 * i])
        )
        adapter.set_module(
            layer.qualified(adapter.spec.post_attention_norm),
            SlicedRMSNorm(mlp_in, full_size, eps[2 * i + 1]),
        )
        module = layer.layer
        module.attn_shortcut = torch.nn.Linear(attn_in, mlp_in, bias=False, device=device, dtype=dtype)
        module.mlp_shortcut = torch.nn.Linear(mlp_in, out, bias=False, device=device, dtype=dtype)
        module.__class__ = _sliced_layer_class(type(module), adapter.spec)
    adapter.set_module(adapter.spec.final_norm, SlicedRMSNorm(dims[-1], full_size, eps[-1]))


def _check_model(adapter: ModelAdapter) -> None:
    if is_sliced(adapter.model):
        raise FlipcheckError(
            "slicegpt: this model is already sliced; slice the parent once with the wanted `slicing`"
        )
    d = adapter.hidden_size
    if adapter.spec.norm_type != "rmsnorm":
        raise FlipcheckError(
            f"slicegpt supports weight-only RMSNorm models; {adapter.model_type} uses {adapter.spec.norm_type}"
        )
    for layer in adapter.layers:
        for norm, readers in layer.norm_groups():
            if getattr(norm, "bias", None) is not None or tuple(norm.weight.shape) != (d,):
                raise FlipcheckError(
                    f"slicegpt: {layer.prefix} has a norm that is not a weight-only RMSNorm of width {d}"
                )
            for lin in readers:
                if not lin.weight.is_floating_point():
                    raise FlipcheckError(
                        "slicegpt needs floating-point weights; put slicegpt before any quantization step in the recipe"
                    )


# --- PCA -------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needed was recorded."""


def _layer_inputs(adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int) -> list[tuple]:
    """Per calibration batch: (stream entering layer 0, the other positional and keyword arguments
    the decoder passes to its layers: rotary embeddings, mask). Runs only the embedding."""
    captured: list[tuple] = []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise _Stop

    handle = adapter.layer_list[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = adapter.embed_tokens.weight.device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                adapter.decoder(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(
    layer: LayerAdapter, hidden: torch.Tensor, args: tuple, kwargs: dict, mid=None, *, stop: bool = False, seen=None
) -> torch.Tensor:
    """One decoder layer on `hidden`; ``m = x + attn(N(x))`` is the stream between its two blocks.

    ``stop``: return ``m`` without running the MLP block. Otherwise run the whole layer, with ``m``
    replaced by ``mid(m)`` when `mid` is given (SliceGPT's sliced stream, mapped back to the
    parent's coordinates), and return the layer's output. ``seen(m)`` is called with ``m``.
    """
    box: list[torch.Tensor] = []

    def on_attention(module, inputs, output):
        attn = output[0] if isinstance(output, tuple) else output
        m = hidden + attn
        if seen is not None:
            seen(m)
        if stop:
            box.append(m)
            raise _Stop
        if mid is None:
            return None
        new = (mid(m) - hidden).to(attn.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = layer.attention.register_forward_hook(on_attention)
    try:
        out = layer.layer(hidden, *args, **kwargs)
    except _Stop:
        return box[0]
    finally:
        handle.remove()
    return out[0] if isinstance(out, tuple) else out


def _covariance(streams) -> torch.Tensor:
    """``C = sum over tokens of x^T x`` in float64, accumulated batch by batch."""
    c = None
    for x in streams:
        x = x.reshape(-1, x.shape[-1]).double()
        part = x.T @ x
        c = part if c is None else c + part.to(c.device)
    return c


class _RunningCovariance:
    """``sum x^T x`` over the batches handed to :meth:`add` (float64)."""

    def __init__(self):
        self.total: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        part = _covariance([x])
        self.total = part if self.total is None else self.total + part.to(self.total.device)


def _project(x: torch.Tensor, basis: torch.Tensor, k: int) -> torch.Tensor:
    """``x Q_k Q_k^T``: the stream a model sliced to `k` directions carries, in the parent's coordinates.

    Computed as ``x - (x Q_r) Q_r^T`` with ``Q_r`` the deleted directions (``Q Q^T = I``), which
    costs ``D - k`` instead of ``k`` columns.
    """
    rest = basis[:, k:].to(x.device)
    x64 = x.double()
    return (x64 - (x64 @ rest) @ rest.T).to(x.dtype)


def stream_bases(
    model: torch.nn.Module, input_ids: torch.Tensor, dims: list[int], *, sequential: bool, batch_size: int = 8
):
    """Yield ``(eigenvalues, basis)`` for the streams ``0 .. 2L`` in order, one covariance alive at a time.

    ``sequential=True`` is SliceGPT's reference procedure: the stream of position ``s+1`` is
    computed from the stream of position ``s`` as the model sliced to ``dims[s]`` carries it
    (``x Q_k Q_k^T``), so each basis is the PCA of the already-sliced model. ``False``: the
    parent's own streams (every basis from the parent). A stream kept whole (``dims[s] == D``,
    e.g. the head's by default) at the last position gets the identity without a covariance.
    The caller may change layer ``l``'s weights once the basis of position ``2l+2`` was yielded.
    """
    adapter = adapter_for(model)
    d, last = adapter.hidden_size, 2 * adapter.num_layers
    batches = _layer_inputs(adapter, input_ids, batch_size)
    xs = [h for h, _, _ in batches]

    def basis_of(covariance):
        vals, vecs = principal_basis(covariance)
        return vals.cpu(), vecs.cpu()

    def basis(streams):
        return basis_of(_covariance(streams))

    def keep(streams, q, k):
        return [_project(x, q, k) for x in streams] if sequential and k < d else streams

    vals, q = basis(xs)
    yield vals, q
    xs = keep(xs, q, dims[0])
    for i, layer in enumerate(adapter.layers):
        head_kept = 2 * i + 2 == last and dims[last] == d
        if sequential or head_kept:  # the MLP's input stream first: the MLP then reads it sliced
            mids = (_run_layer(layer, x, a, kw, stop=True) for x, (_, a, kw) in zip(xs, batches, strict=True))
            vals, q_mid = basis(mids)
            yield vals, q_mid
            if head_kept:
                yield None, torch.eye(d, dtype=torch.float64)
                return
            k_mid = dims[2 * i + 1]
            mid = (lambda m, q=q_mid, k=k_mid: _project(m, q, k)) if sequential and k_mid < d else None
            outs = [_run_layer(layer, x, a, kw, mid) for x, (_, a, kw) in zip(xs, batches, strict=True)]
        else:  # the parent's streams: one pass gives both
            running = _RunningCovariance()
            outs = [_run_layer(layer, x, a, kw, seen=running.add) for x, (_, a, kw) in zip(xs, batches, strict=True)]
            vals, q_mid = basis_of(running.total)
            del running
            yield vals, q_mid
        vals, q = basis(outs)
        yield vals, q
        xs = keep(outs, q, dims[2 * i + 2])


@torch.no_grad()
def pca_rotations(model: torch.nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8) -> Rotations:
    """PCA bases of every residual-stream position of the parent (``pca: parent``).

    ``C_s = sum over tokens of x_s^T x_s`` (float64), where ``x_s`` is the input of the norm that
    opens block ``s`` (those inputs are the residual stream; fusing the norm scales does not change
    them). Eigenvectors by decreasing eigenvalue. Computed layer by layer (one covariance alive at
    a time); the result holds all ``2L+1`` bases, to be reused across slicing fractions.
    """
    adapter = adapter_for(model)
    _check_model(adapter)
    was_training = model.training
    model.eval()
    try:
        full = [adapter.hidden_size] * (2 * adapter.num_layers) + [adapter.hidden_size + 1]  # +1: compute the last too
        pairs = list(stream_bases(model, input_ids, full, sequential=False, batch_size=batch_size))
    finally:
        model.train(was_training)
    log.info("slicegpt: PCA of %d streams over %d tokens", len(pairs), input_ids.numel())
    return Rotations(
        bases=[q for _, q in pairs], eigenvalues=[v for v, _ in pairs], source="pca", tokens=int(input_ids.numel())
    )


def random_rotations(model: torch.nn.Module, *, seed: int = 0) -> Rotations:
    """Random orthogonal bases for every stream: slicing with them deletes random directions.

    The baseline that shows what the PCA ordering buys (same code path as :func:`apply_slicegpt`).
    """
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(seed)
    bases = [random_orthogonal(adapter.hidden_size, gen) for _ in range(2 * adapter.num_layers + 1)]
    return Rotations(bases=bases, eigenvalues=None, source="random", tokens=0)


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
                _set_linear(lin, rotate_reader(lin.weight, norm.weight, on(q, lin.weight), dims[s]).to(dtype), lin.bias)
        for lin, q, s in ((layer.attention_output, q_mid, s_mlp), (layer.mlp_output, q_out, s_out)):
            q = on(q, lin.weight)
            bias = None if lin.bias is None else rotate_writer(lin.bias, q, dims[s]).to(dtype)
            _set_linear(lin, rotate_writer(lin.weight, q, dims[s]).to(dtype), bias)
        shortcuts.append(
            (
                shortcut(q_in, q_mid, dims[s_attn], dims[s_mlp]).to(dtype),
                shortcut(q_mid, q_out, dims[s_mlp], dims[s_out]).to(dtype),
            )
        )
        q_in = q_out
    head = adapter.lm_head
    _set_linear(
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
    _check_model(adapter)
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
    _install_blocks(adapter, dims, d, eps, device=torch.device("meta"), dtype=dtype)
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


# --- loading a sliced child ------------------------------------------------------------------------


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FlipcheckError(f"{str(folder)!r} holds no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_sliced(folder: Path, provenance: dict, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """Rebuild a SliceGPT child saved with ``save_pretrained``: stock model, sliced structure, weights.

    The structure (kept width per stream) comes from ``config.json``'s ``slicegpt`` entry (or the
    provenance's). Weights load from safetensors only; the model is built on the meta device first,
    so no memory is spent on weights that would be overwritten.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    cfg = AutoConfig.from_pretrained(folder)
    structure = getattr(cfg, STRUCTURE_KEY, None) or provenance.get(STRUCTURE_KEY)
    if not structure or structure.get("format") != STRUCTURE_FORMAT:
        raise FlipcheckError(
            f"{str(folder)!r} is marked as a SliceGPT child but its config.json has no '{STRUCTURE_KEY}' "
            f"entry of format {STRUCTURE_FORMAT}"
        )
    dims, d = stream_dims(structure), int(structure["hidden_size"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg)
    adapter = adapter_for(model)
    if len(dims) != 2 * adapter.num_layers + 1:
        raise FlipcheckError(
            f"{str(folder)!r}: slicegpt dims list has {len(dims)} entries for {adapter.num_layers} layers"
        )
    eps = []
    for layer in adapter.layers:
        eps += [norm_eps(layer.input_norm), norm_eps(layer.post_attention_norm)]
    eps.append(norm_eps(adapter.final_norm))
    meta = torch.device("meta")
    emb = adapter.embed_tokens
    emb.weight = torch.nn.Parameter(
        torch.empty(emb.num_embeddings, dims[0], device=meta), requires_grad=False
    )
    emb.embedding_dim = dims[0]
    for i, layer in enumerate(adapter.layers):
        for lin in layer.attention_inputs:
            _set_linear(lin, torch.empty(lin.out_features, dims[2 * i], device=meta), lin.bias)
        for lin in layer.mlp_inputs:
            _set_linear(lin, torch.empty(lin.out_features, dims[2 * i + 1], device=meta), lin.bias)
        for lin, s in ((layer.attention_output, 2 * i + 1), (layer.mlp_output, 2 * i + 2)):
            bias = None if lin.bias is None else torch.empty(dims[s], device=meta)
            _set_linear(lin, torch.empty(dims[s], lin.in_features, device=meta), bias)
    head = adapter.lm_head
    _set_linear(head, torch.empty(head.out_features, dims[-1], device=meta), head.bias)
    _install_blocks(adapter, dims, d, eps, device=meta, dtype=dtype)

    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _read_weights(folder).items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise FlipcheckError(
            f"{str(folder)!r}: weights do not match the SliceGPT structure "
            f"(missing: {result.missing_keys[:5]}, unexpected: {result.unexpected_keys[:5]})"
        )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise FlipcheckError(f"{str(folder)!r}: no weights for {left[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    if device == "auto":
        return dispatch_auto(model).eval()
    return model.to(device).eval()


def dispatch_auto(model: torch.nn.Module) -> torch.nn.Module:
    """Spread a (sliced) model over the visible GPUs as ``device_map="auto"`` does, whole decoder
    layers per device; on a machine without GPUs everything stays on the CPU."""
    from accelerate import dispatch_model, infer_auto_device_map

    layer = adapter_for(model).layer_list[0]
    no_split = sorted({type(layer).__name__, *(getattr(model, "_no_split_modules", None) or [])})
    device_map = infer_auto_device_map(model, no_split_module_classes=no_split)
    if set(device_map.values()) <= {"cpu"}:
        return model.to("cpu")
    log.info("slicegpt: device map %s", device_map)
    return dispatch_model(model, device_map=device_map)


def read_structure(folder: str | Path) -> dict | None:
    """The ``slicegpt`` entry of a folder's config.json, or None for a stock model."""
    f = Path(folder) / "config.json"
    return json.loads(f.read_text()).get(STRUCTURE_KEY) if f.is_file() else None


register_loader("slicegpt", load_sliced)
register("slicegpt", SliceGPTConfig, apply_slicegpt, needs_calibration=True, produces="sliced")
