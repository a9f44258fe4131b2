"""Local Dagster instance for the CLI (`tally run`, `tally ui`, `tally demo`)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from resources.db import PROJECT_ROOT, tally_home


def local_dagster_home() -> Path:
    """DAGSTER_HOME if set; else `.tally/dagster` with the project's dagster.yaml
    (run queue limits, run monitoring) but local storage instead of Postgres."""
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"])
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
