"""The judge command: free-form answers graded by an LLM judge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flipcheck.commands.common import (
    Device,
    Dtype,
    TrustRemote,
    Verbose,
    console,
    run_guarded,
    setup_logging,
    verdict,
)
from flipcheck.errors import FlipcheckError
from flipcheck.runlog import third_party_output


def judge_cmd(
    parent: Annotated[str, typer.Argument(help="parent model: hub id or folder (a chat model)")],
    children: Annotated[list[str], typer.Argument(help="one or more child models (hub ids or folders)")],
    judge_url: Annotated[str, typer.Option("--judge-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")],
    judge_model: Annotated[str, typer.Option("--judge-model", help="the judge model the endpoint serves")],
    prompts: Annotated[str, typer.Option(help="JSONL file (flipcheck's or MT-Bench's question.jsonl), hf:NAME[:CONFIG[:SPLIT]], or demo")] = "demo",
    judge_api_key_env: Annotated[str, typer.Option("--judge-api-key-env", help="environment variable holding the API key (a local server needs none)")] = "OPENAI_API_KEY",
    mode: Annotated[str, typer.Option(help="single (1-10 per answer), pairwise (parent vs child, both orders) or both")] = "both",
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer turn of parent and children (greedy)")] = 256,
    judge_max_tokens: Annotated[int, typer.Option("--judge-max-tokens", help="tokens per judge reply")] = 512,
    concurrency: Annotated[int, typer.Option(help="judge requests in flight at once")] = 4,
    limit: Annotated[int | None, typer.Option(help="judge only the first N prompts")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for report.json, report.md, report.html, judge.jsonl")] = None,
    device: Device = None,
    dtype: Dtype = None,
    trust_remote_code: TrustRemote = False,
    cache_dir: Annotated[Path | None, typer.Option(help="answer and verdict cache (default $FLIPCHECK_CACHE or ~/.cache/flipcheck)")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="do not read or write cached answers and verdicts")] = False,
    verbose: Verbose = False,
) -> None:
    """Parent and children answer free-form prompts; an LLM judge grades them (1-10) and compares them pairwise."""
    setup_logging(verbose)
    from flipcheck.judge.client import JudgeSettings
    from flipcheck.judge.generate import GenerationSettings
    from flipcheck.judge.report import terminal_lines
    from flipcheck.judge.run import check_mode, judge_models

    def go():
        check_mode(mode)
        if limit is not None and limit < 1:
            raise FlipcheckError(f"--limit {limit}: must be at least 1")
        settings = JudgeSettings(url=judge_url, model=judge_model, api_key_env=judge_api_key_env,
                                 max_tokens=judge_max_tokens, concurrency=concurrency)
        gen = GenerationSettings(max_new_tokens=max_new_tokens, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        report = judge_models(parent, children, prompts=prompts, settings=settings, gen=gen, mode=mode, out=out,
                              limit=limit, cache_dir=cache_dir, use_cache=not no_cache,
                              progress=lambda m: console.print(f"[dim]{m}[/]"))
        for line in terminal_lines(report):
            verdict(line)
        if out is not None:
            console.print(f"report: {Path(out) / 'report.html'}  (also report.md, report.json, judge.jsonl)")


    with third_party_output(out, verbose=verbose):  # third-party warnings and bars -> OUT/run.log
        run_guarded(go)
