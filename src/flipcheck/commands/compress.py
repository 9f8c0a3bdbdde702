"""Commands that make children and list what can make them: compress, list."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flipcheck.commands.common import Device, Dtype, TrustRemote, Verbose, console, run_guarded, setup_logging
from flipcheck.errors import FlipcheckError
from flipcheck.evaluation.tasks import known_tasks


def compress_cmd(
    parent: Annotated[str, typer.Argument(help="parent model: hub id or folder")],
    method: Annotated[list[str], typer.Option("--method", "-m", help="method name; repeat for a chain (applied in order)")],
    out: Annotated[Path, typer.Option(help="folder for the child (Hugging Face format + flipcheck.json)")],
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="key=value setting; prefix with METHOD. in a chain")] = None,
    calibration: Annotated[str | None, typer.Option(help="a .txt/.jsonl file or folder, hf:NAME[:CONFIG[:SPLIT]], or 'demo' (default: the parent's own, else wikitext-2 train)")] = None,
    calibration_samples: Annotated[int, typer.Option(help="calibration sequences")] = 32,
    calibration_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 256,
    seed: int = 0,
    device: Device = None,
    dtype: Dtype = None,
    trust_remote_code: TrustRemote = False,
    verbose: Verbose = False,
) -> None:
    """Compress PARENT with one method (or a chain) and save the child."""
    setup_logging(verbose)
    from flipcheck.compressors.calibration import CalibrationConfig
    from flipcheck.compressors.pipeline import compress
    from flipcheck.compressors.registry import parse_set_options

    def go():
        steps = steps_from_options(method, parse_set_options(set_))
        cal = CalibrationConfig(source=calibration, samples=calibration_samples, seq_len=calibration_len, seed=seed)
        res = compress(parent, steps, out=out, calibration=cal, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        from flipcheck.terminal import compression_table

        console.print(compression_table(res.reports))
        console.print(f"child saved to {res.out}")

    run_guarded(go)


def steps_from_options(methods: list[str], settings: dict[str, str]) -> list[tuple[str, dict]]:
    """--set key=value applies to the single method; in a chain, keys are METHOD.key."""
    from flipcheck.compressors.registry import get_method

    for m in methods:
        get_method(m)
    if len(methods) == 1:
        return [(methods[0], {k.split(".", 1)[1] if k.startswith(methods[0] + ".") else k: v for k, v in settings.items()})]
    per: dict[str, dict] = {m: {} for m in methods}
    for k, v in settings.items():
        if "." not in k or k.split(".", 1)[0] not in per:
            raise FlipcheckError(f"--set {k}={v}: with several methods, prefix the key with one of {', '.join(methods)} (e.g. {methods[0]}.KEY)")
        m, key = k.split(".", 1)
        per[m][key] = v
    return [(m, per[m]) for m in methods]


def list_cmd(
    tasks: Annotated[bool, typer.Option("--tasks", help="also list every task lm-eval knows (long)")] = False,
    include_path: Annotated[list[str] | None, typer.Option("--include-path")] = None,
) -> None:
    """Methods with their settings and defaults, bundled recipes, and (with --tasks) lm-eval tasks."""
    from flipcheck.terminal import methods_table, recipes_table

    def go():
        console.print(methods_table())
        t = recipes_table()
        if t is not None:
            console.print(t)
        if tasks:
            names = known_tasks(include_path)
            console.print(f"[bold]{len(names)} lm-eval tasks, groups and tags[/]")
            console.print(", ".join(names), highlight=False)

    run_guarded(go)
