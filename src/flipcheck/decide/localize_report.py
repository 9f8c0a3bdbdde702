"""The localize block in the terminal (rich tables), report.json, report.md and a per-layer plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.table import Table

from flipcheck.files import jsonable, write_json_atomic, write_text_atomic

SCHEMA = "flipcheck.localize"
VERSION = 1


def _f(x: float | None, spec: str) -> str:
    if x is None:
        return "∞"  # identical outputs: no noise in the SQNR
    return format(x, spec)


def ranked_layers(block: dict[str, Any]) -> list[dict[str, Any]]:
    """Layers from most to least damaging: by kl_swap_in where swaps ran, else by own relative error."""
    rows = list(block["layers"])
    if rows and rows[0].get("kl_swap_in") is not None:
        return sorted(rows, key=lambda r: -r["kl_swap_in"])
    return sorted(rows, key=lambda r: -r["own"]["rel_error"])


def _layer_cells(r: dict[str, Any]) -> list[str]:
    own, st = r["own"], r["stream"]
    cells = [str(r["layer"])]
    if r.get("kl_swap_in") is not None:
        cells += [f"{r['kl_swap_in']:.4g}", f"{r['share_swap_in']:.1%}" if r["share_swap_in"] is not None else "n/a",
                  f"{r['kl_removed']:.4g}", f"{r['share_removed']:.1%}" if r["share_removed"] is not None else "n/a"]
    cells += [f"{own['rel_error']:.4f}", f"{own['cosine']:.5f}", _f(own["sqnr_db"], ".1f"),
              f"{st['rel_error']:.4f}", f"{r['stream_added']:+.4f}"]
    return cells


_LAYER_HEAD = ["layer", "KL swap-in", "share", "KL removed", "share", "own rel err", "own cos", "own SQNR dB",
               "stream rel err", "stream added"]


def localize_tables(block: dict[str, Any], top: int = 10) -> list[Table]:
    """Two rich tables: the `top` layers (ranked) and the `top` Linear modules (by relative error)."""
    swaps = bool(block["layers"]) and block["layers"][0].get("kl_swap_in") is not None
    head = _LAYER_HEAD if swaps else [_LAYER_HEAD[0], *_LAYER_HEAD[5:]]
    t = Table(title=f"Layers by damage (text KL of the child {block['kl_total']:.4g} over {block['positions']} positions)")
    for h in head:
        t.add_column(h, justify="right")
    for r in ranked_layers(block)[:top]:
        t.add_row(*_layer_cells(r))
    m = Table(title="Linear modules by relative output error (same input)")
    for h in ("layer", "module", "rel err", "cosine", "SQNR dB"):
        m.add_column(h, justify="right" if h != "module" else "left")
    for r in block["modules"][:top]:
        m.add_row(str(r["layer"]), r["module"], f"{r['rel_error']:.4f}", f"{r['cosine']:.5f}", _f(r["sqnr_db"], ".1f"))
    return [t, m]


def localize_markdown(block: dict[str, Any], plot: str | None = None) -> str:
    """The md section: sources, every layer ranked, the 20 worst modules, the plot if written."""
    swaps = bool(block["layers"]) and block["layers"][0].get("kl_swap_in") is not None
    head = _LAYER_HEAD if swaps else [_LAYER_HEAD[0], *_LAYER_HEAD[5:]]
    lines = [
        "## Where the damage is (localize)", "",
        f"Parent `{block.get('parent')}`, child `{block.get('child')}`; text `{block.get('text')}`"
        + (f" ({block['text_note']})" if block.get("text_note") else "") + ": "
        f"{block['windows']} windows of {block['ctx']} tokens, {block['positions']} positions. "
        f"Text KL(P ‖ C) of the child: {block['kl_total']:.4g}.", "",
        "KL swap-in: the parent with the child's version of the layer; KL removed: the child's KL minus "
        "that of the child with the parent's layer restored. Own errors: the layer's output on the parent's "
        "input to it; stream: the residual stream after the layer, each model on its own.", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(_layer_cells(r)) + " |" for r in ranked_layers(block)]
    lines += ["", "| layer | module | rel err | cosine | SQNR dB |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['module']} | {r['rel_error']:.4f} | {r['cosine']:.5f} | {_f(r['sqnr_db'], '.1f')} |"
              for r in block["modules"][:20]]
    if plot:
        lines += ["", f"![per-layer damage]({plot})"]
    return "\n".join(lines) + "\n"


def plot_layers(block: dict[str, Any], path: str | os.PathLike) -> None:
    """Per-layer bars: KL swap-in and KL removed (where measured), and the own relative error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = block["layers"]
    x = [r["layer"] for r in rows]
    swaps = bool(rows) and rows[0].get("kl_swap_in") is not None
    fig, axes = plt.subplots(2 if swaps else 1, 1, figsize=(max(6, len(x) * 0.3), 6 if swaps else 3), squeeze=False)
    ax = axes[0][0]
    ax.bar(x, [r["own"]["rel_error"] for r in rows], color="tab:orange")
    ax.set_ylabel("own relative error")
    if swaps:
        ax2 = axes[1][0]
        w = 0.4
        ax2.bar([i - w / 2 for i in x], [r["kl_swap_in"] for r in rows], w, label="KL swap-in")
        ax2.bar([i + w / 2 for i in x], [r["kl_removed"] for r in rows], w, label="KL removed")
        ax2.axhline(block["kl_total"], color="k", lw=0.8, ls="--", label="child KL")
        ax2.set_ylabel("text KL")
        ax2.legend()
    axes[-1][0].set_xlabel("decoder layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_localize(out: str | os.PathLike, block: dict[str, Any]) -> Path:
    """OUT/report.json ({"schema": "flipcheck.localize", "version": 1, "localize": block}), OUT/report.md
    and OUT/localize.png."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "report.json", {"schema": SCHEMA, "version": VERSION, "localize": jsonable(block)})
    plot_layers(block, folder / "localize.png")
    write_text_atomic(folder / "report.md", "# flipcheck localize\n\n" + localize_markdown(block, "localize.png"))
    return folder
