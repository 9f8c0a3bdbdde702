"""Load, fingerprint and save models and tokenizers.

A model is a Hugging Face hub id or a local folder. Children that flipcheck writes are normal
Hugging Face folders plus ``flipcheck.json`` (provenance: parent fingerprint, recipe, stats), so
``flipcheck eval`` finds the parent by itself and transformers/vLLM load the child as usual.
Methods whose children need flipcheck's help to load (SliceGPT's shortcut matrices) name a loader
in ``flipcheck.json`` and register it in :mod:`flipcheck.loaders` (this module does not import the
compressors).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flipcheck.errors import FlipcheckError
from flipcheck.files import cache_root, write_json_atomic, write_text_atomic
from flipcheck.loaders import get_loader, loader_names, register_loader  # noqa: F401  (register_loader: re-exported)

log = logging.getLogger(__name__)

PROVENANCE_FILE = "flipcheck.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")



def resolve_device(device: str | None = None) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (device_map="auto" across the GPUs of one host)."""
    if device is None:  # several GPUs: spread the model over all of them (device_map="auto")
        if not torch.cuda.is_available():
            return "cpu"
        return "auto" if torch.cuda.device_count() > 1 else "cuda"
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


# -- a model's identity, resolved once ---------------------------------------------------------

WEIGHT_SUFFIX = ".safetensors"
_HASH_CHUNK = 8 << 20
_TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class WeightFile:
    """One weight file as found on disk (size and mtime bind a stored fingerprint to it)."""

    name: str
    size: int
    mtime_ns: int


@dataclass
class ModelSource:
    """Where a model comes from, resolved once: a local folder, or a hub id at a pinned revision.

    ``spec`` is what the user wrote; ``ref`` is what provenance records (the hub id, or the folder's
    absolute path). ``folder`` is the local folder to load from: the folder itself, or the hub
    snapshot in the local Hugging Face cache (None while a hub model is not downloaded yet).
    The fingerprint is computed on first use: for a hub model from its revision and weight file
    list; for a folder, the sha256 of its weight files (hashed in chunks, never loaded), read from
    ``flipcheck.json`` while that is still bound to the files (same names and sizes; same mtimes, or
    else the same content).
    """

    spec: str
    folder: Path | None
    hub_id: str | None = None
    revision: str | None = None
    weights: tuple[WeightFile, ...] = ()
    provenance: dict | None = None
    gguf: str | None = None  # a GGUF model: the file's name inside `folder` (or the hub repository)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def ref(self) -> str:
        if self.gguf:  # ORG/REPO:file.gguf, or the file's absolute path
            return f"{self.hub_id}:{self.gguf}" if self.hub_id else str((self.folder / self.gguf).resolve())  # type: ignore[operator]
        return self.hub_id if self.hub_id else str(self.folder.resolve())  # type: ignore[union-attr]

    def gguf_path(self) -> Path:
        """The GGUF file (downloaded into the local Hugging Face cache for a hub GGUF not there yet)."""
        if self.gguf is None:
            raise FlipcheckError(f"{self.spec!r} is not a GGUF model")
        if self.folder is not None:
            return self.folder / self.gguf
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(self.hub_id, self.gguf, revision=self.revision, cache_dir=hub_cache_dir()))
        except Exception as err:  # network, auth, missing file: one line
            raise _hub_error(self.spec, err) from err
        self.folder = path.parent
        return path

    @property
    def loader(self) -> str | None:
        return (self.provenance or {}).get("loader")

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            if self.hub_id:
                self._fingerprint = _hub_fingerprint(self.hub_id, self.revision or "", self.weights)
            else:
                self._fingerprint = folder_fingerprint(self.folder, self.weights, self.provenance)  # type: ignore[arg-type]
        return self._fingerprint

    def config_hash(self) -> str:
        """Content of config.json and generation_config.json (max length, rope scaling, ...)."""
        if self.hub_id and self.folder is None:
            return f"{self.hub_id}@{self.revision}"
        if self.gguf:  # a GGUF holds its config in its own metadata, covered by the fingerprint
            return f"gguf:{self.gguf}"
        folder = self.local_folder(weights=False)
        h = hashlib.sha256()
        for name in ("config.json", "generation_config.json"):
            f = folder / name
            if f.is_file():
                h.update(name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()[:16]

    def local_folder(self, *, weights: bool = True) -> Path:
        """The folder to load from; a hub model missing from the local cache is downloaded."""
        if self.folder is not None:
            return self.folder
        from huggingface_hub import snapshot_download

        patterns = None if weights else _TOKENIZER_PATTERNS
        try:
            path = Path(
                snapshot_download(self.hub_id, revision=self.revision, cache_dir=hub_cache_dir(), allow_patterns=patterns)
            )
        except Exception as err:  # network, auth, missing repo: one line
            raise _hub_error(self.spec, err) from err
        if weights:
            self.folder = path
        return path


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def resolve_source(source: str | os.PathLike | ModelSource) -> ModelSource:
    """Resolve a hub id or folder once: folder, revision, weight files, provenance."""
    if isinstance(source, ModelSource):
        return source
    gguf = _gguf_spec(str(source))
    if gguf is not None:
        return _resolve_gguf(str(source), *gguf)
    spec = check_source(source)
    if os.path.isdir(spec):
        folder = Path(spec)
        return ModelSource(spec, folder, weights=weight_files(folder), provenance=read_provenance(folder))
    return _resolve_hub(spec)


GGUF_SUFFIX = ".gguf"


def _gguf_spec(spec: str) -> tuple[str | None, str] | None:
    """(folder or hub id, file name) for a GGUF source: ``path/model.gguf``, ``FOLDER:file.gguf``,
    ``ORG/REPO:file.gguf``, or a folder with no config.json holding exactly one ``.gguf`` file (what
    ``compress --method gguf`` writes). None for anything else."""
    if spec.lower().endswith(GGUF_SUFFIX):
        if ":" in spec and not os.path.exists(spec):
            where, name = spec.rsplit(":", 1)
            return where, name
        return None, spec
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")):
        found = sorted(Path(spec).glob(f"*{GGUF_SUFFIX}"))
        if len(found) == 1:
            return spec, found[0].name
        if len(found) > 1:
            raise FlipcheckError(
                f"{spec!r} holds {len(found)} GGUF files ({', '.join(f.name for f in found[:4])}); "
                f"name one as {spec}:FILE.gguf"
            )
    return None


def _resolve_gguf(spec: str, where: str | None, name: str) -> ModelSource:
    """A GGUF model source: a local file, a file in a folder, or a file of a hub repository."""
    if where is None or os.path.isdir(os.path.expanduser(where)) or is_local(where):
        path = Path(os.path.expanduser(name if where is None else os.path.join(where, name)))
        if not path.is_file():
            raise FlipcheckError(f"GGUF file {str(path)!r} does not exist")
        st = path.stat()
        folder = path.parent
        prov = read_provenance(folder)
        if prov is not None and prov.get("gguf") != path.name:
            prov = None  # flipcheck.json describes another file of the folder
        return ModelSource(spec, folder, weights=(WeightFile(path.name, st.st_size, st.st_mtime_ns),),
                           provenance=prov, gguf=path.name)
    if not _HUB_ID.match(where):
        raise FlipcheckError(f"model {spec!r}: {where!r} is neither a folder nor a hub id (ORG/REPO:file.gguf)")
    return _resolve_hub_gguf(spec, where, name)


def _resolve_hub_gguf(spec: str, repo: str, name: str) -> ModelSource:
    """``ORG/REPO:file.gguf``: the hub's revision and the file's size (offline: the local cache)."""
    if not hub_offline():
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(repo, files_metadata=True)
            sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
            if name not in sizes:
                ggufs = sorted(f for f in sizes if f.endswith(GGUF_SUFFIX))
                raise FlipcheckError(f"{repo} has no file {name!r}; its GGUF files: {', '.join(ggufs[:8]) or 'none'}")
            snap = _hub_repo_dir(repo) / "snapshots" / str(info.sha)
            folder = snap if (snap / name).is_file() else None
            return ModelSource(spec, folder, hub_id=repo, revision=info.sha, weights=(WeightFile(name, sizes[name], 0),),
                               gguf=name)
        except FlipcheckError:
            raise
        except Exception as err:  # no network: the local cache, as transformers does
            log.info("hub lookup of %s failed (%s); trying the local Hugging Face cache", repo, type(err).__name__)
    ref = _hub_repo_dir(repo) / "refs" / "main"
    if not ref.is_file():
        raise FlipcheckError(
            f"could not reach the Hugging Face hub for {repo!r} and it is not in the local cache ({hub_cache_dir()}); "
            f"download {name} where there is network (huggingface-cli download {repo} {name}) or pass the local file"
        )
    revision = ref.read_text().strip()
    folder = _hub_repo_dir(repo) / "snapshots" / revision
    if not (folder / name).is_file():
        raise FlipcheckError(f"{repo}@{revision[:12]} in the local Hugging Face cache has no file {name!r}")
    return ModelSource(spec, folder, hub_id=repo, revision=revision,
                       weights=(WeightFile(name, (folder / name).stat().st_size, 0),), gguf=name)


def weight_files(folder: Path, suffix: str = WEIGHT_SUFFIX) -> tuple[WeightFile, ...]:
    """The folder's ``*.safetensors`` files, each checked to be complete (header vs size); with
    ``suffix=".gguf"`` its GGUF files."""
    files = []
    for f in sorted(folder.glob(f"*{suffix}")):
        st = f.stat()
        if suffix == WEIGHT_SUFFIX:
            check_safetensors(f, st.st_size)
        files.append(WeightFile(f.name, st.st_size, st.st_mtime_ns))
    if not files:
        raise FlipcheckError(f"model folder {str(folder)!r} has no *.safetensors weight files (flipcheck loads safetensors only)")
    return tuple(files)


def check_safetensors(path: Path, size: int) -> None:
    """A safetensors file's header must parse and describe exactly the bytes the file holds."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if n < 2 or n > size - 8:
                raise FlipcheckError(f"{path}: not a complete safetensors file ({size} bytes, no valid header); re-save or re-download it")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        if isinstance(err, FlipcheckError):
            raise
        raise FlipcheckError(f"{path}: unreadable safetensors header ({type(err).__name__}); re-save or re-download it") from err
    if 8 + n + end != size:
        raise FlipcheckError(
            f"{path}: truncated or damaged safetensors file: its header describes {8 + n + end} bytes, "
            f"the file has {size}; re-save or re-download it"
        )


def _resolve_hub(spec: str) -> ModelSource:
    """Online: the hub's current revision and file list. Offline: the local cache's refs/main."""
    if not hub_offline():
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(spec, files_metadata=True)
            files = tuple(
                WeightFile(s.rfilename, int(s.size or 0), 0) for s in info.siblings or [] if s.rfilename.endswith(WEIGHT_SUFFIX) and "/" not in s.rfilename
            )
            snap = _hub_repo_dir(spec) / "snapshots" / str(info.sha)
            folder = snap if _complete_snapshot(snap, files) else None
            return ModelSource(spec, folder, hub_id=spec, revision=info.sha, weights=files, provenance=_maybe_prov(folder))
        except Exception as err:  # no network or no such repo: fall back to the local cache, as transformers does
            log.info("hub lookup of %s failed (%s); trying the local Hugging Face cache", spec, type(err).__name__)
    return _resolve_hub_cached(spec)


def _hub_repo_dir(repo_id: str) -> Path:
    return hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"


def _complete_snapshot(folder: Path, files: tuple[WeightFile, ...]) -> bool:
    return (folder / "config.json").is_file() and all((folder / f.name).is_file() for f in files)


def _maybe_prov(folder: Path | None) -> dict | None:
    return read_provenance(folder) if folder is not None else None


def _resolve_hub_cached(spec: str) -> ModelSource:
    repo = _hub_repo_dir(spec)
    ref = repo / "refs" / "main"
    if not ref.is_file():
        raise FlipcheckError(
            f"could not reach the Hugging Face hub for {spec!r} and it is not in the local cache ({hub_cache_dir()}); "
            "download it where there is network (huggingface-cli download) or pass a local folder"
        )
    revision = ref.read_text().strip()
    folder = repo / "snapshots" / revision
    if not (folder / "config.json").is_file():
        raise FlipcheckError(f"{spec!r} is only partly in the local Hugging Face cache ({folder} has no config.json)")
    files = weight_files(folder)
    return ModelSource(spec, folder, hub_id=spec, revision=revision, weights=files, provenance=read_provenance(folder))


def _hub_fingerprint(repo_id: str, revision: str, files: tuple[WeightFile, ...]) -> str:
    listing = "|".join(f"{f.name}:{f.size}" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(f"hub|{repo_id}|{revision}|{listing}".encode()).hexdigest()[:32]


def _memo_dir() -> Path:
    return cache_root() / "fingerprints"


def file_sha256(path: Path, wf: WeightFile) -> str:
    """sha256 of a file's bytes, read in chunks; memoised by (path, name, size, mtime_ns)."""
    key = hashlib.sha256(f"{path.resolve()}|{wf.name}|{wf.size}|{wf.mtime_ns}".encode()).hexdigest()[:32]
    memo = _memo_dir() / "files" / f"{key}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    except OSError as err:
        raise FlipcheckError(f"cannot read weight file {path}: {err.strerror or err}") from err
    digest = h.hexdigest()
    write_text_atomic(memo, digest)
    return digest


def weight_binding(folder: Path, suffix: str = WEIGHT_SUFFIX) -> dict[str, dict[str, Any]]:
    """What ``flipcheck.json`` stores next to the fingerprint: each weight file's size, mtime, sha256."""
    return {
        wf.name: {"size": wf.size, "mtime_ns": wf.mtime_ns, "sha256": file_sha256(folder / wf.name, wf)}
        for wf in weight_files(folder, suffix)
    }


def _bound_fingerprint(folder: Path, files: tuple[WeightFile, ...], prov: dict | None) -> str | None:
    """flipcheck.json's fingerprint if its weight binding still matches the files, else None."""
    bound = (prov or {}).get("weights")
    if not prov or not prov.get("fingerprint") or not isinstance(bound, dict):
        return None
    if sorted(bound) != [f.name for f in files]:
        return None
    for wf in files:
        b = bound[wf.name]
        if b.get("size") != wf.size:
            return None
        if b.get("mtime_ns") != wf.mtime_ns and b.get("sha256") != file_sha256(folder / wf.name, wf):
            return None
    return str(prov["fingerprint"])


def folder_fingerprint(folder: Path, files: tuple[WeightFile, ...], prov: dict | None) -> str:
    """A folder's fingerprint: flipcheck.json's while bound to the files, else the files' content."""
    fp = _bound_fingerprint(folder, files, prov)
    if fp is not None:
        return fp
    if prov and prov.get("fingerprint"):
        log.info("%s: weight files differ from those flipcheck.json was written for; fingerprinting them", folder)
    return _files_fingerprint({wf.name: {"size": wf.size, "sha256": file_sha256(folder / wf.name, wf)} for wf in files})


def _files_fingerprint(binding: dict[str, dict[str, Any]]) -> str:
    listing = "|".join(f"{name}:{b['size']}:{b['sha256']}" for name, b in sorted(binding.items()))
    return hashlib.sha256(f"files|{listing}".encode()).hexdigest()[:32]


def load_tokenizer(source: str | os.PathLike | ModelSource, *, trust_remote_code: bool = False):
    """Load a tokenizer; give it a pad token (the eos token) when it has none."""
    from transformers import AutoTokenizer

    ms = resolve_source(source)
    src = ms.spec
    kw: dict[str, Any] = {}
    if ms.gguf:  # the tokenizer files beside the GGUF (compress writes the parent's), else the GGUF's own
        folder = ms.gguf_path().parent
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            kw["gguf_file"] = ms.gguf
    else:
        folder = ms.local_folder(weights=False)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kw)
    except OSError as err:
        raise FlipcheckError(f"could not load a tokenizer from {src!r}: {str(err).splitlines()[0][:300]}") from err
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


def suggest_batch_size(model, seq_len: int, *, device: str | None = None, dtype: str | torch.dtype | None = None,
                       fraction: float = 0.5, cap: int = 256) -> int:
    """Sequences of `seq_len` tokens per forward that fit in `fraction` of the free GPU memory.

    `model`: a loaded model, or a model source (its config.json is read, no weights). Per sequence,
    a forward without gradients holds the float32 log-probabilities over the vocabulary (twice:
    logits and log-softmax, 8 bytes per token and vocabulary entry) and one layer's activations at a
    time (about 10 hidden + 3 intermediate values per token in the model's dtype). On CPU (or
    without CUDA) the answer is `cap` bounded by 16, flipcheck's default.
    """
    dev = resolve_device(device)
    if dev == "cpu" or dev == "mps" or not torch.cuda.is_available():
        return min(cap, 16)
    if isinstance(model, torch.nn.Module):
        cfg = model.config
        width = next(model.parameters()).element_size()
    else:
        from transformers import AutoConfig

        ms = resolve_source(model)
        if ms.gguf:  # llama.cpp manages its own batches; this is the transformers path's figure
            return min(cap, 16)
        cfg = AutoConfig.from_pretrained(str(ms.local_folder(weights=False)))
        width = torch.tensor([], dtype=resolve_dtype(dtype, dev)).element_size()
    per_token = 8 * cfg.vocab_size + width * (10 * cfg.hidden_size + 3 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size))
    free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())) if dev == "auto" else \
        torch.cuda.mem_get_info(torch.device(dev))[0]
    return max(1, min(cap, int(fraction * free // (per_token * max(1, seq_len)))))


def load_model(
    source: str | os.PathLike | ModelSource,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a causal LM from a hub id or folder, in eval mode, from safetensors only."""
    ms = resolve_source(source)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        return _load_model(ms, dev, dt, trust_remote_code, kwargs)
    except Exception as err:
        if type(err).__name__ == "SafetensorError":  # a damaged file the header check did not catch
            raise FlipcheckError(f"could not read the weights of {ms.spec!r}: {str(err).splitlines()[0][:300]}") from err
        raise


def _load_model(ms: ModelSource, dev: str, dt: torch.dtype, trust_remote_code: bool, kwargs: dict) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if ms.gguf:  # transformers dequantizes the GGUF to float (the llama.cpp engine runs it as it is)
        path = ms.gguf_path()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dt,
                                                         trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise FlipcheckError(f"transformers could not load the GGUF {ms.spec!r}: {str(err).splitlines()[0][:300]}") from err
        return model.to("cpu" if dev == "auto" else dev).eval()
    src = str(ms.local_folder())
    prov = ms.provenance
    if prov and prov.get("loader"):
        name = prov["loader"]
        loader = get_loader(name)
        if loader is None:
            raise FlipcheckError(
                f"{ms.spec!r} needs flipcheck loader {name!r}, which this version does not have; "
                f"loaders: {', '.join(loader_names())}"
            )
        model = loader(Path(src), prov, "auto" if dev == "auto" else torch.device(dev), dt)  # "auto": device_map
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
        raise FlipcheckError(f"could not load a model from {ms.spec!r}: {str(err).splitlines()[0][:300]}") from err
    if dev != "auto" and "device_map" not in kwargs and "quantization_config" not in kwargs:
        model.to(dev)
    return model.eval()


def fingerprint(model: torch.nn.Module) -> str:
    """Content hash of in-memory weights: names, dtypes, shapes and bytes of every state-dict tensor.

    For models without files (a saved model's identity is :attr:`ModelSource.fingerprint`, made
    from its files).

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
        suffix = GGUF_SUFFIX if prov.get("gguf") else WEIGHT_SUFFIX  # a GGUF child: the .gguf is its weights
        prov["weights"] = weight_binding(tmp, suffix)  # binds the fingerprint to these files (renaming keeps mtimes)
        prov["fingerprint"] = _files_fingerprint(prov["weights"])
        prov["bytes_on_disk"] = sum(b["size"] for b in prov["weights"].values())
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


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text by default (Llama 2 does, SmolLM2 not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
