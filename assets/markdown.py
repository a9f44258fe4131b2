"""The one markdown-table helper behind every table tally puts in Dagster metadata."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def markdown_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    numeric: Collection[str] = (),
    empty: str = "_no rows_",
) -> str:
    """`| header | … |` with the `numeric` columns right-aligned; cells as given
    (format them first). No rows: the `empty` text instead of a bare header."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if header in numeric else "---" for header in headers) + "|",
    ]
    body = ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    if not body:
        return empty
    return "\n".join(lines + body)
