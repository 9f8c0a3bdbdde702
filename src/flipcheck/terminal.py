"""Rich tables for the terminal: methods and their settings, compression reports, recipes."""

from __future__ import annotations

from rich.table import Table

from flipcheck.compressors.registry import CompressionReport, methods


def methods_table() -> Table:
    t = Table(title="compression methods", show_lines=True)
    t.add_column("method", style="bold")
    t.add_column("what")
    t.add_column("settings (default)")
    for name, m in sorted(methods().items()):
        settings = "\n".join(
            f"{key}: {typ} = {default!r}" + (f"  — {desc}" if desc else "") for key, typ, default, desc in m.settings()
        )
        t.add_row(name, m.description, settings)
    return t


def compression_table(reports: list[CompressionReport]) -> Table:
    t = Table(title="compression")
    for col in ("#", "method", "bits/w", "zeros", "params", "linears", "s", "calibration"):
        t.add_column(col, justify="left" if col in ("method", "calibration") else "right", no_wrap=col != "calibration")
    for i, r in enumerate(reports, 1):
        cal = r.calibration or {}
        cal_txt = f"{cal.get('samples')}x{cal.get('seq_len')} {cal.get('source')}" if cal else "-"
        t.add_row(
            str(i), r.method, f"{r.bits_per_weight:.2f}", f"{r.sparsity:.1%}", f"{r.parameters:,}", str(r.targeted),
            f"{r.wall_time_s:.1f}", cal_txt,
        )
    return t


def recipes_table() -> Table | None:
    try:
        from flipcheck.recipes.schema import (
            bundled_recipes,  # guarded: without the recipes the table is left out
        )
    except ImportError:
        return None
    t = Table(title="bundled recipes (flipcheck run NAME)")
    t.add_column("name", style="bold")
    t.add_column("what")
    for name, desc in bundled_recipes().items():
        t.add_row(name, desc)
    return t
