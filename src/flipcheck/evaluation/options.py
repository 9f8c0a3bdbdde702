"""The evaluation settings a user chooses, declared once.

Each field's type, default and description is the whole declaration: :class:`EvalSettings` (what the
evaluator runs, and what keys its results) and the recipe's ``evaluation`` section inherit these models,
and the command-line options of ``eval``, ``sweep``, ``run``, ``search`` and ``localize`` are generated
from their fields (``flipcheck.commands.options``). A field's ``flag`` (where the option's name is not
``--`` plus the field's name with dashes) and ``cli: False`` (not an option) live in its schema extras.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flipcheck.errors import FlipcheckError, format_validation_error

DEFAULT_CTX = 512  # tokens per corpus window (llama-perplexity's default)


class ModelOptions(BaseModel):
    """How every model of a run is loaded."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(None, description="cpu, cuda, cuda:N, auto (default: cuda if available; auto, device_map across them, with several GPUs)")
    dtype: str | None = Field(None, description="float32, bfloat16, float16 (default: float32 on CPU, bf16 on GPU)")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off by default).")


class ScoreOptions(BaseModel):
    """Which instances are scored, and how."""

    model_config = ConfigDict(extra="forbid")

    include_path: str | list[str] | None = Field(None, description="folder of local lm-eval task YAMLs")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (task default if unset)")
    limit: int | float | None = Field(None, gt=0, description="questions per task (count, or fraction if < 1)")
    seed: int = Field(1234, description="seed of few-shot draws, fractional limits and sampling")
    batch_size: int | Literal["auto"] = Field(16, description="sequences per forward, or auto: the largest that fits the device (16 on CPU)")
    noise_floor: bool = Field(False, description="also score the parent against itself under numerics alone: another batch size, bf16-rounded weights, the other attention implementation")
    metric: Literal["acc", "acc_norm"] | None = Field(None, description="headline and gate figure: acc or acc_norm (default: acc_norm where a task reports it)")
    filter: str | None = Field(None, description="lm-eval filter of generative tasks, e.g. strict-match (default: the task's first)")
    per_subtask: bool = Field(False, description="every task of a group its own row and verdict (default: a group is one row, as named)")
    kl: Literal["topk", "bound", "exact"] = Field("topk", description="vocabulary KL of every child: topk (against the cached parent's top-K and sampled tail), bound (its top-K + tail-bucket lower bound; what a served model allows) or exact (parent in lock-step, 2 passes per child)")
    texts: list[str] = Field(default_factory=list, json_schema_extra={"flag": "--text"}, description="text corpus scored token by token (KL both ways, top-1, Δp, perplexity): a .txt/.jsonl file or hf:NAME[:CONFIG[:SPLIT]] (split test by default); repeat for several")
    ctx: int = Field(DEFAULT_CTX, ge=4, description="tokens per corpus window (text corpora and perplexity tasks such as wikitext)")
    scoring: Literal["all", "half"] = Field("all", description="corpus positions scored per window: all, or half (llama.cpp's: the second half of each window)")
    engine: str | None = Field(None, description="scoring engine of every model: transformers, llama.cpp (GGUF files), vllm (default: transformers; llama.cpp for .gguf when installed)")
    parent_engine: str | None = Field(None, description="the parent's scoring engine, instead of --engine")
    child_engine: str | None = Field(None, description="every child's scoring engine, instead of --engine")
    engine_floor: bool = Field(False, description="also score the parent on another engine, same weights: llama.cpp on an F32 GGUF of it (transformers for a GGUF or vLLM parent)")
    sample: str | None = Field(None, description="generative tasks: sample in step with the parent (same Gumbel noise per question, sample and position), e.g. temperature=0.7,top_p=0.95 (default: greedy)")
    samples: int = Field(1, ge=1, description="generations per question with --sample")

    @field_validator("metric", mode="before")
    @classmethod
    def _metric(cls, value):
        from flipcheck.evaluation.samples import check_metric

        return check_metric(value)

    @field_validator("kl", "scoring", mode="before")
    @classmethod
    def _choice(cls, value, info):
        """One of the field's literal values; else the one-line error naming them."""
        allowed = typing.get_args(cls.model_fields[info.field_name].annotation)
        if value not in allowed:
            raise FlipcheckError(f"--{info.field_name} {value!r}: allowed are {', '.join(allowed)}")
        return value

    @field_validator("num_fewshot", "limit", "ctx", mode="before")
    @classmethod
    def _counts(cls, value, info):
        floors = {"num_fewshot": (0, "must be >= 0"), "ctx": (4, "a window needs at least 4 tokens")}
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if info.field_name == "limit" and value <= 0:
                raise FlipcheckError(f"--limit {value}: must be > 0 (a count, or a fraction in (0, 1])")
            low, why = floors.get(info.field_name, (None, ""))
            if low is not None and value < low:
                raise FlipcheckError(f"--{info.field_name.replace('_', '-')} {value}: {why}")
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value):
        return parse_batch_size(value)

    @field_validator("limit", mode="after")
    @classmethod
    def _limit(cls, value):
        """A whole count given as a float (the command line's 200.0) is the count 200."""
        return int(value) if isinstance(value, float) and value >= 1 and value.is_integer() else value

    @field_validator("include_path", mode="before")
    @classmethod
    def _include_path(cls, value):
        """One folder as its path (what a recipe holds), several as a list, none as None."""
        if isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
            return None if not value else value[0] if len(value) == 1 else value
        return None if value is None else str(value)

    @field_validator("texts", mode="before")
    @classmethod
    def _texts(cls, value):
        return [] if value is None else list(value)

    @field_validator("engine", "parent_engine", "child_engine", mode="after")
    @classmethod
    def _engine(cls, value):
        from flipcheck.evaluation.engines import check_engine

        return check_engine(value)

    @model_validator(mode="after")
    def _sampling(self):
        from flipcheck.evaluation.sampling import parse_sample

        parse_sample(self.sample, self.samples, self.seed)  # a bad --sample / --samples fails before any model loads
        return self


class EvalOptions(ScoreOptions, ModelOptions):
    """Every choice of one ``eval``: what is scored and how the models load."""

    @classmethod
    def merged(cls, options: EvalOptions | None, chosen: dict[str, Any]) -> EvalOptions:
        """`options` (None: the defaults) with the fields in `chosen` set by name, checked (one line on
        a bad or unknown one)."""
        return build(cls, "settings", **{**(options.model_dump() if options is not None else {}), **chosen})

    def score(self) -> dict[str, Any]:
        """The :class:`ScoreOptions` fields (a recipe's ``evaluation`` section holds them)."""
        return {k: getattr(self, k) for k in ScoreOptions.model_fields}

    def loading(self) -> dict[str, Any]:
        """The :class:`ModelOptions` fields (a recipe holds them at its top level)."""
        return {k: getattr(self, k) for k in ModelOptions.model_fields}


def parse_batch_size(value: int | str) -> int | str:
    """An integer >= 1, or ``"auto"`` (resolved by :meth:`EvalSettings.resolve_batch_size`)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = int(value)
        except ValueError:
            raise FlipcheckError(f"--batch-size {value!r}: allowed are an integer >= 1 or auto") from None
    if not isinstance(value, int) or value < 1:
        raise FlipcheckError(f"batch_size must be >= 1 or auto, got {value!r}")
    return value


# eval's alone, with their defaults: search scores the greedy answers of candidates (a floor row is
# no candidate; its gate counts greedy answers)
EVAL_ONLY = {"noise_floor": False, "engine_floor": False, "sample": None, "samples": 1}


def one_line(what: str, err) -> FlipcheckError:
    """A pydantic ValidationError as flipcheck's one-line error. A FlipcheckError raised inside a
    validator (pydantic wraps it, being a ValueError) comes back as it was written."""
    for e in err.errors():
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, FlipcheckError):
            return inner

    return FlipcheckError(format_validation_error(what, err))


def build(model: type[BaseModel], what: str = "settings", **values):
    """``model(**values)`` with a pydantic error turned into one line (exit 2 on the command line)."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as err:
        raise one_line(what, err) from None
