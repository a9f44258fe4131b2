"""Extract for metering: the control plane's instances, throttle settings and the
heartbeats of one day's look-back window, as compact columns (DESIGN §3).

Throttle settings are checked per org here (`checked_throttle`): a value outside
1..24 h is replaced by metering's default and reported, never an error.

The window is read through the ADBC PostgreSQL driver (binary COPY decoded into
Arrow in native code) in two time slices on two connections at once, and each
record batch is split into Arrow files per group of whole orgs under
`TALLY_HOME/spill`, so metering holds one group at a time. Untrusted rows outside
the window come through psycopg (few). Which window a
day needs is metering's rule (`MeteringRules.lookback_window`); this module only
asks for it through `LookbackRules`, so it never imports metering.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import adbc_driver_postgresql.dbapi as adbc_dbapi
import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy.engine import Engine

from assets.shards import ALL, Shard
from resources.calendar import day_bounds
from resources.db import libpq_uri, load_sql, raw_connection, read_frame, tally_home

_NAT = np.iinfo(np.int64).min  # NaT as int64 microseconds


@dataclass
class HeartbeatColumns:
    """Heartbeats as compact columns (≈ 21 bytes a row instead of a DataFrame's
    objects): `code` indexes `categories` (instance ids; -1 null id), stamps are
    Unix microseconds (NaT as int64 min), `active` is 1/0/2 (2 = null)."""

    code: np.ndarray
    sent_us: np.ndarray
    active: np.ndarray
    received_us: np.ndarray
    categories: list[str]

    def __len__(self) -> int:
        return len(self.code)

    def take(self, rows: np.ndarray) -> HeartbeatColumns:
        return HeartbeatColumns(
            self.code[rows],
            self.sent_us[rows],
            self.active[rows],
            self.received_us[rows],
            self.categories,
        )

    def with_own_categories(self) -> HeartbeatColumns:
        """The same rows with only the ids they use as categories, so a group's frame
        does not carry (and group by) every instance of the day."""
        known = self.code >= 0
        used = np.bincount(self.code[known], minlength=len(self.categories)) > 0  # no sort
        local = (np.cumsum(used) - 1).astype(np.int32)
        code = np.where(known, local[np.where(known, self.code, 0)], -1).astype(np.int32)
        return HeartbeatColumns(
            code,
            self.sent_us,
            self.active,
            self.received_us,
            [self.categories[int(position)] for position in np.flatnonzero(used)],
        )

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "instance_id": pd.Categorical.from_codes(
                    self.code, categories=pd.Index(self.categories, dtype=object)
                ),
                "sent_at": pd.Series(self.sent_us.view("M8[us]")).dt.tz_localize("UTC"),
                "active": pd.Series(pd.arrays.BooleanArray(self.active == 1, self.active == 2)),
                "received_at": pd.Series(self.received_us.view("M8[us]")).dt.tz_localize("UTC"),
            }
        )

    @staticmethod
    def from_frame(heartbeats: pd.DataFrame) -> HeartbeatColumns:
        ids = heartbeats["instance_id"]
        categorical = ids if isinstance(ids.dtype, pd.CategoricalDtype) else ids.astype("category")
        active = heartbeats["active"].astype("boolean")
        return HeartbeatColumns(
            code=categorical.cat.codes.to_numpy().astype(np.int32),
            sent_us=_micros(heartbeats["sent_at"]),
            active=np.where(active.isna(), 2, active.fillna(False).astype(int)).astype(np.int8),
            received_us=_micros(heartbeats["received_at"]),
            categories=[str(value) for value in categorical.cat.categories],
        )

    @staticmethod
    def concat(parts: list[HeartbeatColumns], categories: list[str]) -> HeartbeatColumns:
        """Concatenate column by column, freeing each part's column as it goes."""
        columns = {}
        for name, dtype in (
            ("code", np.int32),
            ("sent_us", np.int64),
            ("active", np.int8),
            ("received_us", np.int64),
        ):
            columns[name] = (
                np.concatenate([getattr(part, name) for part in parts])
                if parts
                else np.empty(0, dtype)
            )
            for part in parts:
                setattr(part, name, None)
        return HeartbeatColumns(categories=categories, **columns)


def _micros(values: pd.Series) -> np.ndarray:
    stamps = pd.to_datetime(values, utc=True).dt.as_unit("us")
    result = stamps.to_numpy(dtype="datetime64[us]").view("int64").copy()
    result[stamps.isna().to_numpy()] = _NAT
    return result


# ---------------------------------------------------------------------------
# The window through ADBC, spilled per group of whole orgs
# ---------------------------------------------------------------------------

_SPILL_SCHEMA = pa.schema(
    [
        ("code", pa.int32()),
        ("sent_us", pa.int64()),
        ("active", pa.int8()),
        ("received_us", pa.int64()),
    ]
)
BATCH_HINT_BYTES = 16 << 20  # ADBC record batches of about this size (a few 100k rows)
# Two groups are metered at once (assets/metering.py METERING_THREADS): 1 M rows a
# group keeps the peak where one group of 2 M had it, and uses both cores.
DEFAULT_ROWS_PER_GROUP = 1_000_000


def org_groups(
    instances: pd.DataFrame, rows_per_instance: float, rows_per_group: int
) -> np.ndarray:
    """The group of each instance row: whole orgs in org order, about `rows_per_group`
    heartbeats a group given `rows_per_instance` (the window's count ÷ instances).
    The daily cap is per org and an org never spans two groups, so metering group by
    group is exact."""
    if instances.empty:
        return np.empty(0, dtype=np.int32)
    org_codes, _ = pd.factorize(instances["org_id"].astype(str), sort=True)
    per_org = np.bincount(org_codes).astype(np.float64) * max(rows_per_instance, 1.0)
    group_of_org = ((np.cumsum(per_org) - per_org) // max(rows_per_group, 1)).astype(np.int32)
    _, dense = np.unique(group_of_org, return_inverse=True)  # no empty groups
    return dense.astype(np.int32)[org_codes]


class HeartbeatSpill:
    """The window's heartbeats as compact columns in Arrow IPC files under
    `TALLY_HOME/spill`, one set of files per group of whole orgs, so only one group
    is in memory at a time. Codes index `categories` (instance ids, then ids no
    instance has; -1 null id); unknown and null ids are in group 0. The directory is
    removed when the object is closed or collected."""

    def __init__(self, directory: Path, categories: list[str], instance_group: np.ndarray):
        self.directory = directory
        self.categories = categories
        self.instance_group = instance_group  # per instances row
        self.groups = int(instance_group.max()) + 1 if len(instance_group) else 1
        self._files: list[list[Path]] = [[] for _ in range(self.groups)]
        self._rows = np.zeros(self.groups, dtype=np.int64)
        self._finalizer = weakref.finalize(self, shutil.rmtree, directory, True)

    def __len__(self) -> int:
        return int(self._rows.sum())

    def rows_per_group(self) -> np.ndarray:
        return self._rows.copy()

    def close(self) -> None:
        self._finalizer()

    def _writers(self, part: int) -> _GroupWriters:
        paths = [
            self.directory / f"group-{group:05d}-part-{part}.arrow" for group in range(self.groups)
        ]
        for group, path in enumerate(paths):
            self._files[group].append(path)
        return _GroupWriters(paths)

    def _record(self, rows: np.ndarray) -> None:
        self._rows += rows

    def group(self, group: int) -> HeartbeatColumns:
        """One group's heartbeats, in the order they were read (time slice by slice),
        with only the ids they use as categories."""
        return self._read_group(group).with_own_categories()

    def _batches(self, group: int) -> list[pa.RecordBatch]:
        """The group's record batches, memory-mapped (read only where touched)."""
        batches = []
        for path in self._files[group]:
            if path.exists():
                reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
                batches += [reader.get_batch(index) for index in range(reader.num_record_batches)]
        return batches

    def _read_group(self, group: int) -> HeartbeatColumns:
        table = pa.Table.from_batches(self._batches(group), schema=_SPILL_SCHEMA)
        columns = {
            name: np.ascontiguousarray(table.column(name).to_numpy())
            for name in _SPILL_SCHEMA.names
        }
        return HeartbeatColumns(categories=self.categories, **columns)

    def take(self, rows: np.ndarray) -> HeartbeatColumns:
        """Rows by position in the groups laid end to end (the checks' spread sample),
        picked batch by batch: only the pages holding them are read."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        parts = []
        offset = 0
        for group in range(self.groups):
            for batch in self._batches(group):
                lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
                if hi > lo:
                    picked = rows[lo:hi] - offset
                    columns = {
                        name: batch.column(name).to_numpy()[picked] for name in _SPILL_SCHEMA.names
                    }
                    parts.append(HeartbeatColumns(categories=self.categories, **columns))
                offset += batch.num_rows
        return HeartbeatColumns.concat(parts, self.categories)


class _GroupWriters:
    """One Arrow IPC file writer per group, opened on first write."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        self.rows = np.zeros(len(paths), dtype=np.int64)

    def write(self, group_of_row: np.ndarray, columns: HeartbeatColumns) -> None:
        # A stable sort of 16-bit keys is a radix sort: linear in the batch.
        keys = group_of_row.astype(np.int16 if len(self.paths) < 2**15 else np.int32)
        order = np.argsort(keys, kind="stable")
        bounds = np.searchsorted(keys[order], np.arange(len(self.paths) + 1))
        arrays = [columns.code, columns.sent_us, columns.active, columns.received_us]
        for group in map(int, np.flatnonzero(np.diff(bounds))):
            picked = order[bounds[group] : bounds[group + 1]]
            writer = self.writers.get(group)
            if writer is None:
                writer = self.writers[group] = pa.ipc.new_file(
                    str(self.paths[group]), _SPILL_SCHEMA
                )
            writer.write_batch(
                pa.record_batch([pa.array(array[picked]) for array in arrays], schema=_SPILL_SCHEMA)
            )
            self.rows[group] += len(picked)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class _Coder:
    """Instance id → code, shared by the reading threads; ids no instance has get
    new codes (they are quarantined with the id they carried)."""

    def __init__(self, categories: list[str], instance_group: np.ndarray):
        self.categories = categories
        self.known = pa.array(categories, type=pa.string())
        self.index = {instance_id: code for code, instance_id in enumerate(categories)}
        self.group = instance_group
        self.lock = threading.Lock()

    def codes(self, ids: pa.Array) -> np.ndarray:
        found = pc.index_in(ids, value_set=self.known)
        codes = found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
        missing = np.flatnonzero(found.is_null().to_numpy(zero_copy_only=False))
        if len(missing):
            values = ids.take(pa.array(missing)).to_pylist()
            with self.lock:
                for position, instance_id in zip(missing, values, strict=True):
                    if instance_id is None:
                        continue
                    code = self.index.get(instance_id)
                    if code is None:
                        code = self.index[instance_id] = len(self.categories)
                        self.categories.append(instance_id)
                    codes[position] = code
        return codes

    def groups(self, codes: np.ndarray) -> np.ndarray:
        known = (codes >= 0) & (codes < len(self.group))
        return np.where(known, self.group[np.where(known, codes, 0)], 0).astype(np.int32)


def _stamps_us(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    micros = pc.cast(values, pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return micros.fill_null(_NAT).to_numpy(zero_copy_only=False).astype(np.int64)


def _batch_columns(batch: pa.RecordBatch, coder: _Coder) -> HeartbeatColumns:
    active = batch.column("active")
    return HeartbeatColumns(
        code=coder.codes(batch.column("instance_id")),
        sent_us=_stamps_us(batch.column("sent_at")),
        active=np.where(
            active.is_null().to_numpy(zero_copy_only=False),
            2,
            active.fill_null(False).to_numpy(zero_copy_only=False),
        ).astype(np.int8),
        received_us=_stamps_us(batch.column("received_at")),
        categories=[],
    )


@dataclass(frozen=True)
class ShardFilter:
    """Which heartbeats one org shard reads (assets/shards.py): its instances' ids,
    every id the extract knows, and whether it takes unknown ids (shard 0), as the
    shard queries bind them (JSON arrays)."""

    shard_instances: str
    known_instances: str
    owns_unknown: bool

    @classmethod
    def of(
        cls, all_instances: pd.DataFrame, shard: Shard, mine: pd.Series | None = None
    ) -> ShardFilter:
        """`mine`: which rows of `all_instances` the shard owns, if already known."""
        if mine is None:
            mine = shard_mask(all_instances, shard)
        known = all_instances["instance_id"].astype(str)
        return cls(
            json.dumps(known[mine].tolist()),
            json.dumps(known.tolist() if shard.owns_unknown else []),
            shard.owns_unknown,
        )

    def params(self) -> dict[str, object]:
        return {
            "shard_instances": self.shard_instances,
            "known_instances": self.known_instances,
            "owns_unknown": self.owns_unknown,
        }


def _read_window_part(
    uri: str,
    part_start: dt.datetime,
    part_end: dt.datetime,
    coder: _Coder,
    writers: _GroupWriters,
    batch_bytes: int,
    shard_filter: ShardFilter | None = None,
) -> None:
    """One time slice of the window through ADBC (libpq, binary COPY decoded in
    native code into Arrow), each record batch split into its org groups' files;
    given a shard filter, only that org shard's heartbeats."""
    with adbc_dbapi.connect(uri) as connection, connection.cursor() as cursor:
        cursor.adbc_statement.set_options(
            **{"adbc.postgresql.batch_size_hint_bytes": str(batch_bytes)}
        )
        cursor.execute(
            load_sql("extract/window_slice.sql"), (part_start.isoformat(), part_end.isoformat())
        )
        cursor.fetchall()
        query = "extract/heartbeats_window.sql"
        if shard_filter is not None:
            cursor.execute(
                load_sql("extract/shard_instances.sql"),
                (
                    shard_filter.shard_instances,
                    shard_filter.known_instances,
                    "on" if shard_filter.owns_unknown else "off",
                ),
            )
            cursor.fetchall()
            query = "extract/heartbeats_window_shard.sql"
        cursor.execute(load_sql(query))
        try:
            for batch in cursor.fetch_record_batch():
                columns = _batch_columns(batch, coder)
                writers.write(coder.groups(columns.code), columns)
        finally:
            writers.close()


def _text_rows_to_columns(
    rows: pd.DataFrame, category_index: dict[str, int], categories: list[str]
) -> HeartbeatColumns:
    codes = np.empty(len(rows), dtype=np.int32)
    for position, instance_id in enumerate(rows["instance_id"]):
        if instance_id is None or (isinstance(instance_id, float) and np.isnan(instance_id)):
            codes[position] = -1
            continue
        code = category_index.get(instance_id)
        if code is None:
            code = category_index[instance_id] = len(categories)
            categories.append(instance_id)
        codes[position] = code

    active = rows["active"].astype("boolean")
    return HeartbeatColumns(
        code=codes,
        sent_us=_micros(rows["sent_at"]),
        active=np.where(active.isna(), 2, active.fillna(False).astype(int)).astype(np.int8),
        received_us=_micros(rows["received_at"]),
        categories=[],
    )


# ---------------------------------------------------------------------------
# What the extract asks of metering's rules
# ---------------------------------------------------------------------------


class LookbackRules(Protocol):
    """What the extract needs of metering's rules (`MeteringRules` fits)."""

    @property
    def future_tolerance_s(self) -> int: ...

    @property
    def max_throttle_limit_s(self) -> int: ...

    def throttle_defaults_s(self) -> dict[str, int]: ...

    def lookback_span_s(self, throttle: pd.DataFrame) -> int: ...

    def lookback_window(
        self, usage_date: dt.date, lookback_span_s: int | None = None
    ) -> tuple[dt.datetime, dt.datetime]: ...


# ---------------------------------------------------------------------------
# Throttle settings, checked per org
# ---------------------------------------------------------------------------

# throttle_settings column (minutes) → the seconds column metering reads.
THROTTLE_MINUTES_COLUMNS = {
    "continuous_limit_minutes": "continuous_limit_s",
    "daily_limit_minutes": "daily_limit_s",
    "idle_timeout_minutes": "idle_timeout_s",
}


@dataclass(frozen=True)
class InvalidThrottleSetting:
    """One org's throttle value outside 1..max minutes, billed with the default."""

    org_id: str
    column: str
    value: int | float | None  # as stored (None: NULL)
    max_minutes: int
    default_minutes: int

    def describe(self) -> str:
        value = "NULL" if self.value is None else self.value
        return (
            f"org {self.org_id}: {self.column} = {value} is not in "
            f"1..{self.max_minutes}; billed with the default {self.default_minutes}"
        )


def _stored_value(value: object) -> int | float | None:
    if value is None or pd.isna(value):  # type: ignore[call-overload]
        return None
    number = float(value)  # type: ignore[arg-type]
    return int(number) if number.is_integer() else number


def _valid_minutes(values: pd.Series, max_minutes: int) -> tuple[np.ndarray, np.ndarray]:
    """(is a whole number in 1..max_minutes, the minutes as int64 with 0 elsewhere)."""
    numbers = pd.to_numeric(values, errors="coerce")
    valid = numbers.notna() & (numbers == numbers.round())
    valid &= (numbers >= 1) & (numbers <= max_minutes)
    return valid.to_numpy(dtype=bool), numbers.where(valid, 0).to_numpy(dtype=np.int64)


def checked_throttle(
    raw: pd.DataFrame, rules: LookbackRules
) -> tuple[pd.DataFrame, list[InvalidThrottleSetting]]:
    """throttle_settings rows (minutes) → limits in seconds per org. A value that is
    not a whole number in 1..max (24 h: metering is exact only while every limit
    is ≤ 24 h, DESIGN §3.4) is replaced by metering's default for that column and
    reported; the org's other settings stand."""
    max_minutes = rules.max_throttle_limit_s // 60
    defaults_s = rules.throttle_defaults_s()
    throttle = pd.DataFrame({"org_id": raw["org_id"].astype(str).to_numpy(dtype=object)})
    invalid: list[InvalidThrottleSetting] = []
    for column, seconds_column in THROTTLE_MINUTES_COLUMNS.items():
        default_s = defaults_s[seconds_column]
        valid, minutes = _valid_minutes(raw[column], max_minutes)
        throttle[seconds_column] = np.where(valid, minutes * 60, default_s)
        invalid += [
            InvalidThrottleSetting(org, column, _stored_value(value), max_minutes, default_s // 60)
            for org, value in zip(throttle["org_id"][~valid], raw[column][~valid], strict=True)
        ]
    invalid.sort(key=lambda setting: (setting.org_id, setting.column))
    return throttle.astype({name: "int64" for name in THROTTLE_MINUTES_COLUMNS.values()}), invalid


# ---------------------------------------------------------------------------
# The day's extract
# ---------------------------------------------------------------------------


@dataclass
class WindowSeen:
    """What the day's metering saw of its look-back window: the window, how many
    heartbeats it held (counted just before reading it) and when. A later count
    above `heartbeats` means late heartbeats (assets/late_heartbeats.py)."""

    window_start: dt.datetime
    window_end: dt.datetime
    heartbeats: int
    counted_at: dt.datetime


@dataclass
class DayExtract:
    heartbeats: HeartbeatColumns | HeartbeatSpill
    instances: pd.DataFrame
    throttle: pd.DataFrame
    invalid_throttle: list[InvalidThrottleSetting]
    seen: WindowSeen | None = None


@dataclass
class _Settings:
    instances: pd.DataFrame
    throttle: pd.DataFrame
    invalid_throttle: list[InvalidThrottleSetting]
    window: tuple[dt.datetime, dt.datetime]
    untrusted: pd.DataFrame
    shard_filter: ShardFilter | None = None


def shard_mask(rows: pd.DataFrame, shard: Shard) -> pd.Series:
    """Which rows (with an org_id column) belong to `shard`."""
    return rows["org_id"].astype(str).map(shard.owns).astype(bool)


def _shard_rows(
    instances: pd.DataFrame,
    mine_mask: pd.Series,
    throttle: pd.DataFrame,
    untrusted: pd.DataFrame,
    shard: Shard,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The shard's instances, throttle rows and untrusted heartbeats (those of its
    instances; shard 0 also those of unknown or null ids)."""
    mine = instances[mine_mask]
    throttle = throttle[shard_mask(throttle, shard)]
    if len(untrusted):
        ids = untrusted["instance_id"]
        keep = ids.isin(set(mine["instance_id"]))
        if shard.owns_unknown:
            keep |= ids.isna() | ~ids.isin(set(instances["instance_id"]))
        untrusted = untrusted[keep.astype(bool)]
    return mine.reset_index(drop=True), throttle.reset_index(drop=True), untrusted


def _read_settings(
    connection: psycopg.Connection,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: LookbackRules,
    shard: Shard = ALL,
) -> _Settings:
    """Instances, checked throttle settings, the look-back window they imply and
    the untrusted rows outside it that belong to the day — of `shard`'s orgs."""
    day_start, day_end = day_bounds(usage_date)
    instances = read_frame(connection, "extract/instances.sql")
    throttle, invalid_throttle = checked_throttle(
        read_frame(connection, "extract/throttle.sql"), rules
    )
    if shard.sharded:
        invalid_throttle = [s for s in invalid_throttle if shard.owns(s.org_id)]
    window_start, window_end = rules.lookback_window(usage_date, rules.lookback_span_s(throttle))
    untrusted = read_frame(
        connection,
        "extract/untrusted_heartbeats.sql",
        {
            "window_start": window_start,
            "window_end": window_end,
            "future_after": run_time + dt.timedelta(seconds=rules.future_tolerance_s),
            "day_start": day_start,
            "day_end": day_end,
        },
    )
    if instances.empty:
        instances = pd.DataFrame(columns=["instance_id", "org_id", "tier", "status", "stopped_at"])
    instances["stopped_at"] = pd.to_datetime(instances["stopped_at"], utc=True)
    shard_filter = None
    if shard.sharded:
        mine = shard_mask(instances, shard)
        shard_filter = ShardFilter.of(instances, shard, mine)
        instances, throttle, untrusted = _shard_rows(instances, mine, throttle, untrusted, shard)
    return _Settings(
        instances,
        throttle,
        invalid_throttle,
        (window_start, window_end),
        untrusted,
        shard_filter,
    )


def count_window(
    connection: psycopg.Connection,
    window_start: dt.datetime,
    window_end: dt.datetime,
    shard_filter: ShardFilter | None = None,
) -> WindowSeen:
    """The heartbeats a look-back window holds now (sql/extract/window_count.sql),
    of one org shard given its filter (window_count_shard.sql)."""
    params: dict[str, object] = {"window_start": window_start, "window_end": window_end}
    query = "extract/window_count.sql"
    if shard_filter is not None:
        params.update(shard_filter.params())
        query = "extract/window_count_shard.sql"
    row = connection.execute(load_sql(query), params).fetchone()
    count, counted_at = row if row else (0, dt.datetime.now(dt.UTC))
    return WindowSeen(window_start, window_end, int(count), counted_at)


def spill_root() -> Path:
    """Where extracts spill their groups (`TALLY_HOME/spill`); directories left by
    processes that died are removed on the next extract."""
    root = tally_home() / "spill"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*-*"):
        pid = stale.name.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return root


def extract_day(
    control_engine: Engine,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: LookbackRules,
    rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
    batch_bytes: int = BATCH_HINT_BYTES,
    shard: Shard = ALL,
) -> DayExtract:
    """Instances, throttle settings and the day's heartbeats, spilled per group of
    whole orgs of about `rows_per_group` heartbeats (memory stays flat as instances
    grow: one group and one ADBC record batch of about `batch_bytes` at a time).
    The look-back window is read through ADBC in two time slices on two connections
    at once (both cores decode); untrusted rows come through psycopg. Given a
    shard, only its orgs (assets/shards.py), filtered in the database."""
    with raw_connection(control_engine) as connection:
        settings = _read_settings(connection, usage_date, run_time, rules, shard)
        seen = count_window(connection, *settings.window, settings.shard_filter)
    instances, (window_start, window_end) = settings.instances, settings.window
    categories = instances["instance_id"].astype(str).tolist()
    rows_per_instance = seen.heartbeats / max(len(categories), 1)
    instance_group = org_groups(instances, rows_per_instance, rows_per_group)
    directory = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=spill_root()))
    spill = HeartbeatSpill(directory, categories, instance_group)
    coder = _Coder(categories, instance_group)

    middle = window_start + (window_end - window_start) / 2
    slices = [(window_start, middle), (middle, window_end)]
    writers = [spill._writers(part) for part in range(len(slices) + 1)]
    uri = libpq_uri(control_engine)
    with ThreadPoolExecutor(max_workers=len(slices)) as pool:
        list(
            pool.map(
                lambda part: _read_window_part(
                    uri, *slices[part], coder, writers[part], batch_bytes, settings.shard_filter
                ),
                range(len(slices)),
            )
        )
    if len(settings.untrusted):
        untrusted = _text_rows_to_columns(settings.untrusted, coder.index, categories)
        writers[-1].write(coder.groups(untrusted.code), untrusted)
        writers[-1].close()
    for part_writers in writers:
        spill._record(part_writers.rows)
    return DayExtract(spill, instances, settings.throttle, settings.invalid_throttle, seen)
