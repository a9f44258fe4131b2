"""Reconciliation (DESIGN §8): what we billed, what the ledger sent, what the provider
recorded and what the control plane counted, per (org, day, tier), and the instance
anomalies behind them.

Pure functions first (DataFrames in, DataFrames out); the assets at the bottom read
the control plane and the billing database separately (they may be two databases:
never joined in SQL, joined here in pandas), call the providers' read APIs, and
write `billing.provider_usage` and `billing.discrepancies` per day (delete-then-insert).

Sign convention: `delta_seconds` is actual minus expected (provider − sent/billable,
counter − runtime, sent − billable); `dollar_impact` follows it at list tier rates:
positive means the customer is (or would be) charged too much, negative too little.
"""

import base64
import calendar
import datetime as dt
import io
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.metering import MeteringRules
from assets.pricing import Pricing, PricingError, current_pricing, to_cents
from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.db import (
    PostgresResource,
    load_sql,
    raw_connection,
    read_frame,
    replace_day_rows,
)
from resources.providers import (
    ProviderConfigError,
    ProviderError,
    ProvidersResource,
    RecordedUsage,
)
from resources.settings import RunMode

KINDS = (
    "unpushed",
    "provider_missing",
    "provider_under",
    "provider_over",
    "tier_mismatch",
    "counter_drift",
    "missing_counter",
    "cap_exceeded",
    "push_window_expired",
    "plan_mismatch",
    "stuck_instance",
    "zombie_instance",
)
# Kinds where money is (or will be) charged wrongly: ERROR until explained.
MONEY_MOVING = frozenset(
    {
        "unpushed",
        "provider_missing",
        "provider_under",
        "provider_over",
        "tier_mismatch",
        "cap_exceeded",
        "push_window_expired",
    }
)
PROVIDERS = ("stripe", "polar")
# Proposals that already hand an over-charge back (credit applied or recorded).
CREDITED = ("applied", "manual")
LIVE_PROPOSALS = ("proposed", "applied", "manual")

DISCREPANCY_COLUMNS = [
    "usage_date",
    "kind",
    "org_id",
    "tier",
    "instance_id",
    "provider",
    "billable_seconds",
    "sent_seconds",
    "provider_seconds",
    "counter_seconds",
    "delta_seconds",
    "dollar_impact",
    "money_moving",
    "explained",
    "detail",
]

_COLUMNS = {
    "billed": ["org_id", "tier", "runtime_seconds", "billable_seconds"],
    "ledger": ["org_id", "tier", "sent_seconds", "pending_seconds"],
    "refusals": ["org_id", "tier", "provider", "seconds", "reason"],
    "provider_usage": ["org_id", "tier", "provider", "customer_id", "seconds", "exact"],
    "reads": ["provider", "status", "unread_tiers", "note"],
    "counters": ["org_id", "tier", "runtime_seconds", "updated_at"],
    "orgs": ["org_id", "plan", "provider", "provider_customer_id", "daily_limit_s"],
    "plans": ["org_id", "provider", "customer_id", "plan", "status"],
    "instances": [
        "instance_id",
        "org_id",
        "tier",
        "status",
        "created_at",
        "stopped_at",
        "last_heartbeat",
    ],
    "zombies": ["instance_id", "heartbeats", "first_at", "last_at"],
    "credits": ["proposal_id", "org_id", "tier", "kind", "provider", "seconds", "amount", "status"],
    "explanations": ["kind", "org_id", "tier", "explanation", "explained_by"],
}


def _frame(frame: pd.DataFrame | None, name: str) -> pd.DataFrame:
    """`frame` with at least the expected columns (an empty read has none)."""
    columns = _COLUMNS[name]
    if frame is None or frame.empty:
        return pd.DataFrame(columns=columns)
    return frame


@dataclass(frozen=True)
class ReconcileRules:
    counter_tolerance_s: int = 60
    counter_tolerance_percent: int = 1
    stuck_after: dt.timedelta = dt.timedelta(minutes=15)
    heartbeat_interval_s: int = 60
    stripe_push_window: dt.timedelta = dt.timedelta(days=35)
    counters_max_age: dt.timedelta = dt.timedelta(days=2)
    systemic_orgs: int = 5


@dataclass
class ReconcileInputs:
    """Everything one day's reconciliation looks at; each frame as read from SQL."""

    usage_date: dt.date
    now: dt.datetime
    billed: pd.DataFrame | None = None
    ledger: pd.DataFrame | None = None
    refusals: pd.DataFrame | None = None
    provider_usage: pd.DataFrame | None = None
    reads: pd.DataFrame | None = None
    counters: pd.DataFrame | None = None
    orgs: pd.DataFrame | None = None
    plans: pd.DataFrame | None = None
    instances: pd.DataFrame | None = None
    zombies: pd.DataFrame | None = None
    credits: pd.DataFrame | None = None
    explanations: pd.DataFrame | None = None
    report_only: bool = False

    def get(self, name: str) -> pd.DataFrame:
        return _frame(getattr(self, name), name)


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------


def _int(value) -> int | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return int(value)


def _text(value) -> str | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)) or value == "":
        return None
    return str(value)


def _stamp(value) -> dt.datetime | None:
    if value is None or pd.isna(value):
        return None
    return pd.Timestamp(value).tz_convert("UTC").to_pydatetime()


def _dollars(pricing: Pricing, seconds: int | None, tier: str | None) -> Decimal | None:
    """Unrounded list-rate dollars, None when the tier has no rate."""
    if seconds is None or tier is None:
        return None
    try:
        return pricing.amount(int(seconds), tier)
    except PricingError:
        return None


def _cents(amount: Decimal | None) -> Decimal | None:
    return None if amount is None else to_cents(amount)


def _row(
    usage_date: dt.date,
    kind: str,
    org_id: str,
    *,
    delta: int,
    dollars: Decimal | None,
    detail: str,
    tier: str | None = None,
    instance_id: str | None = None,
    provider: str | None = None,
    billable: int | None = None,
    sent: int | None = None,
    recorded: int | None = None,
    counter: int | None = None,
    explained: bool = False,
) -> dict:
    return {
        "usage_date": usage_date,
        "kind": kind,
        "org_id": org_id,
        "tier": tier,
        "instance_id": instance_id,
        "provider": provider,
        "billable_seconds": billable,
        "sent_seconds": sent,
        "provider_seconds": recorded,
        "counter_seconds": counter,
        "delta_seconds": int(delta),
        "dollar_impact": _cents(dollars),
        "money_moving": kind in MONEY_MOVING,
        "explained": explained,
        "detail": detail,
    }


@dataclass
class _Key:
    """The four numbers of one (org, tier)."""

    org_id: str
    tier: str
    runtime: int = 0
    billable: int = 0
    sent: int = 0
    pending: int = 0
    recorded: int = 0
    counter: int | None = None
    has_billed: bool = False


@dataclass
class _Org:
    plan: str | None = None
    provider: str | None = None
    customer: str | None = None
    daily_limit_s: int = 86_400


def _keys(inputs: ReconcileInputs) -> dict[tuple[str, str], _Key]:
    keys: dict[tuple[str, str], _Key] = {}

    def key(org_id: str, tier: str) -> _Key:
        found = keys.get((org_id, tier))
        if found is None:
            found = keys[(org_id, tier)] = _Key(str(org_id), str(tier))
        return found

    for row in inputs.get("billed").itertuples(index=False):
        entry = key(row.org_id, row.tier)
        entry.runtime, entry.billable = int(row.runtime_seconds), int(row.billable_seconds)
        entry.has_billed = True
    for row in inputs.get("ledger").itertuples(index=False):
        entry = key(row.org_id, row.tier)
        entry.sent, entry.pending = int(row.sent_seconds or 0), int(row.pending_seconds or 0)
    for row in inputs.get("provider_usage").itertuples(index=False):
        key(row.org_id, row.tier).recorded += int(row.seconds)
    for row in inputs.get("counters").itertuples(index=False):
        key(row.org_id, row.tier).counter = int(row.runtime_seconds)
    return keys


def _orgs(inputs: ReconcileInputs) -> dict[str, _Org]:
    default_limit = MeteringRules().default_daily_limit_s
    orgs = {}
    for row in inputs.get("orgs").itertuples(index=False):
        limit = _int(row.daily_limit_s)
        orgs[row.org_id] = _Org(
            _text(row.plan),
            _text(row.provider),
            _text(row.provider_customer_id),
            default_limit if limit is None else limit,
        )
    return orgs


def _readable(inputs: ReconcileInputs) -> dict[str, set[str] | None]:
    """provider → tiers it could NOT read, for providers that were read; providers
    missing from the result were not read at all (no comparison possible)."""
    readable: dict[str, set[str] | None] = {}
    for row in inputs.get("reads").itertuples(index=False):
        if row.status == "read":
            unread = row.unread_tiers
            readable[row.provider] = set(unread) if isinstance(unread, list | tuple) else set()
    return readable


def _credited_seconds(credits: pd.DataFrame, kinds: Iterable[str], statuses) -> dict:
    """(org, tier) → seconds of proposals of `kinds` with a status in `statuses`."""
    chosen = credits[credits["kind"].isin(list(kinds)) & credits["status"].isin(list(statuses))]
    totals: dict[tuple[str, str], int] = {}
    for row in chosen.itertuples(index=False):
        totals[(row.org_id, row.tier)] = totals.get((row.org_id, row.tier), 0) + int(row.seconds)
    return totals


def usage_discrepancies(
    inputs: ReconcileInputs, pricing: Pricing, rules: ReconcileRules
) -> list[dict]:
    """unpushed, push_window_expired, provider_missing/under/over, tier_mismatch,
    cap_exceeded, counter_drift, missing_counter."""
    day = inputs.usage_date
    keys = _keys(inputs)
    orgs = _orgs(inputs)
    readable = _readable(inputs)
    credits = inputs.get("credits")
    credited = _credited_seconds(credits, ("provider_over", "push_over_sent"), CREDITED)
    proposed_push = _credited_seconds(credits, ("push_over_sent",), ("proposed",))
    tier_credited = {
        row.org_id
        for row in credits.itertuples(index=False)
        if row.kind == "tier_mismatch" and row.status in CREDITED
    }
    refusals = {
        (row.org_id, row.tier): row for row in inputs.get("refusals").itertuples(index=False)
    }
    noon = dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC)
    rows: list[dict] = []

    by_org: dict[str, list[_Key]] = {}
    for (org_id, _tier), entry in sorted(keys.items()):
        by_org.setdefault(org_id, []).append(entry)

    for org_id, entries in by_org.items():
        org = orgs.get(org_id, _Org())
        provider = org.provider
        unread = readable.get(provider) if provider in readable else None
        org_read = provider in readable and org.customer is not None

        # -- billable vs sent ------------------------------------------------
        for entry in entries:
            if entry.billable <= entry.sent:
                continue
            missing = entry.billable - entry.sent
            refusal = refusals.get((org_id, entry.tier))
            expired = provider == "stripe" and inputs.now - noon > rules.stripe_push_window
            kind = "push_window_expired" if expired else "unpushed"
            detail = f"billable {entry.billable} s, ledger sent {entry.sent} s"
            if entry.pending:
                detail += f", {entry.pending} s pending (delivery unknown; next run re-sends)"
            if refusal is not None:
                detail += f"; push refused: {refusal.reason}"
            if expired:
                detail += (
                    "; the day is older than Stripe's 35-day window: invoice it by hand "
                    "(invoice item), then record an explanation"
                )
            explained = kind == "unpushed" and inputs.report_only
            if explained:
                detail += "; report-only run: nothing was pushed"
            rows.append(
                _row(
                    day,
                    kind,
                    org_id,
                    tier=entry.tier,
                    provider=provider,
                    billable=entry.billable,
                    sent=entry.sent,
                    recorded=entry.recorded if org_read else None,
                    counter=entry.counter,
                    delta=-missing,
                    dollars=_dollars(pricing, -missing, entry.tier),
                    detail=detail,
                    explained=explained,
                )
            )

        # -- sent vs provider ------------------------------------------------
        if org_read:
            read_entries = [e for e in entries if e.tier not in (unread or set())]
            sent_total = sum(e.sent for e in read_entries)
            recorded_total = sum(e.recorded for e in read_entries)
            shuffled = [e for e in read_entries if e.recorded != e.sent]
            if sent_total > 0 and recorded_total == sent_total and shuffled:
                for entry in shuffled:
                    delta = entry.recorded - entry.sent
                    rows.append(
                        _row(
                            day,
                            "tier_mismatch",
                            org_id,
                            tier=entry.tier,
                            provider=provider,
                            billable=entry.billable,
                            sent=entry.sent,
                            recorded=entry.recorded,
                            counter=entry.counter,
                            delta=delta,
                            dollars=_dollars(pricing, delta, entry.tier),
                            detail=(
                                f"org-day totals agree ({sent_total} s sent, {recorded_total} s "
                                f"recorded) but {entry.tier} holds {entry.recorded} s for "
                                f"{entry.sent} s sent: billed at the wrong rate"
                            ),
                            explained=org_id in tier_credited,
                        )
                    )
            else:
                for entry in read_entries:
                    rows.extend(
                        _provider_rows(
                            day, org_id, provider, entry, pricing, credited, proposed_push
                        )
                    )
            if recorded_total > org.daily_limit_s:
                excess = recorded_total - org.daily_limit_s
                weighted = [
                    _dollars(pricing, e.recorded, e.tier)
                    for e in read_entries
                    if e.recorded and _dollars(pricing, e.recorded, e.tier) is not None
                ]
                dollars = (
                    sum(weighted, Decimal(0)) * Decimal(excess) / Decimal(recorded_total)
                    if weighted
                    else None
                )
                rows.append(
                    _row(
                        day,
                        "cap_exceeded",
                        org_id,
                        provider=provider,
                        billable=sum(e.billable for e in entries),
                        sent=sent_total,
                        recorded=recorded_total,
                        delta=excess,
                        dollars=dollars,
                        detail=(
                            f"provider holds {recorded_total} s for the day, over the org's "
                            f"daily limit of {org.daily_limit_s} s by {excess} s"
                        ),
                    )
                )

    rows.extend(counter_discrepancies(inputs, keys, pricing, rules))
    return rows


def _provider_rows(
    day: dt.date,
    org_id: str,
    provider: str | None,
    entry: _Key,
    pricing: Pricing,
    credited: dict,
    proposed_push: dict,
) -> list[dict]:
    rows = []
    common = {
        "tier": entry.tier,
        "provider": provider,
        "billable": entry.billable,
        "sent": entry.sent,
        "recorded": entry.recorded,
        "counter": entry.counter,
    }
    if entry.sent > 0 and entry.recorded == 0:
        rows.append(
            _row(
                day,
                "provider_missing",
                org_id,
                delta=-entry.sent,
                dollars=_dollars(pricing, -entry.sent, entry.tier),
                detail=f"ledger sent {entry.sent} s; the provider holds nothing for the day",
                **common,
            )
        )
    elif entry.recorded < entry.sent:
        delta = entry.recorded - entry.sent
        rows.append(
            _row(
                day,
                "provider_under",
                org_id,
                delta=delta,
                dollars=_dollars(pricing, delta, entry.tier),
                detail=(
                    f"ledger sent {entry.sent} s, provider holds {entry.recorded} s: "
                    f"{-delta} s not charged (revenue leakage)"
                ),
                **common,
            )
        )
    if entry.recorded > entry.billable:
        over = entry.recorded - entry.billable
        covered = credited.get((org_id, entry.tier), 0)
        pending_push = proposed_push.get((org_id, entry.tier), 0)
        detail = f"provider holds {entry.recorded} s, billable {entry.billable} s: over-charged"
        if covered:
            detail += f"; {covered} s already credited"
        if pending_push:
            detail += f"; {pending_push} s proposed by usage_push (push_over_sent)"
        rows.append(
            _row(
                day,
                "provider_over",
                org_id,
                delta=over,
                dollars=_dollars(pricing, over, entry.tier),
                detail=detail,
                explained=covered >= over,
                **common,
            )
        )
    return rows


def counter_discrepancies(
    inputs: ReconcileInputs,
    keys: dict[tuple[str, str], _Key],
    pricing: Pricing,
    rules: ReconcileRules,
) -> list[dict]:
    """counter_drift (|counter − runtime| > max(60 s, 1 %)) and missing_counter. When
    the control plane has no counter at all for the day, no per-org rows: the
    counters check reports the outage once."""
    day = inputs.usage_date
    if inputs.get("counters").empty:
        return []
    orgs = _orgs(inputs)
    rows = []
    for (org_id, tier), entry in sorted(keys.items()):
        provider = orgs.get(org_id, _Org()).provider
        if entry.counter is None:
            if entry.runtime > 0:
                rows.append(
                    _row(
                        day,
                        "missing_counter",
                        org_id,
                        tier=tier,
                        provider=provider,
                        billable=entry.billable,
                        sent=entry.sent,
                        delta=-entry.runtime,
                        dollars=_dollars(pricing, -entry.billable, tier),
                        detail=(
                            f"metered runtime {entry.runtime} s; the control plane has no "
                            "usage counter for this org, day and tier"
                        ),
                    )
                )
            continue
        drift = entry.counter - entry.runtime
        tolerance = max(
            rules.counter_tolerance_s, entry.runtime * rules.counter_tolerance_percent / 100
        )
        if abs(drift) > tolerance:
            rows.append(
                _row(
                    day,
                    "counter_drift",
                    org_id,
                    tier=tier,
                    provider=provider,
                    billable=entry.billable,
                    sent=entry.sent,
                    counter=entry.counter,
                    delta=drift,
                    dollars=_dollars(pricing, drift, tier),
                    detail=(
                        f"control-plane counter {entry.counter} s vs metered runtime "
                        f"{entry.runtime} s ({drift:+d} s, tolerance {tolerance:.0f} s)"
                    ),
                )
            )
    return rows


def _describe_plan(plan, name: str | None) -> str:
    if plan is None:
        return f"{name!r} (unknown plan)"
    return f"{name!r} (${plan.monthly_fee}/month, {plan.included_hours} h included)"


def plan_discrepancies(inputs: ReconcileInputs, pricing: Pricing) -> list[dict]:
    """plan_mismatch: the provider's live subscription plan ≠ organizations.plan. A
    missing subscription is not reported (the providers create none on their own).
    Dollar impact: the monthly fee difference, prorated to the day."""
    day = inputs.usage_date
    orgs = _orgs(inputs)
    days_in_month = calendar.monthrange(day.year, day.month)[1]
    rows = []
    for row in inputs.get("plans").sort_values("org_id").itertuples(index=False):
        org = orgs.get(row.org_id)
        provider_plan = _text(row.plan)
        if org is None or provider_plan is None or provider_plan == org.plan:
            continue
        ours = pricing.plans.get(org.plan or "")
        theirs = pricing.plans.get(provider_plan)
        dollars = None
        if ours is not None and theirs is not None:
            dollars = (theirs.monthly_fee - ours.monthly_fee) / Decimal(days_in_month)

        rows.append(
            _row(
                day,
                "plan_mismatch",
                row.org_id,
                provider=row.provider,
                delta=0,
                dollars=dollars,
                detail=(
                    f"{row.provider} subscription ({row.status}) is on "
                    f"{_describe_plan(theirs, provider_plan)}; organizations.plan is "
                    f"{_describe_plan(ours, org.plan)}; impact is the fee difference per day"
                ),
            )
        )
    return rows


def instance_discrepancies(
    inputs: ReconcileInputs, pricing: Pricing, rules: ReconcileRules
) -> list[dict]:
    """stuck_instance: running, last heartbeat more than 15 min before the end of the
    day (or now, for today); seconds = the day's span without heartbeats.
    zombie_instance: heartbeats after stopped_at (quarantined by billed_usage);
    seconds = those heartbeats × the heartbeat interval. Both are unbilled time."""
    day = inputs.usage_date
    day_start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    day_end = day_start + dt.timedelta(days=1)
    as_of = min(inputs.now, day_end)
    instances = inputs.get("instances")
    rows = []
    if as_of > day_start:
        for row in instances.sort_values("instance_id").itertuples(index=False):
            if row.status != "running":
                continue
            created = _stamp(row.created_at)
            if created is not None and created >= as_of:
                continue
            last = _stamp(row.last_heartbeat)
            silent_since = last if last is not None else created
            if silent_since is None or as_of - silent_since <= rules.stuck_after:
                continue
            span = int((as_of - max(silent_since, day_start)).total_seconds())
            seen = f"last heartbeat {last.isoformat()}" if last else "no heartbeat ever"
            rows.append(
                _row(
                    day,
                    "stuck_instance",
                    row.org_id,
                    tier=row.tier,
                    instance_id=row.instance_id,
                    delta=-span,
                    dollars=_dollars(pricing, -span, row.tier),
                    detail=(
                        f"status running but {seen}: silent for more than "
                        f"{int(rules.stuck_after.total_seconds() // 60)} min as of "
                        f"{as_of.isoformat()}; {span} s of the day unaccounted"
                    ),
                )
            )
    by_id = {row.instance_id: row for row in instances.itertuples(index=False)}
    for row in inputs.get("zombies").sort_values("instance_id").itertuples(index=False):
        instance = by_id.get(row.instance_id)
        if instance is None:
            continue
        seconds = min(int(row.heartbeats) * rules.heartbeat_interval_s, 86_400)
        stopped = _stamp(instance.stopped_at)
        rows.append(
            _row(
                day,
                "zombie_instance",
                instance.org_id,
                tier=instance.tier,
                instance_id=row.instance_id,
                delta=-seconds,
                dollars=_dollars(pricing, -seconds, instance.tier),
                detail=(
                    f"{int(row.heartbeats)} heartbeats after stopped_at "
                    f"{stopped.isoformat() if stopped else '?'} (first "
                    f"{_stamp(row.first_at).isoformat()}, last {_stamp(row.last_at).isoformat()})"
                    f"; quarantined, not billed: the instance may still be running"
                ),
            )
        )
    return rows


def _apply_explanations(frame: pd.DataFrame, explanations: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or explanations.empty:
        return frame
    notes = {
        (row.kind, row.org_id, row.tier or ""): f"{row.explanation} ({row.explained_by})"
        for row in explanations.itertuples(index=False)
    }
    explained, details = [], []
    for row in frame.itertuples(index=False):
        note = notes.get((row.kind, row.org_id, row.tier or ""))
        explained.append(bool(row.explained) or note is not None)
        details.append(row.detail if note is None else f"{row.detail}; explained: {note}")
    frame = frame.copy()
    frame["explained"], frame["detail"] = explained, details
    return frame


def compute_discrepancies(
    inputs: ReconcileInputs,
    pricing: Pricing | None = None,
    rules: ReconcileRules | None = None,
) -> pd.DataFrame:
    """Every discrepancy of the day (DESIGN §8), one row each, DISCREPANCY_COLUMNS."""
    pricing = pricing or Pricing()
    rules = rules or ReconcileRules()
    rows = usage_discrepancies(inputs, pricing, rules)
    rows += plan_discrepancies(inputs, pricing)
    rows += instance_discrepancies(inputs, pricing, rules)
    frame = pd.DataFrame(rows, columns=DISCREPANCY_COLUMNS, dtype=object)
    frame = _apply_explanations(frame, inputs.get("explanations"))
    order = {kind: position for position, kind in enumerate(KINDS)}
    if not frame.empty:
        frame = (
            frame.assign(_order=frame["kind"].map(order))
            .sort_values(["_order", "org_id", "tier", "instance_id"], na_position="first")
            .drop(columns="_order")
            .reset_index(drop=True)
        )
    return frame


# -- credits (shared with assets/credits.py) ----------------------------------------


def credit_candidates(
    discrepancies: pd.DataFrame, proposals: pd.DataFrame, pricing: Pricing | None = None
) -> pd.DataFrame:
    """Over-charges to hand back, from the day's discrepancies.

    provider_over: the excess over billable minus what usage_push already proposes
    for the same (org, tier) (push_over_sent, not withdrawn) — never two credits for
    the same seconds. tier_mismatch: per org, the net dollars when the wrong tiers
    cost more. Columns: org_id, tier, provider, kind, seconds, amount (Decimal,
    cents, half-up once at the end), evidence."""
    pricing = pricing or Pricing()
    columns = ["org_id", "tier", "provider", "kind", "seconds", "amount", "evidence"]
    proposals = _frame(proposals, "credits")
    push = _credited_seconds(proposals, ("push_over_sent",), LIVE_PROPOSALS)
    out = []
    if discrepancies is None or discrepancies.empty:
        return pd.DataFrame(out, columns=columns)
    explained = discrepancies["explained"].astype(bool)
    over = discrepancies[(discrepancies["kind"] == "provider_over") & ~explained]
    for row in over.itertuples(index=False):
        already = push.get((row.org_id, row.tier), 0)
        seconds = int(row.delta_seconds) - already
        amount = _dollars(pricing, seconds, row.tier)
        if seconds <= 0 or amount is None:
            continue
        rate = pricing.rate(row.tier)
        evidence = (
            f"{row.provider} recorded {int(row.provider_seconds)} s of {row.tier} on "
            f"{row.usage_date}; billable {int(row.billable_seconds)} s, ledger sent "
            f"{int(row.sent_seconds)} s; over by {int(row.delta_seconds)} s"
        )
        if already:
            evidence += f", of which {already} s already proposed by usage_push"
        evidence += f"; credit {seconds} s × ${rate}/h = ${to_cents(amount)}"
        out.append([row.org_id, row.tier, row.provider, "provider_over", seconds, amount, evidence])
    shuffled = discrepancies[(discrepancies["kind"] == "tier_mismatch") & ~explained]
    for org_id, rows in shuffled.groupby("org_id", sort=True):
        net = Decimal(0)
        for row in rows.itertuples(index=False):
            amount = _dollars(pricing, int(row.delta_seconds), row.tier)
            net += amount if amount is not None else Decimal(0)
        gained = rows[rows["delta_seconds"] > 0]
        if net <= 0 or gained.empty:
            continue
        parts = ", ".join(
            f"{row.tier} {int(row.provider_seconds)} s recorded / {int(row.sent_seconds)} s sent"
            for row in rows.itertuples(index=False)
        )
        out.append(
            [
                org_id,
                "+".join(sorted(gained["tier"])),
                rows["provider"].iloc[0],
                "tier_mismatch",
                int(gained["delta_seconds"].sum()),
                net,
                f"usage recorded under the wrong tier on {rows['usage_date'].iloc[0]}: {parts}; "
                f"net over-charge at list rates ${to_cents(net)}",
            ]
        )
    frame = pd.DataFrame(out, columns=columns)
    frame["amount"] = [to_cents(amount) for amount in frame["amount"]]
    return frame


# -- finance metadata -----------------------------------------------------------------


def finance_totals(inputs: ReconcileInputs, pricing: Pricing) -> dict[str, dict[str, int]]:
    """Seconds per tier: billable (ours), sent (ledger), recorded (providers)."""
    totals: dict[str, dict[str, int]] = {}

    def add(tier: str, column: str, seconds) -> None:
        entry = totals.setdefault(tier, {"billed": 0, "sent": 0, "recorded": 0})
        entry[column] += int(seconds)

    for row in inputs.get("billed").itertuples(index=False):
        add(row.tier, "billed", row.billable_seconds)
    for row in inputs.get("ledger").itertuples(index=False):
        add(row.tier, "sent", row.sent_seconds or 0)
    for row in inputs.get("provider_usage").itertuples(index=False):
        add(row.tier, "recorded", row.seconds)
    order = {tier: position for position, tier in enumerate(pricing.tiers_by_price()[::-1])}
    return dict(sorted(totals.items(), key=lambda item: (order.get(item[0], 99), item[0])))


def dollars_of(totals: dict[str, dict[str, int]], column: str, pricing: Pricing) -> Decimal:
    amount = Decimal(0)
    for tier, entry in totals.items():
        dollars = _dollars(pricing, entry[column], tier)
        amount += dollars if dollars is not None else Decimal(0)
    return to_cents(amount)


def top_discrepancies_markdown(
    discrepancies: pd.DataFrame, credits: pd.DataFrame, limit: int = 20
) -> str:
    """The `limit` largest discrepancies by |dollar impact| with the proposed credit."""
    if discrepancies.empty:
        return "_no discrepancies on this day_"
    frame = discrepancies.copy()
    frame["_abs"] = [
        abs(v) if v is not None and not pd.isna(v) else -1 for v in frame["dollar_impact"]
    ]
    frame["_abs_seconds"] = frame["delta_seconds"].abs()
    frame = frame.sort_values(["_abs", "_abs_seconds"], ascending=False).head(limit)
    credit_by_key = {}
    for row in credits.itertuples(index=False):
        if row.kind == "provider_over":
            credit_by_key[("provider_over", row.org_id, row.tier)] = row.amount
        else:
            for tier in str(row.tier).split("+"):
                credit_by_key[("tier_mismatch", row.org_id, tier)] = row.amount
    lines = [
        "| kind | org | tier / instance | billable | sent | provider | counter | delta | "
        "$ impact | proposed credit | explained |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def seconds(value) -> str:
        value = _int(value)
        return "–" if value is None else f"{value:,} s"

    for row in frame.itertuples(index=False):
        where = _text(row.tier) or ""
        if _text(row.instance_id):
            where = f"{where} / {row.instance_id}"
        credit = credit_by_key.get((row.kind, row.org_id, _text(row.tier)))
        impact = row.dollar_impact
        lines.append(
            f"| {row.kind} | {row.org_id} | {where or '–'} | {seconds(row.billable_seconds)} | "
            f"{seconds(row.sent_seconds)} | {seconds(row.provider_seconds)} | "
            f"{seconds(row.counter_seconds)} | {int(row.delta_seconds):+,} s | "
            f"{'–' if impact is None or pd.isna(impact) else f'${impact}'} | "
            f"{'–' if credit is None else f'${credit}'} | {'yes' if row.explained else 'no'} |"
        )
    return "\n".join(lines)


def billed_vs_recorded_png(totals: dict[str, dict[str, int]], usage_date: dt.date) -> bytes:
    """A grouped bar chart (hours per tier: billable, sent, recorded) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tiers = list(totals) or ["(none)"]
    series = [
        ("billable", "billed", "#4c72b0"),
        ("sent", "sent", "#8c8c8c"),
        ("recorded", "recorded", "#dd8452"),
    ]
    figure = Figure(figsize=(6.4, 3.2), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.27
    for position, (label, column, colour) in enumerate(series):
        values = [totals.get(tier, {}).get(column, 0) / 3600 for tier in tiers]
        offsets = [index + (position - 1) * width for index in range(len(tiers))]
        axes.bar(offsets, values, width, label=label, color=colour)
    axes.set_xticks(range(len(tiers)), tiers)
    axes.set_ylabel("hours")
    axes.set_title(f"Billed vs recorded per tier, {usage_date}")
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def counters_check(
    counters: pd.DataFrame,
    billed: pd.DataFrame,
    latest_update: dt.datetime | None,
    now: dt.datetime,
    rules: ReconcileRules,
) -> tuple[bool, dict]:
    """Counters missing for a day with usage, or none written anywhere in 2 days."""
    runtime = int(billed["runtime_seconds"].sum()) if not billed.empty else 0
    missing = runtime > 0 and counters.empty
    age = None if latest_update is None else now - latest_update
    stale = age is None or age > rules.counters_max_age
    reasons = []
    if missing:
        reasons.append("no usage counter for this day although instances ran")
    if stale:
        reasons.append(
            "the control plane wrote no usage counter at all"
            if age is None
            else f"the newest usage counter is {age.total_seconds() / 3600:.1f} h old (> 48 h)"
        )
    metadata = {
        "counters_for_day": len(counters),
        "newest_counter_update": latest_update.isoformat() if latest_update else "never",
        "problem": "; ".join(reasons) or "none",
    }
    return not reasons, metadata


# ---------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------


def _expected_by_customer(sent: pd.DataFrame, provider: str) -> dict[tuple[str, str], int]:
    mine = sent[sent["provider"] == provider] if not sent.empty else sent
    return {(row.customer_id, row.tier): int(row.seconds) for row in mine.itertuples(index=False)}


def _read_provider(
    provider: str,
    orgs: pd.DataFrame,
    sent: pd.DataFrame,
    providers: ProvidersResource,
    usage_date: dt.date,
    tiers: list[str],
    report_only: bool,
    log,
) -> tuple[dict, list[tuple], list[dict], dict[str, int]]:
    """One provider's day → (read record, usage rows, plan rows, stats)."""
    mine = orgs[(orgs["provider"] == provider) & orgs["provider_customer_id"].fillna("").ne("")]
    customer_to_org: dict[str, str] = {}
    for row in mine.itertuples(index=False):
        customer_to_org.setdefault(row.provider_customer_id, row.org_id)
    record = {
        "provider": provider,
        "status": "read",
        "customers": len(customer_to_org),
        "calls": 0,
        "unread_tiers": [],
        "unattributed_seconds": 0,
        "note": None,
    }
    if not customer_to_org:
        record["status"] = "no_customers"
        return record, [], [], {}
    if report_only:
        # `--report-only`: nothing leaves the machine, reads included.
        record["status"] = "skipped"
        record["note"] = "report-only run: provider not contacted"
        return record, [], [], {}
    reader = providers.reader(provider)
    recorded: RecordedUsage = reader.recorded_usage(
        usage_date,
        list(customer_to_org),
        tiers,
        _expected_by_customer(sent, provider),
        create_meters=True,
    )
    plans = reader.plans(customer_to_org)
    calls = int(reader.read_stats()["requests"])
    record.update(
        calls=calls,
        unread_tiers=list(recorded.unread_tiers),
        unattributed_seconds=int(recorded.unattributed),
    )
    if recorded.unread_tiers:
        record["note"] = (
            f"no Polar meter for {', '.join(recorded.unread_tiers)}: "
            "those tiers were not compared"
        )
    stats = {
        f"{provider}_calls": calls,
        f"{provider}_customers": len(customer_to_org),
        f"{provider}_recorded_seconds": sum(recorded.seconds.values()),
        f"{provider}_exact_reads": len(recorded.exact),
    }
    usage_rows = [
        (
            usage_date,
            customer_to_org[customer],
            tier,
            provider,
            customer,
            int(seconds),
            (customer, tier) in recorded.exact,
        )
        for (customer, tier), seconds in sorted(recorded.seconds.items())
        if customer in customer_to_org
    ]
    plan_rows = [
        {
            "org_id": customer_to_org[customer],
            "provider": provider,
            "customer_id": customer,
            "plan": plan.plan,
            "status": plan.status,
        }
        for customer, plan in sorted(plans.items())
    ]
    return record, usage_rows, plan_rows, stats


def read_providers(
    orgs: pd.DataFrame,
    sent: pd.DataFrame,
    providers: ProvidersResource,
    usage_date: dt.date,
    tiers: list[str],
    *,
    report_only: bool,
    log=None,
) -> tuple[pd.DataFrame, list[dict], pd.DataFrame, dict[str, int]]:
    """Read every provider for the day, the providers side by side (their rate limits
    are independent) → (usage rows, read records, plan rows, stats)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(PROVIDERS)) as pool:
        futures = [
            pool.submit(
                _read_provider,
                provider,
                orgs,
                sent,
                providers,
                usage_date,
                tiers,
                report_only,
                log,
            )
            for provider in PROVIDERS
        ]
        results = [future.result() for future in futures]
    stats = {"stripe_calls": 0, "polar_calls": 0, "customers": 0}
    reads, usage_rows, plan_rows = [], [], []
    for record, usage_part, plan_part, stats_part in results:
        reads.append(record)
        usage_rows += usage_part
        plan_rows += plan_part
        stats.update(stats_part)
        stats["customers"] += stats_part.get(f"{record['provider']}_customers", 0)
    usage = pd.DataFrame(
        usage_rows,
        columns=["usage_date", "org_id", "tier", "provider", "customer_id", "seconds", "exact"],
    )
    return usage, reads, pd.DataFrame(plan_rows, columns=_COLUMNS["plans"]), stats


def write_provider_usage(
    connection, usage_date: dt.date, usage: pd.DataFrame, reads: list[dict], plans: pd.DataFrame
) -> None:
    params = {"usage_date": usage_date}
    with connection.cursor() as cursor:
        replace_day_rows(
            cursor,
            "provider_usage",
            usage_date,
            deletes=[
                "provider_usage_delete.sql",
                "provider_usage_delete_reads.sql",
                "provider_usage_delete_plans.sql",
            ],
            copies=[("provider_usage_copy.sql", usage.itertuples(index=False, name=None))],
        )
        cursor.executemany(
            load_sql("provider_usage_insert_read.sql"), [{**params, **read} for read in reads]
        )
        cursor.executemany(
            load_sql("provider_usage_insert_plan.sql"),
            [{**params, **plan} for plan in plans.to_dict("records")],
        )


@asset(
    partitions_def=daily_partitions,
    group_name="reconcile",
    deps=["usage_push"],
    retry_policy=STEP_RETRY,
    description=(
        "What Stripe and Polar recorded for the day per (org, tier): one event-summaries "
        "call per Stripe customer and meter; Polar customers asked for in groups, split "
        "only where a total differs from the ledger."
    ),
)
def provider_usage(
    context: AssetExecutionContext,
    postgres: PostgresResource,
    providers: ProvidersResource,
    run_mode: RunMode,
) -> MaterializeResult:
    usage_date = partition_day(context.partition_key)
    params = {"usage_date": usage_date}
    with raw_connection(postgres.control_engine()) as connection:
        orgs = _frame(read_frame(connection, "provider_usage_orgs.sql"), "orgs")
    billing_engine = postgres.billing_engine()
    with raw_connection(billing_engine) as connection:
        sent = read_frame(connection, "provider_usage_sent.sql", params)
    if sent.empty:
        sent = pd.DataFrame(columns=["provider", "customer_id", "tier", "seconds"])
    tiers = current_pricing().tiers_by_price()
    try:
        usage, reads, plans, stats = read_providers(
            orgs,
            sent,
            providers,
            usage_date,
            tiers,
            report_only=run_mode.report_only,
            log=context.log,
        )
    except ProviderConfigError as error:  # a missing key: retrying cannot help
        raise Failure(description=str(error), allow_retries=False) from None
    except ProviderError as error:
        raise Failure(description=str(error)) from None
    with raw_connection(billing_engine) as connection:
        write_provider_usage(connection, usage_date, usage, reads, plans)

    polar_customers = stats.get("polar_customers", 0)
    metadata = {
        "usage_date": usage_date.isoformat(),
        "rows": len(usage),
        "customers": stats["customers"],
        "stripe_calls": stats["stripe_calls"],
        "polar_calls": stats["polar_calls"],
        "polar_one_call_per_customer_would_be": polar_customers * len(tiers),
        "recorded_hours": MetadataValue.float(round(int(usage["seconds"].sum()) / 3600, 3)),
        "plans_read": len(plans),
    }
    for read in reads:
        metadata[f"{read['provider']}_status"] = read["status"]
        if read["unread_tiers"]:
            metadata[f"{read['provider']}_unread_tiers"] = ", ".join(read["unread_tiers"])
        if read["unattributed_seconds"]:
            metadata[f"{read['provider']}_unattributed_seconds"] = read["unattributed_seconds"]
    return MaterializeResult(metadata=metadata)


def load_inputs(
    postgres: PostgresResource, usage_date: dt.date, now: dt.datetime, report_only: bool
) -> tuple[ReconcileInputs, pd.DataFrame, dt.datetime | None]:
    """Read the control plane and the billing database (separately) for one day."""
    params = {"usage_date": usage_date}
    rules = MeteringRules()
    with raw_connection(postgres.control_engine()) as connection:
        orgs = read_frame(
            connection,
            "reconcile_orgs.sql",
            {"default_daily_limit_s": rules.default_daily_limit_s},
        )
        counters = read_frame(connection, "reconcile_counters.sql", params)
        latest = read_frame(connection, "reconcile_counters_latest.sql")["latest"].iloc[0]
        instances = read_frame(connection, "reconcile_instances.sql")
    with raw_connection(postgres.billing_engine()) as connection:
        frames = {
            name: read_frame(connection, f"reconcile_{sql}.sql", params)
            for name, sql in (
                ("billed", "billed"),
                ("ledger", "ledger"),
                ("refusals", "refusals"),
                ("provider_usage", "provider_usage"),
                ("reads", "provider_reads"),
                ("plans", "provider_plans"),
                ("zombies", "zombies"),
                ("credits", "credits"),
                ("explanations", "explanations"),
            )
        }
    inputs = ReconcileInputs(
        usage_date=usage_date,
        now=now,
        orgs=orgs,
        counters=counters,
        instances=instances,
        report_only=report_only,
        **frames,
    )
    return inputs, _frame(counters, "counters"), _stamp(latest)


def write_discrepancies(connection, usage_date: dt.date, discrepancies: pd.DataFrame) -> None:
    rows = (
        tuple(
            _int(row[column])
            if column in _INT_COLUMNS
            else (None if _missing(row[column]) else row[column])
            for column in DISCREPANCY_COLUMNS
        )
        for row in discrepancies[DISCREPANCY_COLUMNS].to_dict("records")
    )
    with connection.cursor() as cursor:
        replace_day_rows(
            cursor,
            "reconciliation",
            usage_date,
            deletes=["reconcile_delete.sql"],
            copies=[("reconcile_copy.sql", rows)],
        )


_INT_COLUMNS = frozenset(
    {"billable_seconds", "sent_seconds", "provider_seconds", "counter_seconds", "delta_seconds"}
)


def _missing(value) -> bool:
    return value is None or (not isinstance(value, str | Decimal | bool) and pd.isna(value))


def _png_markdown(png: bytes) -> str:
    encoded = base64.b64encode(png).decode()
    return f"![billed vs recorded per tier](data:image/png;base64,{encoded})"


@asset(
    partitions_def=daily_partitions,
    group_name="reconcile",
    deps=["provider_usage"],
    retry_policy=STEP_RETRY,
    check_specs=[
        AssetCheckSpec(
            "no_unexplained_discrepancies",
            asset="reconciliation",
            description=(
                "ERROR when a money-moving discrepancy is unexplained (unpushed, provider "
                "missing/under/over, tier mismatch, cap exceeded, push window expired); "
                "WARN when only other kinds are"
            ),
        ),
        AssetCheckSpec(
            "usage_counters_fresh",
            asset="reconciliation",
            description="WARN: control-plane counters missing for the day or not updated in 2 days",
        ),
    ],
    description=(
        "billing.discrepancies: billable vs sent vs provider vs counter per (org, day, "
        "tier), plus plan, cap and instance anomalies (DESIGN §8)."
    ),
)
def reconciliation(
    context: AssetExecutionContext, postgres: PostgresResource, run_mode: RunMode
) -> MaterializeResult:
    usage_date = partition_day(context.partition_key)
    now = dt.datetime.now(dt.UTC)
    rules = ReconcileRules()
    pricing = current_pricing()
    inputs, counters, latest_counter = load_inputs(postgres, usage_date, now, run_mode.report_only)
    if inputs.get("reads").empty:
        raise Failure(
            description=(
                f"provider_usage has not been read for {usage_date}; materialize "
                "provider_usage for this partition first (or run the daily_billing job)"
            )
        )
    discrepancies = compute_discrepancies(inputs, pricing, rules)
    with raw_connection(postgres.billing_engine()) as connection:
        write_discrepancies(connection, usage_date, discrepancies)

    credits = credit_candidates(discrepancies, inputs.get("credits"), pricing)
    totals = finance_totals(inputs, pricing)
    counts = discrepancies["kind"].value_counts().to_dict() if not discrepancies.empty else {}
    unexplained = discrepancies[~discrepancies["explained"].astype(bool)]
    money = unexplained[unexplained["money_moving"].astype(bool)]
    impact = sum(
        (abs(value) for value in discrepancies["dollar_impact"] if not _missing(value)),
        Decimal(0),
    )
    billed_s = sum(entry["billed"] for entry in totals.values())
    recorded_s = sum(entry["recorded"] for entry in totals.values())
    sent_s = sum(entry["sent"] for entry in totals.values())
    metadata = {
        "usage_date": usage_date.isoformat(),
        "discrepancies": len(discrepancies),
        "unexplained": len(unexplained),
        "unexplained_money_moving": len(money),
        "billed_hours": MetadataValue.float(round(billed_s / 3600, 3)),
        "sent_hours": MetadataValue.float(round(sent_s / 3600, 3)),
        "recorded_hours": MetadataValue.float(round(recorded_s / 3600, 3)),
        "billed_dollars": MetadataValue.float(float(dollars_of(totals, "billed", pricing))),
        "sent_dollars": MetadataValue.float(float(dollars_of(totals, "sent", pricing))),
        "recorded_dollars": MetadataValue.float(float(dollars_of(totals, "recorded", pricing))),
        "absolute_impact_dollars": MetadataValue.float(float(to_cents(impact))),
        "proposed_credits": len(credits),
        "proposed_credit_dollars": MetadataValue.float(
            float(sum(credits["amount"], Decimal(0))) if not credits.empty else 0.0
        ),
    }
    for kind in KINDS:
        metadata[f"count_{kind}"] = int(counts.get(kind, 0))
    metadata["largest_discrepancies"] = MetadataValue.md(
        top_discrepancies_markdown(discrepancies, credits)
    )
    metadata["billed_vs_recorded_chart"] = MetadataValue.md(
        _png_markdown(billed_vs_recorded_png(totals, usage_date))
    )

    kinds_money = ", ".join(sorted(set(money["kind"]))) or "none"
    kinds_other = ", ".join(sorted(set(unexplained["kind"]) - MONEY_MOVING)) or "none"
    fresh, counter_metadata = counters_check(
        counters, inputs.get("billed"), latest_counter, now, rules
    )
    checks = [
        AssetCheckResult(
            check_name="no_unexplained_discrepancies",
            passed=unexplained.empty,
            severity=AssetCheckSeverity.ERROR if not money.empty else AssetCheckSeverity.WARN,
            metadata={
                "unexplained": len(unexplained),
                "money_moving_kinds": kinds_money,
                "other_kinds": kinds_other,
            },
        ),
        AssetCheckResult(
            check_name="usage_counters_fresh",
            passed=fresh,
            severity=AssetCheckSeverity.WARN,
            metadata=counter_metadata,
        ),
    ]
    return MaterializeResult(metadata=metadata, check_results=checks)
