"""Extract for metering: the control plane's instances, throttle settings and the
heartbeats of one day's look-back window, as compact columns (DESIGN §3).

Throttle settings are checked per org here (`checked_throttle`): a value outside
1..24 h is replaced by metering's default and reported, never an error.

The window streams as binary COPY (fixed 40-byte rows parsed straight into numpy)
in two time slices on two connections at once; rows whose instance id is null or
unknown, and untrusted rows outside the window, come back as text. Which window a
day needs is metering's rule (`MeteringRules.lookback_window`); this module only
asks for it through `LookbackRules`, so it never imports metering.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import psycopg
from sqlalchemy.engine import Engine

from resources.calendar import day_bounds
from resources.db import load_sql, raw_connection, read_frame

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
# Binary COPY
# ---------------------------------------------------------------------------

# Binary COPY row of extract_heartbeats_binary.sql: field count, then (length, value)
# for code int4, sent_at timestamptz, active int2, received_at timestamptz.
_BINARY_ROW = np.dtype(
    [
        ("fields", ">i2"),
        ("code_len", ">i4"),
        ("code", ">i4"),
        ("sent_len", ">i4"),
        ("sent", ">i8"),
        ("active_len", ">i4"),
        ("active", ">i2"),
        ("received_len", ">i4"),
        ("received", ">i8"),
    ]
)
_BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01 in Unix microseconds
_PARSE_BLOCK = 8 << 20


def _parse_binary_block(buffer: bytearray, final: bool) -> tuple[HeartbeatColumns, int]:
    rows = len(buffer) // _BINARY_ROW.itemsize
    if final:
        trailer = bytes(buffer[rows * _BINARY_ROW.itemsize :])
        if trailer != b"\xff\xff":
            raise RuntimeError(f"unexpected end of binary COPY stream ({trailer[:8]!r})")
    block = np.frombuffer(buffer, dtype=_BINARY_ROW, count=rows)
    if rows and not (
        (block["fields"] == 4).all()
        and (block["code_len"] == 4).all()
        and (block["sent_len"] == 8).all()
        and (block["active_len"] == 2).all()
        and (block["received_len"] == 8).all()
    ):
        raise RuntimeError("binary COPY rows are not the expected 40-byte layout")
    columns = HeartbeatColumns(
        code=block["code"].astype(np.int32),
        sent_us=block["sent"].astype(np.int64) + _PG_EPOCH_US,
        active=block["active"].astype(np.int8),
        received_us=block["received"].astype(np.int64) + _PG_EPOCH_US,
        categories=[],
    )
    del block
    return columns, rows * _BINARY_ROW.itemsize


def _load_instance_codes(cursor: psycopg.Cursor, codes: pd.DataFrame) -> None:
    """The temporary (instance_id → code) table the binary extract joins on."""
    cursor.execute(load_sql("extract/codes_table.sql"))
    with cursor.copy(load_sql("extract/codes_copy.sql")) as copy:
        for instance_id, code in codes.itertuples(index=False):
            copy.write_row((instance_id, code))
    cursor.execute(load_sql("extract/codes_analyze.sql"))


def _read_binary_copy(cursor: psycopg.Cursor, params: dict) -> list[HeartbeatColumns]:
    """extract_heartbeats_binary.sql as blocks of columns, parsed as the stream comes."""
    parts: list[HeartbeatColumns] = []
    buffer = bytearray()
    header_done = False
    with cursor.copy(load_sql("extract/heartbeats_binary.sql"), params) as copy:
        for chunk in copy:
            buffer += chunk
            if not header_done and len(buffer) >= 19:
                if bytes(buffer[:11]) != _BINARY_SIGNATURE:
                    raise RuntimeError("not a PostgreSQL binary COPY stream")
                extension = int.from_bytes(buffer[15:19], "big")
                del buffer[: 19 + extension]
                header_done = True
            if header_done and len(buffer) >= _PARSE_BLOCK:
                block, used = _parse_binary_block(buffer, final=False)
                parts.append(block)
                del buffer[:used]
    if header_done:
        block, used = _parse_binary_block(buffer, final=True)
        parts.append(block)
    return parts


def _copy_window_part(
    control_engine: Engine, codes: pd.DataFrame, part_start: dt.datetime, part_end: dt.datetime
) -> tuple[HeartbeatColumns, pd.DataFrame]:
    """Stream one time slice of the window as binary rows; rows with a null or
    unknown instance id come back separately as text (usually none)."""
    params = {"part_start": part_start, "part_end": part_end}
    with raw_connection(control_engine) as connection, connection.cursor() as cursor:
        _load_instance_codes(cursor, codes)
        columns = HeartbeatColumns.concat(_read_binary_copy(cursor, params), [])
        unknown = columns.code < 0
        text_rows = pd.DataFrame(columns=["instance_id", "sent_at", "active", "received_at"])
        if unknown.any():
            stamps = pd.to_datetime(np.unique(columns.sent_us[unknown]), unit="us", utc=True)
            text_rows = read_frame(
                connection,
                "extract/unknown_heartbeats.sql",
                {**params, "sent_at": list(stamps.to_pydatetime())},
            )
            columns = columns.take(np.flatnonzero(~unknown))
    return columns, text_rows


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
    heartbeats: HeartbeatColumns
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


def _read_settings(
    connection: psycopg.Connection,
    usage_date: dt.date,
    run_time: dt.datetime,
    rules: LookbackRules,
) -> _Settings:
    """Instances, checked throttle settings, the look-back window they imply and
    the untrusted rows outside it that belong to the day."""
    day_start, day_end = day_bounds(usage_date)
    instances = read_frame(connection, "extract/instances.sql")
    throttle, invalid_throttle = checked_throttle(
        read_frame(connection, "extract/throttle.sql"), rules
    )
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
    return _Settings(instances, throttle, invalid_throttle, (window_start, window_end), untrusted)


def count_window(
    connection: psycopg.Connection, window_start: dt.datetime, window_end: dt.datetime
) -> WindowSeen:
    """The heartbeats a look-back window holds now (sql/extract/window_count.sql)."""
    row = connection.execute(
        load_sql("extract/window_count.sql"),
        {"window_start": window_start, "window_end": window_end},
    ).fetchone()
    count, counted_at = row if row else (0, dt.datetime.now(dt.UTC))
    return WindowSeen(window_start, window_end, int(count), counted_at)


def extract_day(
    control_engine: Engine, usage_date: dt.date, run_time: dt.datetime, rules: LookbackRules
) -> DayExtract:
    """Instances, throttle settings and the day's heartbeats. The look-back window
    streams as binary COPY in two time slices on two connections at once (the
    server formats nothing and both cores work); untrusted rows come as text."""
    with raw_connection(control_engine) as connection:
        settings = _read_settings(connection, usage_date, run_time, rules)
        seen = count_window(connection, *settings.window)
    instances, (window_start, window_end) = settings.instances, settings.window
    categories = instances["instance_id"].astype(str).tolist()
    category_index = {instance_id: code for code, instance_id in enumerate(categories)}
    codes = pd.DataFrame({"instance_id": categories, "code": range(len(categories))})

    middle = window_start + (window_end - window_start) / 2
    slices = [(window_start, middle), (middle, window_end)]
    with ThreadPoolExecutor(max_workers=len(slices)) as pool:
        results = list(
            pool.map(lambda bounds: _copy_window_part(control_engine, codes, *bounds), slices)
        )
    parts = [columns for columns, _ in results]
    for text_rows in [rows for _, rows in results] + [settings.untrusted]:
        if len(text_rows):
            parts.append(_text_rows_to_columns(text_rows, category_index, categories))
    heartbeats = HeartbeatColumns.concat(parts, categories)
    del parts, results
    return DayExtract(heartbeats, instances, settings.throttle, settings.invalid_throttle, seen)
