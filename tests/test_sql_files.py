"""SQL stays findable: every query file under sql/ is named literally by the code that
runs it (no file nobody loads, no names built at run time)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SQL = ROOT / "sql"
CODE = [ROOT / "assets", ROOT / "pipelines", ROOT / "resources"]
# Loaded by path, not by name: the migrations (globbed in order) and the control-plane
# schema for demo and tests.
LOADED_BY_PATH = {"source_schema.sql"}


def _code() -> str:
    return "\n".join(
        path.read_text() for folder in CODE for path in sorted(folder.rglob("*.py"))
    )


def _query_files() -> list[str]:
    return sorted(
        path.relative_to(SQL).as_posix()
        for path in SQL.rglob("*.sql")
        if path.parent.name != "migrations" and path.name not in LOADED_BY_PATH
    )


def test_every_sql_file_is_referenced_literally() -> None:
    code = _code()
    unreferenced = [name for name in _query_files() if f'"{name}"' not in code]
    assert unreferenced == []


def test_every_referenced_sql_file_exists() -> None:
    names = set(re.findall(r'"([\w/]+\.sql)"', _code()))
    missing = sorted(name for name in names if not (SQL / name).exists())
    assert missing == []


def test_no_sql_name_is_built_at_run_time() -> None:
    built = re.findall(r'f"[^"\n]*\.sql"', _code())
    assert built == []
