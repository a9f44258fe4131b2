"""Deterministic synthetic control-plane data (DESIGN §2) for demo, tests and benchmarks.

`generate(spec)` builds the five control-plane tables as DataFrames (small specs only);
`iter_heartbeat_chunks(spec)` streams the heartbeats in bounded chunks; `load` copies
frames into PostgreSQL (binary COPY for heartbeats); `seed` does all of it, streaming.

What the data looks like (every random draw comes from numpy Generators seeded by
`spec.seed`, so the same spec gives byte-identical frames):

- organizations across the three plans, providers alternating from `spec.providers`;
  with five orgs or more one has no `provider_customer_id` (to be reported, not pushed);
- throttle rows for about a third of the orgs, each tightening one limit (or all
  three), and those orgs run an instance 24/7 so that every cap is hit;
- instances of four tiers; workers (1-12 h sessions), sporadic users and 24/7 boxes;
  sessions cross UTC midnight, have short (<= 300 s) and long (> 300 s) gaps and idle
  stretches of 10-90 min; paused and stopped instances stop heartbeating;
- with `spec.anomalies`: zombies (stopped, still heartbeating), stuck instances
  ('running', silent for hours), duplicate heartbeats (identical, conflicting
  `active`, or the same second with another fraction), rows with NULL instance_id,
  NULL sent_at or NULL active, unknown instance ids, `sent_at` decades in the future,
  and usage counters that drift 2-15 % from the truth or are missing.

`usage_counters` hold the true coverage (sessions of clean heartbeats floored to the
second, gap > 300 s starts a new one, [first, last + 60 s), split at UTC midnight)
for the `spec.days` usage days, before drift.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from resources.control_plane import COLUMNS, TABLES
from resources.db import create_control_plane, raw_connection
from resources.providers.base import Provider

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy.engine import Engine

# Order of loading: heartbeats before instances and usage_counters, whose
# last_heartbeat and runtime_seconds are computed while heartbeats stream.
LOAD_ORDER = ("organizations", "throttle_settings", "heartbeats", "instances", "usage_counters")
PROVIDERS = tuple(provider.value for provider in Provider)
PLANS = ("free-tier", "base-plus-usage", "usage-only")
TIERS = ("small", "medium", "large", "gpu")
TIER_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
STATUSES = ("running", "paused", "stopped")
STATUS_WEIGHTS = (0.75, 0.1, 0.15)
WORKER, SPORADIC, ALWAYS_ON = 0, 1, 2
PROFILE_WEIGHTS = (0.7, 0.18, 0.12)
DEFAULT_LIMITS = (480, 1440, 30)  # continuous, daily, idle timeout (minutes)

US = 1_000_000
DAY_S = 86_400
HEARTBEAT_S = 60
MAX_GAP_S = 300
NAT = np.iinfo(np.int64).min
NEVER = np.iinfo(np.int64).max
EPOCH_2000_US = 946_684_800 * US  # PostgreSQL binary timestamps count from 2000-01-01
GENERATE_MAX_INSTANCE_DAYS = 10_000  # generate() holds everything in memory
CHUNK_MAX_ROWS = 1_000_000  # worst-case heartbeat rows per chunk (24/7 instances)
UNKNOWN_ID_POOL = 64

_ADJECTIVES = (
    "Acme",
    "Blue",
    "Bright",
    "Cobalt",
    "Crimson",
    "Delta",
    "Golden",
    "Granite",
    "Harbor",
    "Iron",
    "Lunar",
    "Maple",
    "Nimbus",
    "Northern",
    "Orbit",
    "Quiet",
    "Rapid",
    "Silver",
    "Solar",
    "Summit",
    "Swift",
    "Vertex",
)
_NOUNS = (
    "Analytics",
    "Bakery",
    "Robotics",
    "Labs",
    "Studios",
    "Logistics",
    "Health",
    "Media",
    "Data",
    "Systems",
    "Capital",
    "Games",
    "Foods",
    "Research",
    "Energy",
    "Works",
)
_SUFFIXES = ("Inc", "LLC", "Ltd", "GmbH", "SAS", "BV", "Co")
_ALPHANUM = np.frombuffer(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", dtype="S1"
)


def _yesterday() -> dt.date:
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


@dataclass(frozen=True)
class SeedSpec:
    """What to generate; `end_date` is the last usage day (default yesterday, UTC)."""

    orgs: int = 20
    instances: int = 60  # total, spread over orgs (every org gets at least one)
    days: int = 7  # usage days ending at end_date; heartbeats also for the day before
    end_date: dt.date = field(default_factory=_yesterday)
    seed: int = 7
    providers: tuple[str, ...] = PROVIDERS
    anomalies: bool = True  # duplicates, malformed rows, stopped-but-heartbeating, drift

    def __post_init__(self) -> None:
        for name in ("orgs", "instances", "days", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"SeedSpec.{name} must be an integer, got {value!r}")
        if self.orgs < 1 or self.instances < 1 or self.days < 1:
            raise ValueError("SeedSpec.orgs, .instances and .days must be positive")
        if self.instances < self.orgs:
            raise ValueError(
                f"SeedSpec.instances ({self.instances}) must be >= orgs ({self.orgs}): "
                "every org has at least one instance"
            )
        if self.seed < 0:
            raise ValueError(f"SeedSpec.seed must be >= 0, got {self.seed}")
        end_date = self.end_date
        if isinstance(end_date, dt.datetime):
            object.__setattr__(self, "end_date", end_date.date())
        elif not isinstance(end_date, dt.date):
            raise ValueError(f"SeedSpec.end_date must be a date, got {end_date!r}")
        providers = tuple(self.providers)
        if not providers or any(p not in PROVIDERS for p in providers):
            raise ValueError(f"SeedSpec.providers must be a non-empty subset of {PROVIDERS}")
        object.__setattr__(self, "providers", providers)

    @property
    def window_days(self) -> int:
        """Days of heartbeats: the usage days plus the look-back day before them."""
        return self.days + 1

    @property
    def window_start(self) -> dt.datetime:
        """Start of the look-back day (UTC)."""
        first = self.end_date - dt.timedelta(days=self.days)
        return dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)

    @property
    def window_end(self) -> dt.datetime:
        """Midnight after end_date (UTC), exclusive."""
        return dt.datetime.combine(self.end_date + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)

    @property
    def usage_dates(self) -> list[dt.date]:
        return [self.end_date - dt.timedelta(days=k) for k in range(self.days - 1, -1, -1)]


# --------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    """Everything but heartbeats, as arrays; times in epoch microseconds."""

    spec: SeedSpec
    window_start_us: int
    organizations: pd.DataFrame
    throttle: pd.DataFrame
    org_ids: np.ndarray  # object
    instance_ids: list[str]
    unknown_ids: list[str]
    inst_org: np.ndarray  # int64 index into org_ids
    inst_tier: np.ndarray  # int64 index into TIERS
    inst_status: np.ndarray  # int64 index into STATUSES
    profile: np.ndarray
    created_us: np.ndarray
    stopped_us: np.ndarray  # NAT when not stopped
    beats_from_us: np.ndarray  # heartbeats sent in [beats_from, beats_until)
    beats_until_us: np.ndarray
    quarantine_from_us: np.ndarray  # stopped_at (after_stop), else NEVER

    @property
    def window_us(self) -> int:
        return self.spec.window_days * DAY_S * US


@dataclass
class _Stats:
    """Accumulated while heartbeats stream: what instances and counters need."""

    coverage: np.ndarray  # (instances, window_days) seconds
    last_heartbeat_us: np.ndarray  # NAT when none


def _to_us(value: dt.datetime) -> int:
    return int(value.timestamp()) * US


def _ts(values_us: np.ndarray) -> pd.Series:
    """Epoch microseconds (NAT = null) as a UTC datetime Series."""
    return pd.Series(np.asarray(values_us, dtype=np.int64).view("M8[us]")).dt.tz_localize("UTC")


# Every step below draws from the plan's one Generator; the steps run in a fixed
# order (that of `_plan`), so the same seed gives the same draws and the same data.


@dataclass(frozen=True)
class _Window:
    """The heartbeat window in epoch microseconds: [start, end), and the start of
    the usage days (the day after the look-back day)."""

    start: int
    end: int
    period_start: int

    @classmethod
    def of(cls, spec: SeedSpec) -> _Window:
        start = _to_us(spec.window_start)
        return cls(start=start, end=_to_us(spec.window_end), period_start=start + DAY_S * US)


def _customer_ids(
    rng: np.random.Generator, org_ids: np.ndarray, providers: list[str]
) -> list[str | None]:
    """Stripe `cus_` ids, Polar external ids; with five orgs or more one has none."""
    n_orgs = org_ids.size
    stripe_suffix = _ALPHANUM[rng.integers(len(_ALPHANUM), size=(n_orgs, 10))]
    customer_ids: list[str | None] = [
        "cus_" + b"".join(stripe_suffix[i]).decode()
        if provider == "stripe"
        else f"ext_{org_ids[i]}"
        for i, provider in enumerate(providers)
    ]
    if n_orgs >= 5:
        customer_ids[int(rng.integers(1, n_orgs))] = None
    return customer_ids


def _organizations(
    spec: SeedSpec, rng: np.random.Generator, window: _Window
) -> tuple[np.ndarray, pd.DataFrame]:
    """Org ids and the organizations table: names, plans, providers, customers."""
    n_orgs = spec.orgs
    org_ids = np.array([f"org-{i + 1:04d}" for i in range(n_orgs)], dtype=object)
    names = [
        f"{_ADJECTIVES[a]} {_NOUNS[b]} {_SUFFIXES[c]}"
        for a, b, c in zip(
            rng.integers(len(_ADJECTIVES), size=n_orgs),
            rng.integers(len(_NOUNS), size=n_orgs),
            rng.integers(len(_SUFFIXES), size=n_orgs),
            strict=True,
        )
    ]
    plans = np.array(PLANS, dtype=object)[rng.permutation(np.arange(n_orgs) % len(PLANS))]
    providers = [spec.providers[i % len(spec.providers)] for i in range(n_orgs)]
    customer_ids = _customer_ids(rng, org_ids, providers)
    org_created = window.start - (rng.uniform(30, 900, n_orgs) * DAY_S).astype(np.int64) * US
    organizations = pd.DataFrame(
        {
            "org_id": pd.Series(org_ids, dtype="str"),
            "name": pd.Series(names, dtype="str"),
            "billing_email": pd.Series([f"billing@{o}.example" for o in org_ids], dtype="str"),
            "plan": pd.Series(plans, dtype="str"),
            "provider": pd.Series(providers, dtype="str"),
            "provider_customer_id": pd.Series(customer_ids, dtype="str"),
            "created_at": _ts(org_created),
        }
    )
    return org_ids, organizations


def _throttle(rng: np.random.Generator, org_ids: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """About a third of the orgs (their indexes, sorted), one tight limit each (or all
    three), and the throttle_settings table."""
    n_orgs = org_ids.size
    n_throttled = (n_orgs + 2) // 3
    throttled = np.sort(rng.choice(n_orgs, n_throttled, replace=False))
    limits = np.tile(np.array(DEFAULT_LIMITS, dtype=np.int64), (n_throttled, 1))
    kinds = np.arange(n_throttled) % 4
    tight = np.column_stack(
        [
            rng.integers(8, 17, n_throttled) * 15,  # continuous 120-240 min
            rng.integers(8, 21, n_throttled) * 30,  # daily 240-600 min
            rng.integers(10, 21, n_throttled),  # idle 10-20 min
        ]
    )
    for column in range(3):
        pick = (kinds == column) | (kinds == 3)
        limits[pick, column] = tight[pick, column]
    throttle = pd.DataFrame(
        {
            "org_id": pd.Series(org_ids[throttled], dtype="str"),
            "continuous_limit_minutes": limits[:, 0],
            "daily_limit_minutes": limits[:, 1],
            "idle_timeout_minutes": limits[:, 2],
        }
    )
    return throttled, throttle


@dataclass
class _Instances:
    """The instances' draws, before anomalies and times (arrays of length n)."""

    org: np.ndarray  # int64 index into org_ids, sorted
    ids: list[str]
    unknown_ids: list[str]  # ids no instance has (for unknown-instance heartbeats)
    tier: np.ndarray
    status: np.ndarray
    profile: np.ndarray
    forced: np.ndarray  # bool: the 24/7 first instance of a throttled org


def _instances(spec: SeedSpec, rng: np.random.Generator, throttled: np.ndarray) -> _Instances:
    """One instance per org, the rest skewed towards a few big orgs; the first
    instance of every throttled org runs 24/7, so its caps bite."""
    n_orgs, n = spec.orgs, spec.instances
    weights = rng.gamma(0.6, size=n_orgs) + 0.02
    extra = rng.choice(n_orgs, n - n_orgs, p=weights / weights.sum())
    inst_org = np.sort(np.concatenate([np.arange(n_orgs), extra])).astype(np.int64)
    raw_ids = rng.choice(2**32, n + UNKNOWN_ID_POOL, replace=False)
    all_ids = [f"i-{int(v):08x}" for v in raw_ids]
    inst_tier = rng.choice(len(TIERS), n, p=TIER_WEIGHTS).astype(np.int64)
    status = rng.choice(len(STATUSES), n, p=STATUS_WEIGHTS).astype(np.int64)
    profile = rng.choice(3, n, p=PROFILE_WEIGHTS).astype(np.int64)

    first_of_org = np.searchsorted(inst_org, np.arange(n_orgs))
    forced = np.zeros(n, dtype=bool)
    forced[first_of_org[throttled]] = True
    status[forced] = 0
    profile[forced] = ALWAYS_ON
    return _Instances(inst_org, all_ids[:n], all_ids[n:], inst_tier, status, profile, forced)


def _created_times(rng: np.random.Generator, forced: np.ndarray, window: _Window) -> np.ndarray:
    """Creation times (whole seconds): long before the window, about 8 % during it."""
    n = forced.size
    created = window.start - (rng.uniform(1, 400, n) * DAY_S * US).astype(np.int64)
    new_in_period = (rng.random(n) < 0.08) & ~forced
    created[new_in_period] = window.period_start + (
        rng.random(new_in_period.sum()) * (window.end - 6 * 3600 * US - window.period_start)
    ).astype(np.int64)
    return created // US * US


def _zombies_and_stuck(
    spec: SeedSpec, rng: np.random.Generator, instances: _Instances
) -> tuple[np.ndarray, np.ndarray]:
    """With anomalies: stopped instances that still heartbeat (zombies) and running
    ones gone silent (stuck), both made 24/7; at least one stopped instance, one
    zombie and up to two stuck ones. Updates `instances.status` / `.profile`."""
    status, forced = instances.status, instances.forced
    n = status.size
    zombie = np.zeros(n, dtype=bool)
    stuck = np.zeros(n, dtype=bool)
    if spec.anomalies:
        free = np.flatnonzero(~forced)
        if not (status[free] == 2).any() and free.size >= 4:
            status[free[int(rng.integers(free.size))]] = 2
        stopped = np.flatnonzero((status == 2) & ~forced)
        zombie[stopped[rng.random(stopped.size) < 0.3]] = True
        if stopped.size and not zombie.any():
            zombie[stopped[0]] = True
        running = np.flatnonzero((status == 0) & ~forced)
        stuck[running[rng.random(running.size) < 0.04]] = True
        want = min(2, running.size // 4)
        if stuck.sum() < want:
            stuck[running[:want]] = True
        instances.profile[zombie | stuck] = ALWAYS_ON
    return zombie, stuck


def _stop_times(
    rng: np.random.Generator, status: np.ndarray, created: np.ndarray, window: _Window
) -> np.ndarray:
    """stopped_at of stopped instances (whole seconds, at least an hour after
    creation and before the window's end); NAT for the others."""
    n = status.size
    stopped_us = np.full(n, NAT, dtype=np.int64)
    is_stopped = status == 2
    stop_lo = np.maximum(created, window.period_start) + 3600 * US
    stop_hi = window.end - 3600 * US
    stopped_us[is_stopped] = (
        (stop_lo + rng.random(n) * np.maximum(stop_hi - stop_lo, US))[is_stopped].astype(np.int64)
        // US
        * US
    )
    return stopped_us


def _beats_until(
    rng: np.random.Generator,
    status: np.ndarray,
    stopped_us: np.ndarray,
    zombie: np.ndarray,
    stuck: np.ndarray,
    window: _Window,
) -> np.ndarray:
    """When each instance stops heartbeating: the window's end, its stop (zombies
    beat on), 4-36 h before the end when paused, 3-20 h when stuck."""
    n = status.size
    beats_until = np.full(n, window.end, dtype=np.int64)
    stop_beats = (status == 2) & ~zombie
    beats_until[stop_beats] = stopped_us[stop_beats]
    paused = status == 1
    beats_until[paused] = window.end - (rng.uniform(4, 36, n) * 3600 * US).astype(np.int64)[paused]
    beats_until[stuck] = window.end - (rng.uniform(3, 20, n) * 3600 * US).astype(np.int64)[stuck]
    return beats_until


def _plan(spec: SeedSpec) -> _Plan:
    rng = np.random.default_rng([spec.seed, 0])
    window = _Window.of(spec)
    org_ids, organizations = _organizations(spec, rng, window)
    throttled, throttle = _throttle(rng, org_ids)
    instances = _instances(spec, rng, throttled)
    created = _created_times(rng, instances.forced, window)
    zombie, stuck = _zombies_and_stuck(spec, rng, instances)
    stopped_us = _stop_times(rng, instances.status, created, window)
    beats_until = _beats_until(rng, instances.status, stopped_us, zombie, stuck, window)
    return _Plan(
        spec=spec,
        window_start_us=window.start,
        organizations=organizations,
        throttle=throttle,
        org_ids=org_ids,
        instance_ids=instances.ids,
        unknown_ids=instances.unknown_ids,
        inst_org=instances.org,
        inst_tier=instances.tier,
        inst_status=instances.status,
        profile=instances.profile,
        created_us=created,
        stopped_us=stopped_us,
        beats_from_us=np.maximum(created, window.start),
        beats_until_us=beats_until,
        quarantine_from_us=np.where(instances.status == 2, stopped_us, NEVER),
    )


def _chunk_ranges(spec: SeedSpec) -> list[tuple[int, int]]:
    per_chunk = max(1, CHUNK_MAX_ROWS // (spec.window_days * DAY_S // HEARTBEAT_S))
    return [(lo, min(lo + per_chunk, spec.instances)) for lo in range(0, spec.instances, per_chunk)]


# --------------------------------------------------------------------------- heartbeats


def _mark_spans(total: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Boolean mask of length total, True inside any [start, end)."""
    diff = np.zeros(total + 1, dtype=np.int32)
    np.add.at(diff, starts, 1)
    np.add.at(diff, ends, -1)
    return np.cumsum(diff[:-1]) > 0


def _spans_in_sessions(
    rng: np.random.Generator,
    n_beats: np.ndarray,
    offsets: np.ndarray,
    per_beats: float,
    lengths: Callable[[int], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Random spans of beats inside sessions: ~one per `per_beats` beats."""
    counts = rng.poisson(n_beats / per_beats)
    session = np.repeat(np.arange(n_beats.size), counts)
    start = offsets[session] + (rng.random(session.size) * n_beats[session]).astype(np.int64)
    end = np.minimum(start + lengths(session.size), offsets[session] + n_beats[session])
    return start, end


def _clean_beats(
    plan: _Plan, rng: np.random.Generator, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance index (global), sent_at (epoch us) and active of one chunk's genuine
    heartbeats, sorted by instance then time."""
    m = hi - lo
    window_s = plan.spec.window_days * DAY_S
    cols = int(window_s / 3960) + 3  # enough on/off cycles for the busiest worker
    profile = plan.profile[lo:hi, None]

    on = rng.uniform(1, 12, (m, cols)) * 3600
    off = np.where(
        rng.random((m, cols)) < 0.35,
        rng.uniform(360, 3600, (m, cols)),
        rng.uniform(3, 14, (m, cols)) * 3600,
    )
    sporadic_on = rng.uniform(0.5, 4, (m, cols)) * 3600
    sporadic_off = rng.uniform(8, 40, (m, cols)) * 3600
    on = np.where(profile == SPORADIC, sporadic_on, on)
    off = np.where(profile == SPORADIC, sporadic_off, off)
    on = np.where(profile == ALWAYS_ON, window_s + 3600.0, on)
    offset = np.where(
        plan.profile[lo:hi] == ALWAYS_ON, rng.uniform(0, 1800, m), rng.uniform(0, 10 * 3600, m)
    )
    cycle = on + off
    starts = offset[:, None] + np.concatenate(
        [np.zeros((m, 1)), np.cumsum(cycle, axis=1)[:, :-1]], axis=1
    )
    ends = starts + on

    ws = plan.window_start_us
    begin_s = ((plan.beats_from_us[lo:hi] - ws) / US)[:, None]
    until_s = ((plan.beats_until_us[lo:hi] - ws) / US)[:, None]
    s = np.maximum(starts, begin_s)
    e = np.minimum(np.minimum(ends, until_s), window_s)
    keep = e - s > 1.0
    sess_inst = np.broadcast_to(np.arange(lo, hi)[:, None], (m, cols))[keep]
    s, e = s[keep], e[keep]

    n_beats = np.ceil((e - s) / HEARTBEAT_S).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_beats)[:-1]]).astype(np.int64)
    total = int(n_beats.sum())
    beat_sess = np.repeat(np.arange(n_beats.size), n_beats)
    k = np.arange(total, dtype=np.int64) - offsets[beat_sess]
    t = s[beat_sess] + HEARTBEAT_S * k + rng.uniform(-2.0, 2.0, total)

    # gaps: 1-3 missed beats (<= 300 s, same session) or 5-9 (> 300 s, a new one)
    gap_start, gap_end = _spans_in_sessions(
        rng,
        n_beats,
        offsets,
        200.0,
        lambda size: np.where(
            rng.random(size) < 0.5, rng.integers(1, 4, size), rng.integers(5, 10, size)
        ),
    )
    dropped = _mark_spans(total, gap_start, gap_end)
    # idle stretches of 10-90 min, and the odd idle minute
    idle_start, idle_end = _spans_in_sessions(
        rng, n_beats, offsets, 150.0, lambda size: rng.integers(10, 91, size)
    )
    active = ~(_mark_spans(total, idle_start, idle_end) | (rng.random(total) < 0.01))

    inst = sess_inst[beat_sess]
    local = inst - lo
    keep = ~dropped & (t >= 0) & (t < window_s) & (t >= begin_s[local, 0]) & (t < until_s[local, 0])
    sent_us = ws + np.rint(t[keep] * US).astype(np.int64)
    return inst[keep], sent_us, active[keep]


def _coverage(plan: _Plan, inst: np.ndarray, sent_us: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Seconds covered per (instance, window day) by sessions of billable beats."""
    cov = np.zeros((hi - lo, plan.spec.window_days), dtype=np.int64)
    valid = sent_us < plan.quarantine_from_us[inst]
    inst, sec = inst[valid], (sent_us[valid] - plan.window_start_us) // US
    if not inst.size:
        return cov
    new = np.ones(inst.size, dtype=bool)
    new[1:] = (inst[1:] != inst[:-1]) | (np.diff(sec) > MAX_GAP_S)
    first = np.flatnonzero(new)
    last = np.append(first[1:], inst.size) - 1
    start, end, owner = sec[first], sec[last] + HEARTBEAT_S, inst[first] - lo
    for day in range(plan.spec.window_days):
        overlap = np.clip(
            np.minimum(end, (day + 1) * DAY_S) - np.maximum(start, day * DAY_S), 0, None
        )
        cov[:, day] = (
            np.bincount(owner, weights=overlap, minlength=hi - lo).round().astype(np.int64)
        )
    return cov


@dataclass
class _Rows:
    inst: np.ndarray  # global index; >= instances: unknown pool; -1: NULL
    sent_us: np.ndarray  # NAT: NULL
    active: np.ndarray  # int8: 1, 0, -1 NULL
    received_us: np.ndarray

    def take(self, index: np.ndarray) -> _Rows:
        return _Rows(
            self.inst[index], self.sent_us[index], self.active[index], self.received_us[index]
        )

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        return _Rows(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("inst", "sent_us", "active", "received_us")
            )
        )


def _received(rng: np.random.Generator, sent_us: np.ndarray) -> np.ndarray:
    delay = 50_000 + rng.exponential(250_000, sent_us.size)
    late = rng.random(sent_us.size) < 0.005
    delay[late] += rng.uniform(1, 120, late.sum()) * US
    return sent_us + delay.astype(np.int64)


def _with_anomalies(plan: _Plan, rng: np.random.Generator, rows: _Rows) -> _Rows:
    size = rows.inst.size
    if size == 0:
        return rows
    # duplicates, right after the original: identical / conflicting active / same second
    dup = rng.random(size) < 0.002
    dup[rng.choice(size, min(3, size), replace=False)] = True
    counts = 1 + dup.astype(np.int64)
    copies = np.cumsum(counts)[dup] - 1
    rows = rows.take(np.repeat(np.arange(size), counts))
    mode = np.arange(copies.size) % 3
    conflicting, same_second = copies[mode == 1], copies[mode == 2]
    rows.active[conflicting] = 1 - rows.active[conflicting]
    rows.received_us[conflicting] += (rng.uniform(1, 30, conflicting.size) * US).astype(np.int64)
    rows.sent_us[same_second] = rows.sent_us[same_second] // US * US + rng.integers(
        0, US, same_second.size
    )
    rows.received_us[same_second] = np.maximum(
        rows.received_us[same_second], rows.sent_us[same_second] + 1000
    )
    size = rows.inst.size
    rows.active[rng.choice(size, 1 + rng.poisson(size * 5e-4), replace=False)] = -1

    def sample(count: int) -> _Rows:
        return rows.take(rng.choice(size, count))

    def few() -> int:
        return 1 + int(rng.poisson(size * 1e-5))

    null_id = sample(few())
    null_id.inst[:] = -1
    null_sent = sample(few())
    null_sent.sent_us[:] = NAT
    future = sample(few())
    future.sent_us = future.received_us + (
        rng.uniform(30, 80, future.inst.size) * 365.25 * DAY_S * US
    ).astype(np.int64)
    future.active[:] = 1
    # unknown instances: short bursts of well-formed heartbeats
    bursts = []
    for _ in range(few()):
        beats = int(rng.integers(3, 16))
        origin = int(rows.sent_us[rng.integers(size)])
        if origin == NAT:
            continue
        sent = origin + HEARTBEAT_S * US * np.arange(beats) + rng.integers(-2 * US, 2 * US, beats)
        bursts.append(
            _Rows(
                np.full(beats, plan.spec.instances + int(rng.integers(UNKNOWN_ID_POOL))),
                sent,
                np.ones(beats, dtype=np.int8),
                _received(rng, sent),
            )
        )
    return _Rows.concat([rows, null_id, null_sent, future, *bursts])


def _frame(plan: _Plan, rows: _Rows) -> pd.DataFrame:
    dictionary = pa.array(plan.instance_ids + plan.unknown_ids, type=pa.string())
    indices = pa.array(rows.inst.astype(np.int32), mask=rows.inst < 0)
    return pd.DataFrame(
        {
            "instance_id": pc.take(dictionary, indices).to_pandas(),
            "sent_at": _ts(rows.sent_us),
            "active": pd.arrays.BooleanArray(rows.active == 1, rows.active < 0),
            "received_at": _ts(rows.received_us),
        }
    )


def _iter_chunks(plan: _Plan, stats: _Stats | None = None) -> Iterator[pd.DataFrame]:
    for chunk, (lo, hi) in enumerate(_chunk_ranges(plan.spec)):
        rng = np.random.default_rng([plan.spec.seed, 1, chunk])
        inst, sent_us, active = _clean_beats(plan, rng, lo, hi)
        if stats is not None:
            stats.coverage[lo:hi] = _coverage(plan, inst, sent_us, lo, hi)
            np.maximum.at(stats.last_heartbeat_us, inst, sent_us)
        rows = _Rows(inst, sent_us, active.astype(np.int8), _received(rng, sent_us))
        if plan.spec.anomalies:
            rows = _with_anomalies(plan, rng, rows)
        yield _frame(plan, rows)


def iter_heartbeat_chunks(spec: SeedSpec) -> Iterator[pd.DataFrame]:
    """The heartbeats of `spec` in chunks of at most ~1M rows (a group of instances
    each); concatenated they equal `generate(spec)["heartbeats"]`."""
    return _iter_chunks(_plan(spec))


def _new_stats(plan: _Plan) -> _Stats:
    n = plan.spec.instances
    return _Stats(
        coverage=np.zeros((n, plan.spec.window_days), dtype=np.int64),
        last_heartbeat_us=np.full(n, NAT, dtype=np.int64),
    )


# --------------------------------------------------------------------------- derived tables


def _instances_frame(plan: _Plan, stats: _Stats) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "instance_id": pd.Series(plan.instance_ids, dtype="str"),
            "org_id": pd.Series(plan.org_ids[plan.inst_org], dtype="str"),
            "tier": pd.Series(np.array(TIERS, dtype=object)[plan.inst_tier], dtype="str"),
            "status": pd.Series(np.array(STATUSES, dtype=object)[plan.inst_status], dtype="str"),
            "created_at": _ts(plan.created_us),
            "stopped_at": _ts(plan.stopped_us),
            "last_heartbeat": _ts(stats.last_heartbeat_us),
        }
    )


def _usage_counters(plan: _Plan, stats: _Stats) -> pd.DataFrame:
    spec = plan.spec
    rng = np.random.default_rng([spec.seed, 3])
    key = plan.inst_org * len(TIERS) + plan.inst_tier
    totals = np.zeros((spec.orgs * len(TIERS), spec.days), dtype=np.int64)
    np.add.at(totals, key, stats.coverage[:, 1:])  # column 0 is the look-back day
    # rows ordered by org, day, tier
    grid = totals.reshape(spec.orgs, len(TIERS), spec.days).transpose(0, 2, 1)
    org, day, tier = np.nonzero(grid > 0)
    runtime = grid[org, day, tier]
    present = np.ones(org.size, dtype=bool)
    if spec.anomalies and org.size:
        missing = rng.random(org.size) < 0.03
        if org.size >= 10 and not missing.any():
            missing[rng.integers(org.size)] = True
        drift = (rng.random(org.size) < 0.1) & ~missing
        if not drift.any() and (~missing).any():
            drift[np.flatnonzero(~missing)[0]] = True
        factor = 1 + rng.choice([-1.0, 1.0], org.size) * rng.uniform(0.02, 0.15, org.size)
        runtime = np.where(drift, np.rint(runtime * factor).astype(np.int64), runtime)
        present = ~missing
    org, day, tier, runtime = org[present], day[present], tier[present], runtime[present]

    day_us = _to_us(spec.window_start) + (day + 1).astype(np.int64) * DAY_S * US
    updated = day_us + (DAY_S - 1) * US  # 23:59:59 that day
    reconciled = (day < spec.days - 1) & (rng.random(org.size) < 0.7)
    reconciled_at = np.where(
        reconciled, updated + (rng.uniform(1, 6, org.size) * 3600).astype(np.int64) * US, NAT
    )
    dates = np.array(spec.usage_dates, dtype=object)
    return pd.DataFrame(
        {
            "org_id": pd.Series(plan.org_ids[org], dtype="str"),
            "usage_date": pd.Series(dates[day], dtype=object),
            "tier": pd.Series(np.array(TIERS, dtype=object)[tier], dtype="str"),
            "runtime_seconds": runtime.astype(np.int64),
            "last_reconciled_at": _ts(reconciled_at),
            "updated_at": _ts(updated),
        }
    )


# --------------------------------------------------------------------------- public API


def generate(spec: SeedSpec) -> dict[str, pd.DataFrame]:
    """All five control-plane tables as DataFrames (columns as sql/source_schema.sql).
    Pure and deterministic; only for small specs (use `seed`/`iter_heartbeat_chunks`
    to stream big ones)."""
    instance_days = spec.instances * spec.window_days
    if instance_days > GENERATE_MAX_INSTANCE_DAYS:
        raise ValueError(
            f"generate() holds everything in memory and allows at most "
            f"{GENERATE_MAX_INSTANCE_DAYS} instance-days (instances x (days + 1)), got "
            f"{instance_days}; use seed() or iter_heartbeat_chunks() to stream"
        )
    plan = _plan(spec)
    stats = _new_stats(plan)
    heartbeats = pd.concat(list(_iter_chunks(plan, stats)), ignore_index=True)
    return {
        "organizations": plan.organizations,
        "throttle_settings": plan.throttle,
        "instances": _instances_frame(plan, stats),
        "heartbeats": heartbeats,
        "usage_counters": _usage_counters(plan, stats),
    }


def lazy_frames(spec: SeedSpec) -> dict[str, Any]:
    """Frames for `load` without holding heartbeats in memory: heartbeats is an
    iterator of chunks; instances and usage_counters are callables, ready once the
    heartbeats have been consumed (load does it in LOAD_ORDER)."""
    plan = _plan(spec)
    stats = _new_stats(plan)
    return {
        "organizations": plan.organizations,
        "throttle_settings": plan.throttle,
        "heartbeats": _iter_chunks(plan, stats),
        "instances": lambda: _instances_frame(plan, stats),
        "usage_counters": lambda: _usage_counters(plan, stats),
    }


def load(engine: Engine, frames: dict[str, Any], *, replace: bool = True) -> dict[str, int]:
    """COPY frames into the control-plane tables, in one transaction; returns row
    counts per table. A value may be a DataFrame, (heartbeats) an iterable of
    DataFrames, or a zero-argument callable returning either, called in LOAD_ORDER.
    replace=True first truncates all five control-plane tables."""
    unknown = set(frames) - set(TABLES)
    if unknown:
        raise ValueError(f"unknown tables {sorted(unknown)}; expected some of {TABLES}")
    counts: dict[str, int] = {}
    with raw_connection(engine) as connection, connection.cursor() as cursor:
        if replace:
            cursor.execute("TRUNCATE " + ", ".join(reversed(LOAD_ORDER)))
        for table in LOAD_ORDER:
            if table not in frames:
                continue
            value = frames[table]
            if callable(value):
                value = value()
            if table == "heartbeats":
                counts[table] = _copy_heartbeats(cursor, value, empty_table=replace)
            else:
                counts[table] = _copy_rows(cursor, table, value)
    return counts


def seed(engine: Engine, spec: SeedSpec) -> dict[str, int]:
    """Create the control-plane tables if needed and fill them with `spec`'s data,
    replacing what was there; heartbeats stream in chunks. Returns row counts."""
    create_control_plane(engine)
    return load(engine, lazy_frames(spec), replace=True)


# --------------------------------------------------------------------------- COPY


def _copy_rows(cursor: psycopg.Cursor, table: str, frame: pd.DataFrame) -> int:
    columns = COLUMNS[table]
    frame = frame[columns]
    values = [
        [
            None if pd.isna(v) else (v.to_pydatetime() if isinstance(v, pd.Timestamp) else v)
            for v in frame[column].astype(object)
        ]
        for column in columns
    ]
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in zip(*values, strict=True):
            copy.write_row(row)
    return len(frame)


_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_BINARY_TRAILER = b"\xff\xff"


def _micros_2000(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps as PostgreSQL binary timestamptz (us since 2000) and a null mask."""
    utc = pd.to_datetime(series, utc=True).dt.tz_localize(None).to_numpy("datetime64[us]")
    micros = utc.view(np.int64)
    null = micros == NAT
    return micros - EPOCH_2000_US, null


def _heartbeat_copy_data(frame: pd.DataFrame) -> Iterator[bytes]:
    """Rows of `frame` in PostgreSQL's binary COPY format, vectorised over runs of
    rows with the same layout (instance_id length and which fields are NULL)."""
    codes, uniques = pd.factorize(frame["instance_id"])
    encoded = [str(u).encode() for u in uniques]
    lengths = np.array([len(b) for b in encoded] + [-1], dtype=np.int64)
    id_table = np.array(encoded + [b""], dtype=f"S{max(1, int(lengths.max()))}")
    id_len = lengths[codes]  # code -1 (NULL) picks the appended -1
    sent, sent_null = _micros_2000(frame["sent_at"])
    received, received_null = _micros_2000(frame["received_at"])
    if received_null.any():
        raise ValueError("heartbeats.received_at must not be NULL")
    active_arr = pd.array(frame["active"], dtype="boolean")
    active_null = np.asarray(active_arr.isna())
    active = np.asarray(active_arr.fillna(False), dtype=np.uint8)

    key = id_len * 4 + sent_null * 2 + active_null
    bounds = np.concatenate([[0], np.flatnonzero(key[1:] != key[:-1]) + 1, [key.size]])
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        if start == stop:
            continue
        part = slice(start, stop)
        length = int(id_len[start])
        fields: list[tuple[str, str]] = [("count", ">i2"), ("id_len", ">i4")]
        if length > 0:
            fields.append(("id", f"S{length}"))
        fields.append(("sent_len", ">i4"))
        if not sent_null[start]:
            fields.append(("sent", ">i8"))
        fields.append(("active_len", ">i4"))
        if not active_null[start]:
            fields.append(("active", "u1"))
        fields += [("received_len", ">i4"), ("received", ">i8")]
        block = np.empty(stop - start, dtype=np.dtype(fields))
        block["count"] = 4
        block["id_len"] = length
        if length > 0:
            block["id"] = id_table[codes[part]].astype(f"S{length}")
        block["sent_len"] = -1 if sent_null[start] else 8
        if not sent_null[start]:
            block["sent"] = sent[part]
        block["active_len"] = -1 if active_null[start] else 1
        if not active_null[start]:
            block["active"] = active[part]
        block["received_len"] = 8
        block["received"] = received[part]
        yield block.tobytes()


def _copy_heartbeats(
    cursor: psycopg.Cursor, value: pd.DataFrame | Iterable[pd.DataFrame], *, empty_table: bool
) -> int:
    """Binary COPY of heartbeat chunks. Into a just-truncated table the indexes are
    dropped and rebuilt after the copy (same definitions, same transaction): ~3x
    faster than maintaining them row by row."""
    chunks = [value] if isinstance(value, pd.DataFrame) else value
    indexes: list[tuple[str, str]] = []
    if empty_table:
        cursor.execute(  # plain indexes only: constraint-backed ones stay
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)"
            " FROM pg_index i WHERE i.indrelid = 'heartbeats'::regclass"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"
        )
        indexes = cursor.fetchall()
        for name, _definition in indexes:
            cursor.execute(f"DROP INDEX {name}")
    rows = 0
    columns = ", ".join(COLUMNS["heartbeats"])
    options = "FORMAT binary, FREEZE" if empty_table else "FORMAT binary"
    with cursor.copy(f"COPY heartbeats ({columns}) FROM STDIN ({options})") as copy:
        copy.write(_BINARY_HEADER)
        for frame in chunks:
            for data in _heartbeat_copy_data(frame[COLUMNS["heartbeats"]]):
                copy.write(data)
            rows += len(frame)
        copy.write(_BINARY_TRAILER)
    if indexes:
        cursor.execute("SET LOCAL maintenance_work_mem = '256MB'")
        for _name, definition in indexes:
            cursor.execute(definition)
    return rows


# --------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `tally seed`; values are validated by run_from_args."""
    defaults = SeedSpec(end_date=dt.date(2000, 1, 1))
    parser.add_argument(
        "--orgs",
        default=defaults.orgs,
        metavar="N",
        help=f"organizations (default {defaults.orgs})",
    )
    parser.add_argument(
        "--instances",
        default=defaults.instances,
        metavar="N",
        help=f"instances in total, at least --orgs (default {defaults.instances})",
    )
    parser.add_argument(
        "--days",
        default=defaults.days,
        metavar="N",
        help=f"usage days ending at --end-date (default {defaults.days})",
    )
    parser.add_argument(
        "--seed",
        default=defaults.seed,
        metavar="N",
        help=f"random seed, same flags same data (default {defaults.seed})",
    )
    parser.add_argument(
        "--end-date",
        default=None,
        metavar="YYYY-MM-DD",
        help="last usage day (default yesterday, UTC)",
    )
    parser.add_argument(
        "--no-anomalies",
        action="store_true",
        help="clean data: no duplicates, malformed rows, zombies or drift",
    )


def _int_flag(args: argparse.Namespace, name: str, default: int, minimum: int) -> int:
    flag = "--" + name.replace("_", "-")
    value = getattr(args, name, None)
    value = default if value is None else value
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        kind = "a positive integer" if minimum > 0 else "an integer >= 0"
        raise ValueError(f"{flag} must be {kind}, got {value!r}; e.g. {flag} {max(default, 1)}")
    return number


def spec_from_args(args: argparse.Namespace) -> SeedSpec:
    """A SeedSpec from parsed flags; ValueError naming the flag and the fix."""
    defaults = SeedSpec(end_date=dt.date(2000, 1, 1))
    orgs = _int_flag(args, "orgs", defaults.orgs, 1)
    instances = _int_flag(args, "instances", defaults.instances, 1)
    days = _int_flag(args, "days", defaults.days, 1)
    seed_value = _int_flag(args, "seed", defaults.seed, 0)
    if instances < orgs:
        raise ValueError(
            f"--instances ({instances}) must be at least --orgs ({orgs}), every org needs an "
            f"instance; raise --instances to {orgs} or lower --orgs"
        )
    end_date = getattr(args, "end_date", None)
    if end_date is None:
        end_date = _yesterday()
    elif not isinstance(end_date, dt.date):
        try:
            end_date = dt.date.fromisoformat(str(end_date).strip())
        except ValueError:
            raise ValueError(
                f"--end-date must be a date as YYYY-MM-DD, got {end_date!r}; e.g. --end-date "
                f"{_yesterday().isoformat()}"
            ) from None
    today = dt.datetime.now(dt.UTC).date()
    if end_date > today:
        raise ValueError(
            f"--end-date {end_date} is in the future (today is {today} UTC); seed days up "
            f"to today, e.g. --end-date {_yesterday().isoformat()}"
        )
    if days >= (end_date - dt.date.min).days:
        raise ValueError(
            f"--days {days} reaches before the first day of the calendar from --end-date "
            f"{end_date}; lower --days, e.g. --days {defaults.days}"
        )
    return SeedSpec(
        orgs=orgs,
        instances=instances,
        days=days,
        end_date=end_date,
        seed=seed_value,
        anomalies=not getattr(args, "no_anomalies", False),
    )


def run_from_args(args: argparse.Namespace, engine: Engine) -> dict[str, int]:
    """`tally seed`: validate the flags, then seed the control-plane database."""
    return seed(engine, spec_from_args(args))
