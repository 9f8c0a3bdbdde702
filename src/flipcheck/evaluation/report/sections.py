"""Report sections that layers above evaluation add (the judge's), drawn by report.md and report.html.

A layer registers ``(markdown, html)`` functions of the report dict once, at its import
(:mod:`flipcheck.judge` does); each returns lines (markdown) or HTML parts, empty when the report
has nothing for it. The writers here call whatever is registered, in registration order, so
evaluation never imports the layers that build on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Section = Callable[[Mapping[str, Any]], list[str]]

_SECTIONS: dict[str, tuple[Section, Section]] = {}


def register_section(name: str, markdown: Section, html: Section) -> None:
    """Add (or replace) the section `name`."""
    _SECTIONS[name] = (markdown, html)


def markdown_sections(report: Mapping[str, Any]) -> list[str]:
    return [line for md, _ in _SECTIONS.values() for line in md(report)]


def html_sections(report: Mapping[str, Any]) -> list[str]:
    return [part for _, html in _SECTIONS.values() for part in html(report)]
