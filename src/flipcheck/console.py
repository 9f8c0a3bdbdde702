"""The console every command prints to."""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

FILE_WIDTH = 240  # columns of output that goes to a file or a pipe: tables keep every figure whole


class CommandConsole(Console):
    """rich's Console, but output that is not a terminal (a file, a pipe) is laid out FILE_WIDTH wide
    (or wider, with $COLUMNS) instead of 80 columns: rich cut localize's figures to ``0.48…`` in a
    file. Tables are drawn at their natural width, so nothing is padded to 240. On a terminal, its
    width, as rich measures it."""

    def _size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(max(size.width, FILE_WIDTH), size.height)
        return size

    size = property(_size, Console.size.fset)
