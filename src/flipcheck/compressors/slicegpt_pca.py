"""SliceGPT's rotations: the PCA basis of every residual stream, or random orthogonal ones.

Ashkboos et al. 2024 (arXiv 2401.15024), see :mod:`flipcheck.compressors.slicegpt`. For each
residual-stream position ``s`` the basis ``Q_s`` holds the eigenvectors of
``C_s = sum_tokens x_s^T x_s`` (float64) by decreasing eigenvalue. :func:`stream_bases` yields
them one at a time, either on the parent's streams or (SliceGPT's reference, ``sequential``) on
the streams of the already-sliced model, ``x Q_k Q_k^T``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from flipcheck.compressors.architectures import LayerAdapter, ModelAdapter, adapter_for
from flipcheck.compressors.slicegpt_model import check_sliceable

log = logging.getLogger(__name__)


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


def principal_basis(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (decreasing) and eigenvectors (as columns) of a symmetric PSD matrix, in float64."""
    vals, vecs = torch.linalg.eigh(covariance.double())
    return vals.flip(0), vecs.flip(1)


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal (size, size) float64 matrix: QR of a Gaussian with signs fixed."""
    g = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)


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
    check_sliceable(adapter)
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
