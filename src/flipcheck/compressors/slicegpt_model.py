"""The structure of a SliceGPT child: sliced norms, shortcut Linears, and rebuilding a saved one.

SliceGPT (Ashkboos et al. 2024, arXiv 2401.15024; the method is described in
:mod:`flipcheck.compressors.slicegpt`) leaves a model whose residual streams hold ``k < D``
coordinates. Each decoder layer computes ``y = x S_attn + attn(N(x))`` and ``z = y S_mlp + mlp(N(y))``
with the shortcut matrices ``S = (Q_in^T Q_out)[:k_in, :k_out]``, and every norm divides by the
parent's width ``D`` (:class:`SlicedRMSNorm`). Plain transformers cannot rebuild that:
:func:`load_sliced` does (the ``slicegpt`` loader of :mod:`flipcheck.models`), from the structure
stored in ``config.json`` under ``slicegpt``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from flipcheck.compressors.architectures import ArchitectureSpec, ModelAdapter, adapter_for, norm_eps
from flipcheck.errors import FlipcheckError

log = logging.getLogger(__name__)

STRUCTURE_KEY = "slicegpt"  # config.json entry describing the sliced structure
STRUCTURE_FORMAT = 1


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


def set_linear(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def stream_dims(structure: dict) -> list[int]:
    return [int(k) for k in structure["dims"]]


def is_sliced(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), STRUCTURE_KEY, None))


def install_blocks(
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


def check_sliceable(adapter: ModelAdapter) -> None:
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
            set_linear(lin, torch.empty(lin.out_features, dims[2 * i], device=meta), lin.bias)
        for lin in layer.mlp_inputs:
            set_linear(lin, torch.empty(lin.out_features, dims[2 * i + 1], device=meta), lin.bias)
        for lin, s in ((layer.attention_output, 2 * i + 1), (layer.mlp_output, 2 * i + 2)):
            bias = None if lin.bias is None else torch.empty(dims[s], device=meta)
            set_linear(lin, torch.empty(dims[s], lin.in_features, device=meta), bias)
    head = adapter.lm_head
    set_linear(head, torch.empty(head.out_features, dims[-1], device=meta), head.bias)
    install_blocks(adapter, dims, d, eps, device=meta, dtype=dtype)

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
