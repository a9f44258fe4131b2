"""Local Dagster instance for the CLI (`tally run`, `tally ui`, `tally demo`)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from resources.db import PROJECT_ROOT, tally_home


@contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    """Processes starting at once (two `tally run`s) must not both write the settings
    or both create the instance's storage: the loser would hit a duplicate schema."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".tally-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_local_instance():
    """The local Dagster instance with its storage created (under the home lock)."""
    from dagster import DagsterInstance

    home = local_dagster_home()
    with _home_lock(home):
        instance = DagsterInstance.get()
        instance.get_runs(limit=1)  # creates run and event storage if new
    return instance


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
    settings = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    settings.pop("storage", None)
    target = home / "dagster.yaml"
    rendered = yaml.safe_dump(settings, sort_keys=False)
    with _home_lock(home):
        if not target.exists() or target.read_text() != rendered:
            target.write_text(rendered)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
