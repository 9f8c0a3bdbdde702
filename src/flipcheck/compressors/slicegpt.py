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

**Departures from the reference implementation** (github.com/microsoft/TransformerCompression):

- The PCA bases are computed once, on the **parent's** streams (one forward pass over the
  calibration data, :func:`pca_rotations`), so a sweep over ``slicing`` reuses them. SliceGPT's
  ``rotate_and_slice_sequential`` recomputes each block's basis on the signals of the
  already-sliced earlier blocks. Both are identical at ``slicing = 0``.
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
from typing import Any

import torch
from pydantic import Field

from flipcheck.compressors.architectures import ArchitectureSpec, ModelAdapter, adapter_for, norm_eps
from flipcheck.compressors.calibration import memoized, require_ids
from flipcheck.compressors.registry import CompressionReport, MethodConfig, register
from flipcheck.compressors.stats import count_parameters, dtype_bits
from flipcheck.errors import FlipcheckError
from flipcheck.models import register_loader

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

    def variance_kept(self, dims: list[int]) -> float | None:
        """Mean over streams of the fraction of the stream's energy in its first ``dims[s]`` directions."""
        if self.eigenvalues is None:
            return None
        fractions = [
            float(ev[:k].sum() / ev.sum())
            for ev, k in zip(self.eigenvalues, dims, strict=True)
            if ev.sum() > 0
        ]
        return sum(fractions) / len(fractions) if fractions else None


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


@torch.no_grad()
def pca_rotations(model: torch.nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8) -> Rotations:
    """PCA bases of every residual-stream position of the parent, from one pass over `input_ids`.

    ``C_s = sum over tokens of x_s^T x_s`` (float64), where ``x_s`` is the input of the norm that
    opens block ``s`` (those inputs are the residual stream; fusing the norm scales does not change
    them). Eigenvectors by decreasing eigenvalue. Reuse the result across slicing fractions.
    """
    adapter = adapter_for(model)
    _check_model(adapter)
    norms = []
    for layer in adapter.layers:
        norms += [layer.input_norm, layer.post_attention_norm]
    norms.append(adapter.final_norm)
    d = adapter.hidden_size
    device = adapter.embed_tokens.weight.device
    covariances: list[torch.Tensor | None] = [None] * len(norms)
    tokens = 0

    def hook(index):
        def accumulate(module, args):
            x = args[0].reshape(-1, d).double()
            c = x.T @ x
            covariances[index] = (
                c if covariances[index] is None else covariances[index] + c.to(covariances[index].device)
            )

        return accumulate

    handles = [norm.register_forward_pre_hook(hook(i)) for i, norm in enumerate(norms)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            adapter.decoder(input_ids=batch, use_cache=False)
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    bases, eigenvalues = [], []
    for c in covariances:
        vals, vecs = principal_basis(c)
        eigenvalues.append(vals.cpu())
        bases.append(vecs.cpu())
    log.info("slicegpt: PCA of %d streams over %d tokens", len(bases), tokens)
    return Rotations(bases=bases, eigenvalues=eigenvalues, source="pca", tokens=tokens)


def random_rotations(model: torch.nn.Module, *, seed: int = 0) -> Rotations:
    """Random orthogonal bases for every stream: slicing with them deletes random directions.

    The baseline that shows what the PCA ordering buys (same code path as :func:`apply_slicegpt`).
    """
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(seed)
    bases = [random_orthogonal(adapter.hidden_size, gen) for _ in range(2 * adapter.num_layers + 1)]
    return Rotations(bases=bases, eigenvalues=None, source="random", tokens=0)


# --- apply ---------------------------------------------------------------------------------------


@torch.no_grad()
def apply_slicegpt(
    model: torch.nn.Module,
    config: SliceGPTConfig,
    calibration=None,
    *,
    rotations: Rotations | None = None,
) -> CompressionReport:
    """Rotate and slice `model` in place (see the module docstring).

    `rotations`: bases from :func:`pca_rotations` on this very (parent) model, so a sweep over
    ``slicing`` runs the calibration pass once; computed from ``calibration.input_ids`` otherwise.
    """
    adapter = adapter_for(model)
    _check_model(adapter)
    d, num_layers = adapter.hidden_size, adapter.num_layers
    k = kept_dim(d, config.slicing, config.round_to)
    dims = [k] * (2 * num_layers) + [k if config.slice_head else d]
    if rotations is None:
        ids = require_ids(calibration, "slicegpt (its PCA runs on it)")
        rotations = memoized(
            calibration, model, "slicegpt.pca_rotations", lambda: pca_rotations(model, ids, batch_size=config.batch_size)
        )
    elif len(rotations.bases) != 2 * num_layers + 1 or rotations.hidden_size != d:
        raise FlipcheckError(
            f"slicegpt: precomputed rotations are for {rotations.num_layers} layers of width {rotations.hidden_size}, "
            f"the model has {num_layers} layers of width {d}"
        )
    params_before = count_parameters(model)
    bases = list(rotations.bases)
    if not config.slice_head:
        bases[-1] = torch.eye(
            d, dtype=torch.float64
        )  # the head's stream keeps all D directions: no rotation needed

    # 2. untie the head from the embedding: they are rotated differently
    if adapter.tied_embeddings:
        head = adapter.lm_head
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        log.info("slicegpt: untied lm_head from embed_tokens")
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text_config is not model.config:
        text_config.tie_word_embeddings = False

    dtype = adapter.embed_tokens.weight.dtype
    eps = []
    for layer in adapter.layers:
        eps += [norm_eps(layer.input_norm), norm_eps(layer.post_attention_norm)]
    eps.append(norm_eps(adapter.final_norm))

    def on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(device=like.device)

    # 1 + 3 + 4: fuse the norm scales into the readers, rotate, slice
    emb = adapter.embed_tokens
    q0 = on(bases[0], emb.weight)
    emb.weight = torch.nn.Parameter((emb.weight.double() @ q0[:, : dims[0]]).to(dtype), requires_grad=False)
    emb.embedding_dim = dims[0]
    shortcuts = []
    for i, layer in enumerate(adapter.layers):
        s_attn, s_mlp, s_out = 2 * i, 2 * i + 1, 2 * i + 2
        for norm, readers, s in (
            (layer.input_norm, layer.attention_inputs, s_attn),
            (layer.post_attention_norm, layer.mlp_inputs, s_mlp),
        ):
            for lin in readers:
                q = on(bases[s], lin.weight)
                _set_linear(lin, rotate_reader(lin.weight, norm.weight, q, dims[s]).to(dtype), lin.bias)
        for lin, s in ((layer.attention_output, s_mlp), (layer.mlp_output, s_out)):
            q = on(bases[s], lin.weight)
            bias = None if lin.bias is None else rotate_writer(lin.bias, q, dims[s]).to(dtype)
            _set_linear(lin, rotate_writer(lin.weight, q, dims[s]).to(dtype), bias)
        device = layer.attention_output.weight.device
        shortcuts.append(
            (
                shortcut(bases[s_attn].to(device), bases[s_mlp].to(device), dims[s_attn], dims[s_mlp]),
                shortcut(bases[s_mlp].to(device), bases[s_out].to(device), dims[s_mlp], dims[s_out]),
            )
        )
    head = adapter.lm_head
    q = on(bases[-1], head.weight)
    _set_linear(head, rotate_reader(head.weight, adapter.final_norm.weight, q, dims[-1]).to(dtype), head.bias)

    _install_blocks(adapter, dims, d, eps, device=torch.device("meta"), dtype=dtype)
    for layer, (attn_s, mlp_s) in zip(adapter.layers, shortcuts, strict=True):
        module = layer.layer
        device = layer.attention_output.weight.device
        module.attn_shortcut.weight = torch.nn.Parameter(
            attn_s.T.contiguous().to(device, dtype), requires_grad=False
        )
        module.mlp_shortcut.weight = torch.nn.Parameter(
            mlp_s.T.contiguous().to(device, dtype), requires_grad=False
        )
    structure = {"format": STRUCTURE_FORMAT, "hidden_size": d, "dims": dims}
    setattr(model.config, STRUCTURE_KEY, structure)

    linear_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    log.info("slicegpt: kept %d of %d directions per stream (%s bases)", k, d, rotations.source)
    return CompressionReport(
        method="slicegpt",
        config=config.model_dump(),
        parameters=count_parameters(model),
        bits_per_weight=float(dtype_bits(dtype)),
        sparsity=0.0,
        calibration=calibration.describe() if calibration is not None and rotations.tokens else None,
        targeted=7 * num_layers + 1,
        extra={
            "hidden_size": d,
            "kept_dim": k,
            "slicing_effective": 1.0 - k / d,
            "dims": dims,
            "rotations": rotations.source,
            "rotation_tokens": rotations.tokens,
            "variance_kept": rotations.variance_kept(dims) if rotations.eigenvalues is not None else None,
            "parameters_before": params_before,
            "linear_weights": len(linear_weights),
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


def load_sliced(folder: Path, provenance: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
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
    return model.to(device).eval()


def read_structure(folder: str | Path) -> dict | None:
    """The ``slicegpt`` entry of a folder's config.json, or None for a stock model."""
    f = Path(folder) / "config.json"
    return json.loads(f.read_text()).get(STRUCTURE_KEY) if f.is_file() else None


register_loader("slicegpt", load_sliced)
register("slicegpt", SliceGPTConfig, apply_slicegpt, needs_calibration=True)
