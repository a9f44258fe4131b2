"""Org shards: a day split into N groups of whole orgs that meter, push and read
back independently (DESIGN §10). The one owner of which org is in which shard.

An org's shard is a stable hash of its org id (the first four bytes of its SHA-256,
mod N): the same on every machine, run and Python version, and independent of the
other orgs. Heartbeats of ids no instance has (quarantined) belong to shard 0.
Every row a shard writes carries its `part` label, so a re-run replaces exactly
what that shard wrote; with N = 1 the label is `all` and the graph is the daily one.
No Dagster, no I/O."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from resources.settings import SettingInvalid

SHARDS_SETTING = "TALLY_SHARDS"
MAX_SHARDS = 64  # a partition dimension of runs per day; far more is a mistake
UNSHARDED_PART = "all"


def shard_of(org_id: str, count: int) -> int:
    """The shard (0 … count-1) of an org id."""
    if count <= 1:
        return 0
    digest = hashlib.sha256(org_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (1 <= self.count <= MAX_SHARDS and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index} of {self.count} does not exist")

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def label(self) -> str:
        """The `part` its rows carry: `all` unsharded, else `index/count`."""
        return f"{self.index}/{self.count}" if self.sharded else UNSHARDED_PART

    @property
    def key(self) -> str:
        """Its key in the `shard` partition dimension."""
        return str(self.index)

    @property
    def owns_unknown(self) -> bool:
        """Heartbeats of unknown or null instance ids are quarantined by shard 0."""
        return self.index == 0

    def owns(self, org_id: str | None) -> bool:
        """A null org (an unknown instance) is shard 0's."""
        if org_id is None:
            return self.owns_unknown
        return shard_of(str(org_id), self.count) == self.index

    def params(self) -> dict[str, object]:
        """What the part-scoped SQL binds: its label and every label of its layout
        (rows under a label of an earlier layout are replaced by the first shard of
        this one that runs)."""
        return {"part": self.label, "parts": sibling_labels(self.count)}

    @classmethod
    def of_key(cls, key: str, count: int) -> Shard:
        return cls(int(key), count)


ALL = Shard()


def sibling_labels(count: int) -> list[str]:
    """Every label of a layout of `count` shards."""
    return [Shard(index, count).label for index in range(count)]


def shard_keys(count: int) -> list[str]:
    return [Shard(index, count).key for index in range(count)]


def shard_count(environ: dict[str, str] | None = None) -> int:
    """`TALLY_SHARDS` (1 … 64, default 1): how many shards a day is split into."""
    raw = (environ if environ is not None else os.environ).get(SHARDS_SETTING, "").strip()
    if not raw:
        return 1
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_SHARDS:
        raise SettingInvalid(
            f"{SHARDS_SETTING}={raw!r} is not a shard count; set a whole number from 1 "
            f"to {MAX_SHARDS} (1: one run a day)"
        )
    return count
