"""Architecture facts, stated once and keyed by ``config.model_type``.

Several methods need to know, for a decoder-only model, which modules read from and write to the
residual stream:

- SmoothQuant and AWQ migrate scale from a norm into the Linears that read from it,
- SliceGPT (Ashkboos et al. 2024) rotates every Linear reading from the stream (``x Q``) and every
  Linear writing to it (``Q^T W``) and fuses each norm's scale into its readers,
- layer dropping (Gromov et al. 2024) removes whole decoder layers and renumbers the KV-cache index.

The supported families (Llama, Mistral, Qwen2, Qwen3) share one pre-norm layout::

    h = x + o_proj(attn(q_proj(n1(x)), k_proj(n1(x)), v_proj(n1(x))))      n1 = input_layernorm
    y = h + down_proj(act(gate_proj(n2(h))) * up_proj(n2(h)))             n2 = post_attention_layernorm

with weight-only RMSNorm, ``n(x) = w * x / sqrt(mean(x^2) + eps)``, and a final norm before
``lm_head``. Qwen3's per-head ``q_norm``/``k_norm`` act inside attention on the head dimension,
never on the residual stream, so they change none of the above. Like SliceGPT's
``ModelAdapter``/``LayerAdapter``, a :class:`ModelAdapter` hands out the modules themselves; the
table :data:`ARCHITECTURES` holds only dotted paths, so adding a family is one entry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from flipcheck.errors import FlipcheckError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the parts of one decoder family live (dotted paths from the model or from a layer)."""

    model_type: str
    # whole model (paths from the *ForCausalLM module)
    decoder: str = "model"  # the base model: embeddings -> layers -> final norm
    layers: str = "model.layers"  # nn.ModuleList of decoder layers
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # one decoder layer (paths from the layer)
    input_norm: str = "input_layernorm"  # norm read by the attention block
    attention: str = "self_attn"
    attention_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attention_value: str = "self_attn.v_proj"  # the input of o_proj (AWQ's v -> o pair)
    attention_output: str = "self_attn.o_proj"  # writes to the residual stream
    post_attention_norm: str = "post_attention_layernorm"  # norm read by the MLP block
    mlp: str = "mlp"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_up: str = "mlp.up_proj"  # the input of down_proj after the gating product (AWQ's up -> down)
    mlp_output: str = "mlp.down_proj"  # writes to the residual stream
    norm_type: str = "rmsnorm"  # weight-only RMSNorm: w * x / sqrt(mean(x^2) + eps), no bias, no centering
    # per-layer bookkeeping that must follow the layers when some are removed
    layer_index_attrs: tuple[str, ...] = ("self_attn.layer_idx",)  # KV-cache slot of the layer
    per_layer_config: tuple[str, ...] = ("layer_types",)  # config lists with one entry per layer

    def norm_mappings(self) -> list[tuple[list[str], str]]:
        """``[([reader regexes], norm regex), ...]``: which Linears read from which norm, in the
        ``re:`` name form llm-compressor's SmoothQuant/AWQ ``mappings`` take."""

        def rx(path: str) -> str:
            return "re:.*" + path.rsplit(".", 1)[-1] + "$"

        return [
            ([rx(p) for p in self.attention_inputs], rx(self.input_norm)),
            ([rx(p) for p in self.mlp_inputs], rx(self.post_attention_norm)),
        ]


_LLAMA = ArchitectureSpec(model_type="llama")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, model_type="mistral"),
    "qwen2": replace(_LLAMA, model_type="qwen2"),  # q/k/v carry biases: they live on the output side
    "qwen3": replace(_LLAMA, model_type="qwen3"),  # q_norm/k_norm are per head, inside attention
}


def supported_architectures() -> list[str]:
    return list(ARCHITECTURES)


def spec_for(model_type: str) -> ArchitectureSpec:
    if model_type not in ARCHITECTURES:
        raise FlipcheckError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def linear_widths(config: Mapping[str, Any]) -> list[tuple[str, int]] | None:
    """(qualified name, in_features) of every decoder Linear, read from a ``config.json`` alone.

    For the pre-norm layout above: the stream's readers (q/k/v, gate/up) take ``hidden_size``; the
    attention output takes ``num_attention_heads * head_dim`` (``head_dim`` from the config, else
    ``hidden_size / num_attention_heads``); the MLP output takes ``intermediate_size``. The output
    head is left out (no method compresses it). None for an architecture not in
    :data:`ARCHITECTURES` or a config missing one of these sizes: then nothing can be said before
    the model loads.
    """
    spec = ARCHITECTURES.get(str(config.get("model_type")))
    try:
        hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if spec is None:
        return None
    per_layer = [*((p, hidden) for p in spec.attention_inputs), (spec.attention_output, heads * head_dim),
                 *((p, hidden) for p in spec.mlp_inputs), (spec.mlp_output, inter)]
    return [(f"{spec.layers}.{i}.{p}", w) for i in range(layers) for p, w in per_layer]


def _get(root: torch.nn.Module, path: str, what: str, model_type: str) -> torch.nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise FlipcheckError(
            f"{model_type} model has no {what} at {path!r}: flipcheck expects a *ForCausalLM model "
            f"as transformers builds it ({type(root).__name__} given)"
        ) from err


def norm_eps(norm: torch.nn.Module) -> float:
    """The epsilon of an RMSNorm module (transformers names it ``variance_epsilon`` or ``eps``)."""
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise FlipcheckError(f"cannot find the epsilon of norm module {type(norm).__name__}")


class LayerAdapter:
    """The modules of one decoder layer, by role."""

    def __init__(self, layer: torch.nn.Module, spec: ArchitectureSpec, index: int, prefix: str):
        self.layer = layer
        self.spec = spec
        self.index = index  # position in the layer list
        self.prefix = prefix  # qualified name, e.g. "model.layers.3"

    def _get(self, path: str, what: str) -> torch.nn.Module:
        return _get(self.layer, path, what, self.spec.model_type)

    @property
    def input_norm(self) -> torch.nn.Module:
        return self._get(self.spec.input_norm, "input norm")

    @property
    def attention(self) -> torch.nn.Module:
        return self._get(self.spec.attention, "attention")

    @property
    def attention_inputs(self) -> list[torch.nn.Linear]:
        """q/k/v: the Linears reading from ``input_norm``."""
        return [self._get(p, "attention input") for p in self.spec.attention_inputs]

    @property
    def attention_output(self) -> torch.nn.Linear:
        """o_proj: writes the attention result into the residual stream."""
        return self._get(self.spec.attention_output, "attention output")

    @property
    def post_attention_norm(self) -> torch.nn.Module:
        return self._get(self.spec.post_attention_norm, "post-attention norm")

    @property
    def mlp(self) -> torch.nn.Module:
        return self._get(self.spec.mlp, "MLP")

    @property
    def mlp_inputs(self) -> list[torch.nn.Linear]:
        """gate/up: the Linears reading from ``post_attention_norm``."""
        return [self._get(p, "MLP input") for p in self.spec.mlp_inputs]

    @property
    def mlp_output(self) -> torch.nn.Linear:
        """down_proj: writes the MLP result into the residual stream."""
        return self._get(self.spec.mlp_output, "MLP output")

    def norm_groups(self) -> list[tuple[torch.nn.Module, list[torch.nn.Linear]]]:
        """(norm, the Linears that read from it): the pairs SmoothQuant/AWQ/SliceGPT fuse scales over."""
        return [(self.input_norm, self.attention_inputs), (self.post_attention_norm, self.mlp_inputs)]

    def qualified(self, path: str) -> str:
        return f"{self.prefix}.{path}"

    def set_index(self, index: int) -> None:
        """Renumber the layer (its KV-cache slot) after layers before it were removed."""
        for path in self.spec.layer_index_attrs:
            owner_path, _, attr = path.rpartition(".")
            owner = self._get(owner_path, "layer index owner") if owner_path else self.layer
            if hasattr(owner, attr):
                setattr(owner, attr, index)
        self.index = index


class ModelAdapter:
    """A causal LM seen through its :class:`ArchitectureSpec`."""

    def __init__(self, model: torch.nn.Module, spec: ArchitectureSpec):
        self.model = model
        self.spec = spec
        self.config = model.config
        for path, what in (
            (spec.layers, "decoder layer list"),
            (spec.embed_tokens, "token embedding"),
            (spec.final_norm, "final norm"),
            (spec.lm_head, "output head"),
        ):
            _get(model, path, what, spec.model_type)

    @property
    def model_type(self) -> str:
        return self.spec.model_type

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream as the config states it (SliceGPT children keep the parent's)."""
        return int(self.config.hidden_size)

    @property
    def decoder(self) -> torch.nn.Module:
        return _get(self.model, self.spec.decoder, "base model", self.model_type)

    @property
    def layer_list(self) -> torch.nn.ModuleList:
        return _get(self.model, self.spec.layers, "decoder layer list", self.model_type)

    @property
    def num_layers(self) -> int:
        return len(self.layer_list)

    @property
    def layers(self) -> list[LayerAdapter]:
        return [
            LayerAdapter(layer, self.spec, i, f"{self.spec.layers}.{i}")
            for i, layer in enumerate(self.layer_list)
        ]

    def __iter__(self) -> Iterator[LayerAdapter]:
        return iter(self.layers)

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return _get(self.model, self.spec.embed_tokens, "token embedding", self.model_type)

    @property
    def final_norm(self) -> torch.nn.Module:
        return _get(self.model, self.spec.final_norm, "final norm", self.model_type)

    @property
    def lm_head(self) -> torch.nn.Linear:
        return _get(self.model, self.spec.lm_head, "output head", self.model_type)

    @property
    def tied_embeddings(self) -> bool:
        """True when the output head shares its weight tensor with the token embedding."""
        head, emb = self.lm_head.weight, self.embed_tokens.weight
        return head is emb or (head.data_ptr() == emb.data_ptr() and head.shape == emb.shape)

    def set_module(self, path: str, module: torch.nn.Module) -> None:
        """Replace the module at dotted `path` (from the model)."""
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, name, module)

    def keep_layers(self, keep: list[int]) -> None:
        """Keep only the layers at indices `keep` (in order), and make the model consistent again.

        Rebuilds the ``nn.ModuleList``, renumbers each kept layer's KV-cache index, sets
        ``config.num_hidden_layers`` and trims the per-layer config lists (``layer_types``), so the
        model saves, reloads with plain transformers and generates with a cache.
        """
        n = self.num_layers
        if sorted(set(keep)) != list(keep) or any(i < 0 or i >= n for i in keep):
            raise ValueError(f"keep must be increasing layer indices in [0, {n}); got {keep}")
        old = self.layer_list
        self.set_module(self.spec.layers, torch.nn.ModuleList([old[i] for i in keep]))
        for new_index, layer in enumerate(self.layers):
            layer.set_index(new_index)
        self.config.num_hidden_layers = len(keep)
        for attr in self.spec.per_layer_config:
            values = getattr(self.config, attr, None)
            if isinstance(values, (list, tuple)) and len(values) == n:
                setattr(self.config, attr, [values[i] for i in keep])


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """The :class:`ModelAdapter` for `model`, chosen by ``model.config.model_type``.

    Raises :class:`FlipcheckError` naming the supported families for any other architecture.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise FlipcheckError(
            f"{type(model).__name__} has no config.model_type; supported: {', '.join(ARCHITECTURES)}"
        )
    return ModelAdapter(model, spec_for(model_type))
