"""A fake executor: the children here, last first (finished children still reach the report in the
run's order). One class, one registration."""

from __future__ import annotations

from flipcheck.executors import register_executor
from flipcheck.executors.base import Collector, Executor, Outcome


class ReversedExecutor(Executor):
    name = "reversed"
    ran: list[str] = []

    def __init__(self, options=None) -> None:
        self.options = options

    def run(self, plans, say, *, on_done=None, on_progress=None) -> Outcome:
        collect = Collector(plans, on_done, on_progress, say)
        collect.info = {"name": self.name}
        for plan in reversed(plans):
            ReversedExecutor.ran.append(plan.name)
            collect.done(plan, *plan.here())
        return collect.outcome()


register_executor("reversed", ReversedExecutor)
