"""How children run (the options of ``--executor``), and the report fields an executor fills."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flipcheck.errors import FlipcheckError

_EXECUTORS: dict[str, Any] = {}  # name -> the Executor class (built from ExecutorOptions)


def register_executor(name: str, cls: Any) -> Any:
    """Make `cls` (an :class:`~flipcheck.executors.base.Executor`, built as ``cls(options)``) the executor
    `name` of ``--executor``. Registering a name again replaces it."""
    _EXECUTORS[name] = cls
    return cls


def executor_names() -> tuple[str, ...]:
    return tuple(_EXECUTORS)

EXIT_CHILD_FAILED = 3  # a child failed after its retry; gate failures stay 1, bad input 2


@dataclass
class ExecutorOptions:
    """How children run: ``name`` local or ray; for ray the cluster address (None: $RAY_ADDRESS,
    else ``auto``, else a local cluster is started), resources per child (None: one GPU where the
    cluster has GPUs, else one CPU) and the evaluation shards per child."""

    name: str = "local"
    address: str | None = None
    gpus_per_child: float | None = None
    cpus_per_child: float | None = None
    shards: int = 1

    def __post_init__(self) -> None:
        if self.name not in _EXECUTORS:
            raise FlipcheckError(f"--executor {self.name!r}: allowed are {', '.join(executor_names())}")
        if self.shards < 1:
            raise FlipcheckError(f"--shards {self.shards}: must be >= 1 (evaluation shards per child)")
        for flag, v in (("--gpus-per-child", self.gpus_per_child), ("--cpus-per-child", self.cpus_per_child)):
            if v is not None and v < 0:
                raise FlipcheckError(f"{flag} {v}: must be >= 0")
        if self.cpus_per_child == 0 and not self.gpus_per_child:
            raise FlipcheckError("--cpus-per-child 0 needs --gpus-per-child > 0: a child needs some resource")
        if self.name == "local" and (self.address or self.shards > 1 or self.gpus_per_child is not None
                                     or self.cpus_per_child is not None):
            raise FlipcheckError(
                "--ray-address, --shards, --gpus-per-child and --cpus-per-child need --executor ray"
            )



def executor_options(name: str = "local", **kwargs: Any) -> ExecutorOptions | None:
    """The CLI's options as :class:`ExecutorOptions` (None for the plain local run)."""
    opts = ExecutorOptions(name=name, **kwargs)
    return None if opts.name == "local" else opts


def failed_entry(name: str, reason: str, attempts: int) -> dict[str, Any]:
    """A child that did not finish: its name, ``status: failed`` and a one-line reason."""
    line = next((s.strip() for s in str(reason).splitlines() if s.strip()), "unknown error")
    return {"name": name, "status": "failed", "reason": line[:500], "attempts": attempts}


def finish_report(report: dict, failed: list[dict], info: dict[str, Any]) -> dict:
    """`report` with the failed children (``report["failed"]``) and how the run was executed."""
    report["failed"] = list(failed)
    report["executor"] = dict(info)
    return report


def failed_children(report: dict) -> list[dict]:
    return [f for f in report.get("failed") or [] if f.get("status") == "failed"]
