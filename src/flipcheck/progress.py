"""One progress view per command: every child's steps (compress, tasks, texts, judge) as one bar with
the current step, the time elapsed and an estimate of the time left.

Library code reports steps through a plain callback (:data:`StepHook`: ``hook("child: tasks")``);
the CLI owns the terminal and draws them with rich. The estimate is rich's (the recent rate of
finished steps), so it settles after the first child.
"""

from __future__ import annotations

from collections.abc import Callable

StepHook = Callable[[str], None]


def steps_per_child(*, tasks: bool, texts: bool, judge: bool = False, compress: bool = False) -> int:
    return int(compress) + int(tasks) + int(texts) + int(judge)


class RunProgress:
    """A rich progress bar over `total` steps; :meth:`step` finishes the previous step and names the next."""

    def __init__(self, console, total: int, title: str = "flipcheck") -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("[bold]{task.fields[title]}[/]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("left"),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.task = self.progress.add_task("starting", total=max(1, total), title=title)
        self._started = False

    def __enter__(self) -> RunProgress:
        return self  # drawn from the first step on: a command that fails its checks shows no bar

    def __exit__(self, *exc) -> None:
        if not self._started:
            return
        if exc[0] is None:
            self.progress.update(self.task, completed=self.progress.tasks[0].total, description="done")
        self.progress.stop()

    def step(self, label: str) -> None:
        if self._started:
            self.progress.advance(self.task)
        else:
            self.progress.start()
            self._started = True
        self.progress.update(self.task, description=label)
