"""Providers as they really behave (DESIGN §8): Stripe processes meter events and
cancels asynchronously, so for a while after a push what it shows is short of what
was sent (or, after a cancel, more than is billable). A difference of that shape at
a (provider, customer) tally touched less than the settlement window ago is
`provider_settling` — WARN, not money-moving, no credit — until a later read shows
it settled (or it becomes the discrepancy it really is).

Only the lag's own shapes settle: missing/under after a recent send, over after a
recent cancel. A double charge (over with no recent cancel) or a wrong tier (totals
agree) is never explained by lag and is reported at once."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from assets.discrepancy import DiscrepancyKind, missing
from resources.providers.base import Provider

Kind = DiscrepancyKind
Target = tuple[str, str]  # (provider, customer)

SHORT_KINDS = frozenset({Kind.PROVIDER_MISSING, Kind.PROVIDER_UNDER})
OVER_KINDS = frozenset({Kind.PROVIDER_OVER, Kind.CAP_EXCEEDED})


def _seconds_setting(name: str, default: int) -> int:
    from resources.settings import SettingInvalid

    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise SettingInvalid(f"{name}={raw!r} is not a number of seconds; set it to 0 or more")
    return value


@dataclass(frozen=True)
class SettlementRules:
    """`window`: how long after a send or cancel a difference may be the provider
    still processing (TALLY_SETTLE_WINDOW_S, default 2 h). `wait`: how long the
    read-back re-reads while differences are settling (TALLY_SETTLE_WAIT_S, default
    300 s), every `poll` seconds (TALLY_SETTLE_POLL_S, default 10). `lookback_days`:
    how far back earlier days with settling rows are re-read (Stripe's window)."""

    window: dt.timedelta = dt.timedelta(hours=2)
    wait: dt.timedelta = dt.timedelta(seconds=300)
    poll: dt.timedelta = dt.timedelta(seconds=10)
    lookback_days: int = 35

    @classmethod
    def from_env(cls) -> SettlementRules:
        return cls(
            window=dt.timedelta(seconds=_seconds_setting("TALLY_SETTLE_WINDOW_S", 7200)),
            wait=dt.timedelta(seconds=_seconds_setting("TALLY_SETTLE_WAIT_S", 300)),
            poll=dt.timedelta(seconds=max(1, _seconds_setting("TALLY_SETTLE_POLL_S", 10))),
        )


@dataclass(frozen=True)
class Activity:
    """When tally last sent to, and last cancelled at, one (provider, customer)."""

    last_sent_at: dt.datetime | None = None
    last_cancel_at: dt.datetime | None = None


def activity_by_target(frame: pd.DataFrame | None) -> dict[Target, Activity]:
    """sql/settlement/activity.sql → {(provider, customer): Activity}."""
    if frame is None or frame.empty:
        return {}

    def when(value: Any) -> dt.datetime | None:
        return None if missing(value) else pd.Timestamp(value).tz_convert("UTC").to_pydatetime()

    return {
        (str(row.provider), str(row.customer_id)): Activity(
            when(row.last_sent_at), when(row.last_cancel_at)
        )
        for row in frame.itertuples(index=False)
    }


def _recent(at: dt.datetime | None, now: dt.datetime, rules: SettlementRules) -> bool:
    return at is not None and now - at < rules.window


def may_be_settling(
    kind: DiscrepancyKind,
    target: Target | None,
    activity: Mapping[Target, Activity],
    now: dt.datetime,
    rules: SettlementRules,
) -> str | None:
    """Why this difference may be the provider still processing, or None."""
    if target is None or kind not in SHORT_KINDS | OVER_KINDS:
        return None
    provider, _customer = target
    if provider not in tuple(Provider) or not Provider(provider).processes_asynchronously:
        return None
    seen = activity.get(target, Activity())
    if kind in SHORT_KINDS and _recent(seen.last_sent_at, now, rules):
        at, what = seen.last_sent_at, "usage was sent"
    elif kind in OVER_KINDS and _recent(seen.last_cancel_at, now, rules):
        at, what = seen.last_cancel_at, "a cancel was accepted"
    else:
        return None
    assert at is not None
    minutes = int((now - at).total_seconds() // 60)
    return (
        f"settling: {what} {minutes} min ago and {provider} processes it asynchronously "
        f"(window {int(rules.window.total_seconds() // 60)} min); re-read until it settles"
    )


def settle_lagging(
    frame: pd.DataFrame,
    activity: Mapping[Target, Activity],
    now: dt.datetime,
    rules: SettlementRules,
) -> pd.DataFrame:
    """Rows whose difference may still be processing become provider_settling (not
    money-moving; the kind they would be is kept in the detail). cap_exceeded of an
    org with a settling over-charge settles with it."""
    if frame.empty:
        return frame
    # Only rows of the lag's kinds at a provider that processes asynchronously can
    # settle: look at those alone (a day can hold thousands of other rows).
    asynchronous = {p.value for p in Provider if p.processes_asynchronously}
    candidates = frame[
        frame["kind"].isin(list(SHORT_KINDS | OVER_KINDS - {Kind.CAP_EXCEEDED}))
        & frame["provider"].isin(list(asynchronous))
    ]
    if candidates.empty or not activity:
        return frame
    frame = frame.copy()
    settling_over: set[str] = set()
    for index, row in candidates.iterrows():
        kind = Kind(row["kind"])
        provider, customer = row.get("provider"), row.get("customer_id")
        target = None if missing(provider) or missing(customer) else (str(provider), str(customer))
        reason = may_be_settling(kind, target, activity, now, rules)
        if reason is None:
            continue
        frame.at[index, "kind"] = Kind.PROVIDER_SETTLING
        frame.at[index, "money_moving"] = False
        frame.at[index, "detail"] = f"would be {kind.value}: {row['detail']}; {reason}"
        if kind in OVER_KINDS:
            settling_over.add(str(row["org_id"]))
    capped = frame[frame["kind"] == Kind.CAP_EXCEEDED] if settling_over else frame.iloc[:0]
    for index, row in capped.iterrows():
        if str(row["org_id"]) in settling_over:
            frame.at[index, "kind"] = Kind.PROVIDER_SETTLING
            frame.at[index, "money_moving"] = False
            frame.at[index, "detail"] = (
                f"would be cap_exceeded: {row['detail']}; settling with the org's over-charge"
            )
    return frame


def unsettled_targets(
    expected: Mapping[tuple[str, str, str], int],
    recorded: Mapping[tuple[str, str, str], int],
    activity: Mapping[Target, Activity],
    now: dt.datetime,
    rules: SettlementRules,
) -> set[Target]:
    """(provider, customer)s whose (tier) totals differ from the ledger in a shape
    the provider's processing lag can explain: the read-back re-reads those."""
    found: set[Target] = set()
    for key in set(expected) | set(recorded):
        provider, customer, _tier = key
        want, held = expected.get(key, 0), recorded.get(key, 0)
        if want == held:
            continue
        kind = Kind.PROVIDER_UNDER if held < want else Kind.PROVIDER_OVER
        if may_be_settling(kind, (provider, customer), activity, now, rules):
            found.add((provider, customer))
    return found
