"""A recipe's static checks: every child's, before the parent is loaded or scored.

What :mod:`flipcheck.compressors.checks` checks for one compression (each child's steps and chain,
group sizes and N:M masks against the widths in the parent's config.json), for every child, and the
shared calibration source once when some child needs data. A recipe with a bad tenth child fails
in a second, not after the parent and nine children were scored.
"""

from __future__ import annotations

from typing import Any

from flipcheck.compressors.calibration_data import check_reachable, resolve_calibration
from flipcheck.compressors.checks import check_shapes, parent_config
from flipcheck.compressors.pipeline import step_needs_calibration, validate_steps
from flipcheck.errors import FlipcheckError


def check_recipe(recipe: Any, parent: Any) -> None:
    """Raise a one-line FlipcheckError naming the first child whose plan cannot work.

    `recipe`: a :class:`~flipcheck.recipes.schema.Recipe` whose calibration source is filled in
    (:func:`flipcheck.recipes.runner.with_calibration_source`); `parent`: its resolved
    :class:`~flipcheck.models.ModelSource`.
    """
    config = parent_config(parent)
    needs_data = False
    for spec in recipe.all_children():
        try:
            steps = validate_steps([(s.method, s.config()) for s in spec.steps])
            if config is not None:
                check_shapes(steps, config)
        except FlipcheckError as err:
            raise FlipcheckError(f"child {spec.name}: {err}") from None
        needs_data = needs_data or any(step_needs_calibration(n, c) for n, c in steps)
    if needs_data:
        check_reachable(resolve_calibration(recipe.calibration, parent.folder).source)
