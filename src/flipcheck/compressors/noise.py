"""Gaussian weight noise, the control experiment of Dutta et al. 2024 ("Accuracy is Not All You Need").

    W <- W + sigma * std(W) * eps,    eps ~ N(0, I)

per targeted Linear weight. ``eps`` is drawn from a generator seeded by (seed, module name), so the
same setting gives the same child whatever order or device the modules are visited in. Embeddings,
norms and the output head are left alone by default.
"""

from __future__ import annotations

import hashlib

import torch
from pydantic import Field

from flipcheck.compressors.registry import CompressionReport, MethodConfig, register
from flipcheck.compressors.stats import step_report, targeted_linears


class NoiseConfig(MethodConfig):
    """Gaussian noise on Linear weights, scaled by each weight's standard deviation."""

    sigma: float = Field(0.05, ge=0.0, le=10.0, description="noise std as a multiple of std(W); 0 = identity")
    seed: int = Field(0, ge=0, description="base seed; each module's noise is seeded by (seed, name)")
    include: list[str] | None = Field(None, description="fnmatch globs of module names to perturb (default: all decoder Linears)")
    exclude: list[str] | None = Field(None, description="fnmatch globs of module names to leave alone")


def module_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def add_noise(weight: torch.Tensor, sigma: float, seed: int) -> None:
    """In place: weight += sigma * std(weight) * N(0, 1), noise drawn in float32 on the CPU."""
    if sigma == 0.0:
        return
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(weight.shape, generator=gen, dtype=torch.float32)
    std = weight.float().std()
    weight.add_((sigma * std * eps).to(device=weight.device, dtype=weight.dtype))


def apply_noise(model: torch.nn.Module, config: NoiseConfig, calibration=None) -> CompressionReport:
    linears = targeted_linears(model, config.include, config.exclude)
    for name, mod in linears:
        add_noise(mod.weight.data, config.sigma, module_seed(config.seed, name))
    return step_report("noise", config, model, targeted=len(linears))  # figures read off the model


register("noise", NoiseConfig, apply_noise, needs_calibration=False, produces="dense")
