"""The approver roster (issue 12): who may approve credits, and up to which
escalation level. Configuration, like the pricing file: `config/approvers.toml` in
the repository, `TALLY_APPROVERS_FILE` points at another file (production mounts
its own). The levels and their limits are `EscalationLevel` in assets/credits.py;
this module only reads names → levels and validates them.

File format (TOML):

    [approvers]
    "lead@example.com" = "support_lead"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from assets.config import configuration_failure
from assets.credits import EscalationLevel
from resources.db import PROJECT_ROOT

APPROVERS_FILE_VARIABLE = "TALLY_APPROVERS_FILE"
DEFAULT_APPROVERS_FILE = PROJECT_ROOT / "config" / "approvers.toml"


class RosterError(ValueError):
    """The roster file is missing or wrong; the message names the file, key and fix."""


def normalized(name: str) -> str:
    """Names and e-mails compare case-insensitively, surrounding spaces ignored."""
    return name.strip().casefold()


@dataclass(frozen=True)
class Roster:
    approvers: dict[str, EscalationLevel]  # normalized name → level
    source: str

    def level_of(self, name: str) -> EscalationLevel | None:
        return self.approvers.get(normalized(name))


def roster_from_mapping(data: object, source: str) -> Roster:
    """{approvers: {name: level}} → Roster; RosterError names a bad key or level."""
    if not isinstance(data, dict) or set(data) != {"approvers"}:
        raise RosterError(f"{source}: expected one [approvers] table of name = level")
    entries = data["approvers"]
    if not isinstance(entries, dict):
        raise RosterError(f"{source}: [approvers] must be a table of name = level")
    levels = ", ".join(level.value for level in EscalationLevel)
    approvers: dict[str, EscalationLevel] = {}
    for name, level in entries.items():
        key = normalized(str(name))
        if not key:
            raise RosterError(f"{source}: an approver name is empty")
        try:
            approvers[key] = EscalationLevel(level)
        except ValueError:
            raise RosterError(
                f"{source}: approvers.{name} = {level!r} is not a level; use one of {levels}"
            ) from None
    return Roster(approvers, source)


def load_roster(path: Path) -> Roster:
    if not path.exists():
        raise RosterError(
            f"approver roster {path} does not exist; create it or set "
            f"{APPROVERS_FILE_VARIABLE} to your roster file"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise RosterError(f"approver roster {path} is not valid TOML: {error}") from None
    return roster_from_mapping(data, str(path))


def current_roster() -> Roster:
    """Read on every use (the file is tiny): an edited roster counts at once."""
    path = os.environ.get(APPROVERS_FILE_VARIABLE)
    return load_roster(Path(path) if path else DEFAULT_APPROVERS_FILE)


def roster_or_fail() -> Roster:
    """The roster, or a non-retried step failure: `approver roster: …`."""
    try:
        return current_roster()
    except RosterError as error:
        raise configuration_failure(f"approver roster: {error}") from None
