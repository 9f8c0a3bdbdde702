"""SliceGPT: rotation-only identity, PCA beats random directions, exact norm, stats, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from flipcheck.compressors.calibration import Calibration
from flipcheck.compressors.registry import get_method, make_config
from flipcheck.compressors.slicegpt import SliceGPTConfig, apply_slicegpt, kept_dim
from flipcheck.compressors.slicegpt_model import SlicedRMSNorm
from flipcheck.compressors.slicegpt_pca import (
    pca_rotations,
    principal_basis,
    random_orthogonal,
    random_rotations,
)
from flipcheck.errors import FlipcheckError
from flipcheck.models import PROVENANCE_FILE, load_model, save_model
from flipcheck.tiny import build_llama

ANIMALS = ["cat", "dog", "horse", "mouse", "bird", "fish", "cow", "sheep", "goat", "lion"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]


def token_rows(tokenizer, n: int, length: int, offset: int = 0) -> torch.Tensor:
    sentences = [f"The {a} saw a {c} ball and ran after it slowly." for a in ANIMALS for c in COLORS]
    sentences += [
        f"Question: What color is the {a}?\nAnswer: The {a} is {c}." for a in ANIMALS for c in COLORS
    ]
    ids = tokenizer(" ".join(sentences[offset:] + sentences[:offset]))["input_ids"]
    assert len(ids) >= n * length
    return torch.tensor(ids[: n * length]).reshape(n, length)


def build(tokenizer, *, model_type="llama", tie=False, layers=2, seed=0):
    """A tiny model whose norm scales are not 1, so fusing them matters."""
    model = build_llama(
        len(tokenizer), num_hidden_layers=layers, model_type=model_type, tie_word_embeddings=tie, seed=seed
    )
    gen = torch.Generator().manual_seed(seed + 100)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 0.5 + torch.rand(p.shape, generator=gen)
    return model


@pytest.fixture(scope="module")
def calib(tiny_tokenizer):
    return Calibration(tokenizer=tiny_tokenizer, input_ids=token_rows(tiny_tokenizer, 8, 32))


@pytest.fixture(scope="module")
def heldout(tiny_tokenizer):
    return token_rows(tiny_tokenizer, 4, 24, offset=61)


@pytest.fixture(scope="module")
def parent(tiny_tokenizer):
    return build(tiny_tokenizer)


@pytest.fixture(scope="module")
def rotations(parent, calib):
    return pca_rotations(parent, calib.input_ids)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def kl(parent_logits, child_logits) -> float:
    lp, lq = torch.log_softmax(parent_logits.double(), -1), torch.log_softmax(child_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_kept_dim():
    assert kept_dim(128, 0.1) == 112  # floor(115.2) = 115 -> 112
    assert kept_dim(4096, 0.25) == 3072
    assert kept_dim(4096, 0.3) == 2864  # 2867.2 -> 2867 -> 2864
    assert kept_dim(120, 0.1) == 104  # 108 -> 104 (no float fuzz below 108)
    assert kept_dim(100, 0.0) == 100  # rotation only keeps everything, multiple of 8 or not
    assert kept_dim(128, 0.99) == 8
    assert kept_dim(128, 0.1, round_to=1) == 115


def test_principal_basis_orders_by_decreasing_eigenvalue():
    cov = torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64))
    vals, vecs = principal_basis(cov)
    assert vals.tolist() == [3.0, 2.0, 1.0]
    torch.testing.assert_close(vecs.abs(), torch.eye(3, dtype=torch.float64)[:, [1, 2, 0]])


def test_sliced_norm_is_the_parent_norm_of_the_reconstructed_stream():
    """N_D(z_k Q_k^T) Q_k == SlicedRMSNorm(z_k): the sliced norm divides by the parent's width D."""
    d, k, eps = 16, 10, 1e-5
    q = random_orthogonal(d, torch.Generator().manual_seed(0))
    z = torch.randn(5, d, dtype=torch.float64) * 3
    zk = (z @ q)[:, :k]
    recon = zk @ q[:, :k].T
    parent_norm = recon / torch.sqrt(recon.pow(2).mean(-1, keepdim=True) + eps)
    expected = parent_norm @ q[:, :k]
    got = SlicedRMSNorm(k, d, eps)(zk.float()).double()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    stock = zk / torch.sqrt(zk.pow(2).mean(-1, keepdim=True) + eps)  # a width-k RMSNorm is off by sqrt(D/k)
    assert (stock - expected).abs().max() > 0.1


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_rotation_only_reproduces_the_parent(tiny_tokenizer, calib, heldout, model_type):
    parent = build(tiny_tokenizer, model_type=model_type, seed=1)
    child = copy.deepcopy(parent)
    report = apply_slicegpt(child, SliceGPTConfig(slicing=0.0), calib)
    diff = (logits(child, heldout) - logits(parent, heldout)).abs().max().item()
    assert diff < 1e-4
    # the norms are fused (no scale left) and every stream was rotated (weights differ from the parent's)
    layer = child.model.layers[0]
    assert isinstance(layer.input_layernorm, SlicedRMSNorm) and not list(layer.input_layernorm.parameters())
    assert not torch.allclose(layer.self_attn.q_proj.weight, parent.model.layers[0].self_attn.q_proj.weight)
    assert report.extra["kept_dim"] == 128 and report.extra["variance_kept"] == pytest.approx(1.0)
    assert report.calibration["tokens"] == calib.input_ids.numel()


def test_tied_embeddings_are_untied(tiny_tokenizer, calib, heldout, tmp_path):
    parent = build(tiny_tokenizer, tie=True, seed=2)
    assert parent.lm_head.weight is parent.model.embed_tokens.weight
    child = copy.deepcopy(parent)
    apply_slicegpt(child, SliceGPTConfig(slicing=0.0), calib)
    assert (logits(child, heldout) - logits(parent, heldout)).abs().max().item() < 1e-4
    assert child.lm_head.weight.data_ptr() != child.model.embed_tokens.weight.data_ptr()
    assert child.config.tie_word_embeddings is False
    sliced = copy.deepcopy(parent)
    apply_slicegpt(sliced, SliceGPTConfig(slicing=0.25), calib)
    out = save_model(sliced, tiny_tokenizer, tmp_path / "tied", {"loader": "slicegpt"})
    assert torch.equal(logits(load_model(out, device="cpu"), heldout), logits(sliced, heldout))


def test_pca_slicing_beats_random_directions(parent, rotations, heldout):
    """10% slicing along the smallest principal directions hurts less than along random ones."""
    ref = logits(parent, heldout)
    errors = {}
    for name, rot in (("pca", rotations), ("random", random_rotations(parent, seed=3))):
        child = copy.deepcopy(parent)
        report = apply_slicegpt(child, SliceGPTConfig(slicing=0.1), None, rotations=rot)
        assert report.extra["kept_dim"] == 112 and report.extra["rotations"] == name
        errors[name] = kl(ref, logits(child, heldout))
    assert 0 < errors["pca"] < 0.5 * errors["random"], errors
    # rotating without slicing is exact whatever the basis: the gap comes from the ordering
    child = copy.deepcopy(parent)
    apply_slicegpt(child, SliceGPTConfig(slicing=0.0), None, rotations=random_rotations(parent, seed=3))
    assert (logits(child, heldout) - ref).abs().max().item() < 1e-4


def test_precomputed_rotations_equal_computing_them(parent, calib, rotations, heldout):
    a, b = copy.deepcopy(parent), copy.deepcopy(parent)
    apply_slicegpt(a, SliceGPTConfig(slicing=0.25, pca="parent"), calib)
    apply_slicegpt(b, SliceGPTConfig(slicing=0.25), None, rotations=rotations)
    assert torch.equal(logits(a, heldout), logits(b, heldout))


@pytest.mark.parametrize("slice_head", [False, True])
def test_parameter_count_matches_the_tensors(parent, rotations, slice_head):
    child = copy.deepcopy(parent)
    report = apply_slicegpt(
        child, SliceGPTConfig(slicing=0.25, slice_head=slice_head), None, rotations=rotations
    )
    cfg = parent.config
    v, d, inter, layers, k = cfg.vocab_size, 128, cfg.intermediate_size, cfg.num_hidden_layers, 96
    head_in = k if slice_head else d
    per_layer = (
        3 * 128 * k  # q, k, v read k columns (4 heads x 32 = 128 outputs each)
        + k * 128  # o_proj writes k rows
        + 2 * inter * k  # gate, up
        + k * inter  # down_proj (the last one writes head_in rows)
        + k * k  # attention shortcut
        + k * k  # MLP shortcut (the last one is k x head_in)
    )
    expected = v * k + layers * per_layer + (head_in - k) * (inter + k) + v * head_in
    assert report.parameters == sum(p.numel() for p in child.parameters()) == expected
    assert report.extra["parameters_before"] == sum(p.numel() for p in parent.parameters())
    assert report.extra["dims"] == [k] * 4 + [head_in]
    assert child.lm_head.in_features == head_in and child.model.embed_tokens.embedding_dim == k
    assert report.bits_per_weight == 32.0 and report.sparsity == 0.0


def test_save_and_load_through_flipcheck(parent, rotations, heldout, tmp_path, tiny_tokenizer):
    child = copy.deepcopy(parent)
    report = apply_slicegpt(child, SliceGPTConfig(slicing=0.25), None, rotations=rotations)
    assert report.extra["provenance"]["loader"] == "slicegpt"
    out = save_model(
        child, tiny_tokenizer, tmp_path / "child", {"method": "slicegpt", **report.extra["provenance"]}
    )
    assert json.loads((out / PROVENANCE_FILE).read_text())["loader"] == "slicegpt"
    assert json.loads((out / "config.json").read_text())["slicegpt"]["dims"] == report.extra["dims"]
    loaded = load_model(out, device="cpu")
    assert type(loaded.model.layers[0]).__name__ == "SlicedLlamaDecoderLayer"
    assert torch.equal(logits(loaded, heldout), logits(child, heldout))
    assert not any(p.is_meta for p in loaded.parameters())
    # generation through the KV cache works on the sliced structure
    with torch.no_grad():
        past = loaded(heldout[:, :-1], use_cache=True).past_key_values
        step = loaded(heldout[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, logits(loaded, heldout)[:, -1], atol=1e-5, rtol=1e-5)
    generated = loaded.generate(heldout[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == heldout.shape[1] + 4
    auto = load_model(out, device="auto", dtype="float32")  # device_map="auto": here, no GPU, all on the CPU
    assert torch.equal(logits(auto, heldout), logits(child, heldout))
    bf16 = load_model(out, device="cpu", dtype="bfloat16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32


def test_bad_settings_and_inputs_fail_early(parent, rotations, calib):
    assert get_method("slicegpt").needs_calibration
    for bad in (1.0, -0.1, "1.5"):
        with pytest.raises(FlipcheckError, match="slicing"):
            make_config("slicegpt", {"slicing": bad})
    with pytest.raises(FlipcheckError, match="unknown setting 'sparsity'"):
        make_config("slicegpt", {"sparsity": 0.2})
    assert make_config("slicegpt", {"slicing": "0.2"}).slicing == 0.2
    child = copy.deepcopy(parent)
    with pytest.raises(FlipcheckError, match="needs calibration data"):
        apply_slicegpt(child, SliceGPTConfig(slicing=0.2), Calibration(tokenizer=None))
    other = build_llama(64, hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    with pytest.raises(FlipcheckError, match="precomputed rotations are for 2 layers of width 128"):
        apply_slicegpt(other, SliceGPTConfig(slicing=0.2), None, rotations=rotations)
    assert child.model.embed_tokens.embedding_dim == 128  # nothing was touched
    apply_slicegpt(child, SliceGPTConfig(slicing=0.2), None, rotations=rotations)
    with pytest.raises(FlipcheckError, match="already sliced"):
        apply_slicegpt(child, SliceGPTConfig(slicing=0.2), calib)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(FlipcheckError, match="unsupported architecture 'gpt2'"):
        apply_slicegpt(gpt2, SliceGPTConfig(slicing=0.2), calib)


def stream_covariances(model, ids) -> list[torch.Tensor]:
    """``sum x^T x`` (float64) of every residual stream of a sliced model: the inputs of its norms."""
    norms = [m for m in model.modules() if isinstance(m, SlicedRMSNorm)]
    covs: dict[int, torch.Tensor] = {}
    hooks = [
        n.register_forward_pre_hook(lambda mod, args, i=i: covs.__setitem__(i, _gram(args[0])))
        for i, n in enumerate(norms)
    ]
    try:
        logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return [covs[i] for i in range(len(norms))]


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x


def off_diagonal(c: torch.Tensor) -> float:
    """Largest off-diagonal entry relative to the largest diagonal one."""
    return float((c - torch.diag(torch.diagonal(c))).abs().max() / torch.diagonal(c).max())


def test_sequential_pca_is_the_pca_of_the_sliced_model(calib, heldout, tiny_tokenizer):
    """The reference procedure: every stream of the sliced child is decorrelated on the calibration
    data (its basis is the PCA of that very stream), which the parent's bases do not give."""
    parent = build(tiny_tokenizer, layers=3, seed=4)
    children = {}
    for mode in ("sequential", "parent"):
        child = copy.deepcopy(parent)
        report = apply_slicegpt(child, SliceGPTConfig(slicing=0.25, pca=mode), calib)
        assert report.extra["pca"] == mode
        children[mode] = child
        covs = stream_covariances(child, calib.input_ids)[:-1]  # the head's stream is not rotated
        worst = max(off_diagonal(c) for c in covs)
        if mode == "sequential":
            assert worst < 1e-6, worst  # float32 rounding (measured ~1e-7)
        else:
            assert worst > 1e-5, worst  # measured 1.2e-4 on the later streams
    ref = logits(parent, heldout)
    errors = {m: kl(ref, logits(c, heldout)) for m, c in children.items()}
    assert errors["sequential"] != errors["parent"]
    # on a random tiny model the two are close; sequential is not worse by more than a few percent
    assert errors["sequential"] < 1.05 * errors["parent"], errors


def test_one_covariance_alive_at_a_time(calib, tiny_tokenizer, monkeypatch):
    """Sequential: at most one D x D covariance and a few bases exist at once, whatever the depth."""
    import weakref

    from flipcheck.compressors import slicegpt_pca

    covs, bases, peaks = [], [], {"cov": 0, "bases": 0}
    real_cov, real_basis = slicegpt_pca._covariance, slicegpt_pca.principal_basis

    def alive(refs):  # tensors are freed by reference counting
        return sum(r() is not None for r in refs)

    def cov(streams):
        c = real_cov(streams)
        covs.append(weakref.ref(c))
        peaks["cov"] = max(peaks["cov"], alive(covs))
        return c

    def basis(c):
        vals, vecs = real_basis(c)
        bases.append(weakref.ref(vecs))
        peaks["bases"] = max(peaks["bases"], alive(bases))
        return vals, vecs

    monkeypatch.setattr(slicegpt_pca, "_covariance", cov)
    monkeypatch.setattr(slicegpt_pca, "principal_basis", basis)
    apply_slicegpt(build(tiny_tokenizer, layers=4, seed=5), SliceGPTConfig(slicing=0.25), calib)
    assert len(covs) == 8  # 2 per layer, the head's stream needs none
    assert peaks["cov"] == 1 and peaks["bases"] <= 3, peaks
