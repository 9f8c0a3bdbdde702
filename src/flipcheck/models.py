"""Load, fingerprint and save models and tokenizers.

A model is a Hugging Face hub id or a local folder. Children that flipcheck writes are normal
Hugging Face folders plus ``flipcheck.json`` (provenance: parent fingerprint, recipe, stats), so
``flipcheck eval`` finds the parent by itself and transformers/vLLM load the child as usual.
Methods whose children need flipcheck's help to load (SliceGPT's shortcut matrices) name a loader
in ``flipcheck.json`` and register it with :func:`register_loader`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flipcheck.errors import FlipcheckError

log = logging.getLogger(__name__)

PROVENANCE_FILE = "flipcheck.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Loader = Callable[[Path, dict, torch.device, torch.dtype], torch.nn.Module]
_LOADERS: dict[str, Loader] = {}


def register_loader(name: str, loader: Loader) -> None:
    """Register how to rebuild a child whose ``flipcheck.json`` says ``"loader": name``."""
    _LOADERS[name] = loader


def resolve_device(device: str | None = None) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (device_map="auto" across the GPUs of one host)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "auto" or device == "cpu" or re.fullmatch(r"cuda(:\d+)?|mps", device):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise FlipcheckError(f"--device {device}: no CUDA device is available here; use --device cpu")
        return device
    raise FlipcheckError(f"unknown device {device!r}; allowed: cpu, cuda, cuda:N, mps, auto")


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """float32 on CPU (exact comparisons, no bf16 kernels to rely on), bfloat16 on GPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device in ("cpu", "mps") else torch.bfloat16
    if dtype not in DTYPES:
        raise FlipcheckError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}, auto")
    return DTYPES[dtype]


def is_local(path: str | os.PathLike) -> bool:
    p = str(path)
    return os.path.exists(p) or p.startswith((".", "/", "~")) or os.sep in p and not _HUB_ID.match(p)


def check_source(path: str | os.PathLike) -> str:
    p = str(path)
    if os.path.isdir(p):
        if not os.path.exists(os.path.join(p, "config.json")):
            raise FlipcheckError(f"model folder {p!r} has no config.json: is it a Hugging Face model folder?")
        return p
    if os.path.exists(p):
        raise FlipcheckError(f"model path {p!r} is a file; pass the folder that holds config.json")
    if is_local(p) or not _HUB_ID.match(p):
        raise FlipcheckError(f"model path {p!r} does not exist (neither a local folder nor a hub id)")
    return p


def _hub_error(source: str, err: Exception) -> FlipcheckError:
    return FlipcheckError(
        f"could not load {source!r} from the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        "Without network, download the model elsewhere (huggingface-cli download) and pass the local folder."
    )


def load_tokenizer(source: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load a tokenizer; give it a pad token (the eos token) when it has none."""
    from transformers import AutoTokenizer

    src = check_source(source)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except OSError as err:
        if is_local(src):
            raise FlipcheckError(f"could not load a tokenizer from {src!r}: {err}") from err
        raise _hub_error(src, err) from err
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise FlipcheckError(f"tokenizer of {src!r} has neither a pad nor an eos token; add a pad token")
        log.info("tokenizer of %s has no pad token; using eos %r", src, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def read_provenance(path: str | os.PathLike) -> dict | None:
    f = Path(path) / PROVENANCE_FILE
    if not f.is_file():
        return None
    return json.loads(f.read_text())


def load_model(
    source: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a causal LM from a hub id or folder, in eval mode, from safetensors only."""
    from transformers import AutoModelForCausalLM

    src = check_source(source)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    prov = read_provenance(src) if os.path.isdir(src) else None
    if prov and prov.get("loader"):
        name = prov["loader"]
        if name not in _LOADERS:
            _import_loaders()
        if name not in _LOADERS:
            raise FlipcheckError(f"{src!r} needs flipcheck loader {name!r}, which this version does not have")
        model = _LOADERS[name](Path(src), prov, torch.device("cpu" if dev == "auto" else dev), dt)
        return model.eval()
    load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if prov is None or not prov.get("quantized_on_load"):
        load_kwargs["dtype"] = dt
    if dev == "auto":
        load_kwargs["device_map"] = "auto"
    load_kwargs.update(kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **load_kwargs)
    except OSError as err:
        if is_local(src):
            raise FlipcheckError(f"could not load a model from {src!r}: {err}") from err
        raise _hub_error(src, err) from err
    if dev != "auto" and "device_map" not in kwargs and "quantization_config" not in kwargs:
        model.to(dev)
    return model.eval()


def _import_loaders() -> None:
    """Importing the compressors registers their loaders."""
    import flipcheck.compressors  # noqa: F401


def fingerprint(model: torch.nn.Module) -> str:
    """Content hash of the weights: names, dtypes, shapes and bytes of every state-dict tensor.

    Stable across save/reload (same tensors), different when any weight changes. Independent of the
    device the model sits on.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(
    model: torch.nn.Module,
    tokenizer,
    out: str | os.PathLike,
    provenance: dict,
    *,
    save_fn: Callable[[torch.nn.Module, Path], None] | None = None,
) -> Path:
    """Save a child as a Hugging Face folder plus ``flipcheck.json``, atomically.

    The folder is written under a temporary name next to `out` and renamed into place, so an
    interrupted save never leaves a folder that looks complete. `save_fn` overrides how the model
    itself is written (default: ``model.save_pretrained(folder)``, which llm-compressor's wrapper
    turns into its compressed format).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        if save_fn is not None:
            save_fn(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        prov = dict(provenance)
        prov.setdefault("fingerprint", fingerprint(model))
        prov["bytes_on_disk"] = folder_weight_bytes(tmp)
        write_json_atomic(tmp / PROVENANCE_FILE, prov)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def folder_weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``) in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
