"""Orchestration: the layer above the executors that turns a command into work and a report.

``evaluate`` (:mod:`.evaluate`), ``run_recipe`` and ``sweep`` (:mod:`.recipe`) build the parent's
evaluator and one :class:`~flipcheck.executors.ChildPlan` per child (:mod:`.children`), hand them
to an executor, and write the report; :mod:`.work` holds the jobs a remote executor runs. Imports
point down only: orchestrate uses recipes, evaluation, compressors, judge and executors; none of
them imports orchestrate.
"""
