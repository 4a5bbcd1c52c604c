"""Tables for people and for scripts: rich on a terminal, tab-separated lines when piped.

Rich fits a table to the console's width, and a pipe has none: it fell back to 80 columns and
cut cells (`class_1` → `clas…`), or, given a fixed width, padded every line to it. Piped, a
table is data: one line per row, cells separated by tabs, nothing cut or padded (tabs and
newlines inside a cell become spaces), the header first and the title as a `# ` line. Setting
`COLUMNS` asks for the rich layout at that width instead.
`--json` stays the format for programs; this is for `cut`, `sort` and `grep`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console, RenderableType


def plain(cell: Any) -> str:
    """A cell as one line of text: `Text` as it reads, a `str` without its markup.

    >>> from rich.text import Text
    >>> plain("[bold]v3[/bold]"), plain(Text("[urgent]\\tfix")), plain(None)
    ('v3', '[urgent] fix', '')
    """
    from rich.text import Text

    if cell is None:
        return ""
    if isinstance(cell, Text):
        text = cell.plain
    elif isinstance(cell, str):
        text = Text.from_markup(cell).plain
    else:
        text = str(cell)
    return " ".join(text.replace("\t", " ").splitlines())


def tsv(table: Any) -> str:
    """A rich `Table` as tab-separated lines (see the module docstring).

    >>> from rich.table import Table
    >>> t = Table(title="versions")
    >>> t.add_column("version"); t.add_column("class_1\\nacc")
    >>> t.add_row("v3", "0.912")
    >>> print(tsv(t))
    # versions
    version	class_1 acc
    v3	0.912
    """
    lines = []
    if table.title:
        lines.append("# " + plain(table.title))
    if table.show_header:
        lines.append("\t".join(plain(c.header) for c in table.columns))
    cells = [list(c.cells) for c in table.columns]
    for row in zip(*cells, strict=True):
        lines.append("\t".join(plain(cell) for cell in row))
    return "\n".join(lines)


def print_table(console: Console, renderable: RenderableType) -> None:
    """Print `renderable` on `console`; a table as `tsv` when the console is not a terminal
    (unless `COLUMNS` is set: a width asked for is a layout asked for)."""
    import os

    from rich.table import Table

    if console.is_terminal or "COLUMNS" in os.environ or not isinstance(renderable, Table):
        console.print(renderable)
        return
    console.file.write(tsv(renderable) + "\n")
