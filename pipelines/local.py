"""Local Dagster instance for the CLI (`tally run`, `tally ui`, `tally demo`)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from resources.db import PROJECT_ROOT, tally_home


def local_dagster_home() -> Path:
    """DAGSTER_HOME if set, else `.tally/dagster`. A home without dagster.yaml gets
    this project's (run queue limits, run monitoring, no telemetry) with local
    storage instead of Postgres."""
    if os.environ.get("DAGSTER_HOME"):
        home = Path(os.environ["DAGSTER_HOME"])
        if (home / "dagster.yaml").exists():
            return home
    else:
        home = tally_home() / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    settings.pop("storage", None)
    target = home / "dagster.yaml"
    rendered = yaml.safe_dump(settings, sort_keys=False)
    if not target.exists() or target.read_text() != rendered:
        target.write_text(rendered)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
