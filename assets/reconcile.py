"""Reconciliation (DESIGN §8): what we billed, what the ledger sent, what the provider
recorded and what the control plane counted, per (org, day, tier), and the instance
anomalies behind them.

The rules first (ReconcileInputs in, discrepancy rows out; no Dagster, no I/O), then
the `reconciliation` asset, which reads the control plane and the billing database
separately (they may be two databases: never joined in SQL, joined here in pandas)
and replaces the day's `billing.discrepancies` (delete-then-insert). What a
discrepancy is — kinds, columns, sign convention — lives in assets/discrepancy.py;
the provider read-back in assets/provider_usage.py; finance metadata in
assets/finance.py.
"""

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    Failure,
    MaterializeResult,
    asset,
)

from assets.config import pricing_or_fail
from assets.counters import counter_discrepancies, counters_check
from assets.credits import (
    CREDITED,
    ProposalKind,
    ProposalStatus,
    credit_candidates,
    credited_seconds,
)
from assets.discrepancy import (
    DISCREPANCY_COLUMNS,
    INT_COLUMNS,
    KINDS,
    AtTarget,
    DiscrepancyKind,
    OrgFacts,
    ReconcileInputs,
    ReconcileRules,
    Target,
    TierNumbers,
    as_int,
    as_text,
    as_utc,
    discrepancy_row,
    list_dollars,
    missing,
    org_facts,
    settle_money_moving,
    tier_numbers,
    with_columns,
)
from assets.finance import reconciliation_metadata
from assets.instance_anomalies import instance_discrepancies
from assets.invoice_checks import account_discrepancies, drop_covered_by_unknown, unknown_targets
from assets.pricing import Pricing
from assets.settlement import SettlementRules, activity_by_target, settle_lagging
from pipelines.freshness import record_reconciliation
from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.calendar import days_in_month, past_stripe_window, usage_noon
from resources.db import PostgresResource, raw_connection, read_frame, replace_day_rows
from resources.providers import Provider
from resources.settings import RunMode

Kind = DiscrepancyKind
ONE_DAY = dt.timedelta(days=1)


def _readable(inputs: ReconcileInputs) -> dict[str, set[str]]:
    """provider → tiers it could NOT read, for providers that were read; providers
    missing from the result were not read at all (no comparison possible)."""
    readable: dict[str, set[str]] = {}
    for row in inputs.get("reads").itertuples(index=False):
        if row.status == "read":
            unread = row.unread_tiers
            readable[row.provider] = set(unread) if isinstance(unread, list | tuple) else set()
    return readable


@dataclass
class _DayFacts:
    """What the usage rules of one day look up, built once from the inputs."""

    inputs: ReconcileInputs
    pricing: Pricing
    orgs: dict[str, OrgFacts]
    readable: dict[str, set[str]]
    credited: dict[tuple[str, str], int]
    proposed_push: dict[tuple[str, str], int]
    tier_credited: set[str]
    refusals: dict[tuple[str, str], Any]

    @classmethod
    def of(cls, inputs: ReconcileInputs, pricing: Pricing, rules: ReconcileRules) -> "_DayFacts":
        credits = inputs.get("credits")
        return cls(
            inputs=inputs,
            pricing=pricing,
            orgs=org_facts(inputs, rules),
            readable=_readable(inputs),
            credited=credited_seconds(
                credits, (ProposalKind.PROVIDER_OVER, ProposalKind.PUSH_OVER_SENT), CREDITED
            ),
            proposed_push=credited_seconds(
                credits, (ProposalKind.PUSH_OVER_SENT,), (ProposalStatus.PROPOSED,)
            ),
            tier_credited={
                row.org_id
                for row in credits.itertuples(index=False)
                if row.kind == ProposalKind.TIER_MISMATCH and row.status in CREDITED
            },
            refusals={
                (row.org_id, row.tier): row
                for row in inputs.get("refusals").itertuples(index=False)
            },
        )

    def dollars(self, seconds: int | None, tier: str | None) -> Decimal | None:
        return list_dollars(self.pricing, seconds, tier)

    def tier_row(
        self,
        kind: DiscrepancyKind,
        entry: TierNumbers,
        *,
        provider: str | None,
        sent: int,
        recorded: int | None,
        delta: int,
        detail: str,
        customer: str | None = None,
        explained: bool = False,
    ) -> dict:
        """A discrepancy of one (org, tier), priced at the tier's list rate."""
        return discrepancy_row(
            self.inputs.usage_date,
            kind,
            entry.org_id,
            tier=entry.tier,
            provider=provider,
            customer=customer,
            billable=entry.billable,
            sent=sent,
            recorded=recorded,
            counter=entry.counter,
            delta=delta,
            dollars=self.dollars(delta, entry.tier),
            detail=detail,
            explained=explained,
        )

    def tier_read(self, provider: str, tier: str) -> bool:
        """The provider was read for the day and could read this tier."""
        return provider in self.readable and tier not in self.readable[provider]


def usage_discrepancies(
    inputs: ReconcileInputs, pricing: Pricing, rules: ReconcileRules
) -> list[dict]:
    """unpushed, push_window_expired, provider_missing/under/over, tier_mismatch,
    cap_exceeded, counter_drift, missing_counter."""
    keys = tier_numbers(inputs)
    facts = _DayFacts.of(inputs, pricing, rules)
    by_org: dict[str, list[TierNumbers]] = {}
    for (org_id, _tier), entry in sorted(keys.items()):
        by_org.setdefault(org_id, []).append(entry)

    rows: list[dict] = []
    for org_id, entries in by_org.items():
        org = facts.orgs.get(org_id, OrgFacts())
        rows += [
            _unpushed_row(facts, org, entry) for entry in entries if entry.billable > entry.sent
        ]
        read_entries = [
            read for entry in entries if (read := _as_read(facts, org, entry)) is not None
        ]
        if read_entries:
            rows += _provider_discrepancies(facts, org, read_entries)
            rows += _cap_exceeded(facts, org, entries, read_entries)
    rows += counter_discrepancies(inputs, keys, pricing, rules)
    return rows


def _as_read(facts: _DayFacts, org: OrgFacts, entry: TierNumbers) -> TierNumbers | None:
    """The entry restricted to the (provider, customer)s whose provider was read for
    its tier — what the ledger sent there and what they hold — or None when nothing
    of it could be compared. Rows keyed None are the org's current target."""
    current = (org.provider, org.customer) if org.provider and org.customer else None
    targets: dict[Target | None, AtTarget] = {}
    for target, numbers in entry.targets.items():
        resolved = target or current
        if resolved is not None and facts.tier_read(resolved[0], entry.tier):
            found = targets.setdefault(resolved, AtTarget())
            found.sent += numbers.sent
            found.recorded += numbers.recorded
    if current is not None and facts.tier_read(current[0], entry.tier):
        targets.setdefault(current, AtTarget())
    if not targets:
        return None
    return replace(
        entry,
        sent=sum(numbers.sent for numbers in targets.values()),
        recorded=sum(numbers.recorded for numbers in targets.values()),
        targets=targets,
    )


def _unpushed_row(facts: _DayFacts, org: OrgFacts, entry: TierNumbers) -> dict:
    """billable > sent: unpushed, or push_window_expired once Stripe refuses the day."""
    inputs = facts.inputs
    missing_s = entry.billable - entry.sent
    refusal = facts.refusals.get((entry.org_id, entry.tier))
    expired = org.provider == Provider.STRIPE and past_stripe_window(inputs.usage_date, inputs.now)
    kind = Kind.PUSH_WINDOW_EXPIRED if expired else Kind.UNPUSHED
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
    explained = kind == Kind.UNPUSHED and inputs.report_only
    if explained:
        detail += "; report-only run: nothing was pushed"
    org_read = org.provider in facts.readable and org.customer is not None
    return facts.tier_row(
        kind,
        entry,
        provider=org.provider,
        sent=entry.sent,
        recorded=entry.recorded if org_read else None,
        delta=-missing_s,
        detail=detail,
        explained=explained,
    )


def _provider_discrepancies(
    facts: _DayFacts, org: OrgFacts, entries: list[TierNumbers]
) -> list[dict]:
    """sent vs provider: when the org-day totals agree but tiers do not, tier_mismatch
    on the shuffled tiers; otherwise provider_missing/under/over per tier."""
    sent_total = sum(entry.sent for entry in entries)
    recorded_total = sum(entry.recorded for entry in entries)
    shuffled = [entry for entry in entries if entry.recorded != entry.sent]
    if sent_total > 0 and recorded_total == sent_total and shuffled:
        return [
            _tier_mismatch_row(facts, org, entry, sent_total, recorded_total) for entry in shuffled
        ]
    rows: list[dict] = []
    for entry in entries:
        rows += _provider_rows(facts, org, entry)
    return rows


def _tier_mismatch_row(
    facts: _DayFacts, org: OrgFacts, entry: TierNumbers, sent_total: int, recorded_total: int
) -> dict:
    return facts.tier_row(
        Kind.TIER_MISMATCH,
        entry,
        provider=org.provider,
        sent=entry.sent,
        recorded=entry.recorded,
        delta=entry.recorded - entry.sent,
        detail=(
            f"org-day totals agree ({sent_total} s sent, {recorded_total} s "
            f"recorded) but {entry.tier} holds {entry.recorded} s for "
            f"{entry.sent} s sent: billed at the wrong rate"
        ),
        explained=entry.org_id in facts.tier_credited,
    )


def _provider_rows(facts: _DayFacts, org: OrgFacts, entry: TierNumbers) -> list[dict]:
    """provider_missing/under per (provider, customer) the usage went to: it holds
    less than the ledger sent there. provider_over on the org's total across them:
    more is held than is billable (a move or a rename is neither)."""
    rows = [
        row
        for target, numbers in sorted(entry.targets.items(), key=lambda item: str(item[0]))
        if target is not None and (row := _short_row(facts, entry, target, numbers)) is not None
    ]
    if entry.recorded > entry.billable:
        rows.append(_over_row(facts, org, entry))
    return rows


def _short_row(
    facts: _DayFacts, entry: TierNumbers, target: Target, numbers: AtTarget
) -> dict | None:
    if numbers.recorded >= numbers.sent:
        return None
    provider, customer = target
    delta = numbers.recorded - numbers.sent
    where = "" if len(entry.targets) == 1 else f" at {provider} customer {customer}"
    if numbers.recorded == 0:
        kind = Kind.PROVIDER_MISSING
        detail = f"ledger sent {numbers.sent} s{where}; the provider holds nothing for the day"
    else:
        kind = Kind.PROVIDER_UNDER
        detail = (
            f"ledger sent {numbers.sent} s{where}, provider holds {numbers.recorded} s: "
            f"{-delta} s not charged (revenue leakage)"
        )
    return facts.tier_row(
        kind,
        entry,
        provider=provider,
        customer=customer,
        sent=numbers.sent,
        recorded=numbers.recorded,
        delta=delta,
        detail=detail,
    )


def _over_row(facts: _DayFacts, org: OrgFacts, entry: TierNumbers) -> dict:
    """The excess over billable, at the (provider, customer) holding the most beyond
    what the ledger sent there (where a credit hands it back)."""
    over = entry.recorded - entry.billable
    provider, customer = max(
        ((target, numbers) for target, numbers in entry.targets.items() if target is not None),
        key=lambda item: (item[1].recorded - item[1].sent, item[1].recorded),
        default=((org.provider, org.customer), AtTarget()),
    )[0]
    covered = facts.credited.get((entry.org_id, entry.tier), 0)
    pending_push = facts.proposed_push.get((entry.org_id, entry.tier), 0)
    detail = f"provider holds {entry.recorded} s, billable {entry.billable} s: over-charged"
    if covered:
        detail += f"; {covered} s already credited"
    if pending_push:
        detail += f"; {pending_push} s proposed by usage_push (push_over_sent)"
    return facts.tier_row(
        Kind.PROVIDER_OVER,
        entry,
        provider=provider,
        customer=customer,
        sent=entry.sent,
        recorded=entry.recorded,
        delta=over,
        detail=detail,
        explained=covered >= over,
    )


def _cap_exceeded(
    facts: _DayFacts, org: OrgFacts, entries: list[TierNumbers], read_entries: list[TierNumbers]
) -> list[dict]:
    """The provider's day total over the org's daily limit; dollars pro rata of the
    recorded tiers' value."""
    recorded_total = sum(entry.recorded for entry in read_entries)
    if recorded_total <= org.daily_limit_s:
        return []
    excess = recorded_total - org.daily_limit_s
    weighted = [
        value
        for entry in read_entries
        if entry.recorded and (value := facts.dollars(entry.recorded, entry.tier)) is not None
    ]
    dollars = (
        sum(weighted, Decimal(0)) * Decimal(excess) / Decimal(recorded_total) if weighted else None
    )
    return [
        discrepancy_row(
            facts.inputs.usage_date,
            Kind.CAP_EXCEEDED,
            entries[0].org_id,
            provider=org.provider,
            billable=sum(entry.billable for entry in entries),
            sent=sum(entry.sent for entry in read_entries),
            recorded=recorded_total,
            delta=excess,
            dollars=dollars,
            detail=(
                f"provider holds {recorded_total} s for the day, over the org's "
                f"daily limit of {org.daily_limit_s} s by {excess} s"
            ),
        )
    ]


def _describe_plan(plan, name: str | None) -> str:
    if plan is None:
        return f"{name!r} (unknown plan)"
    return f"{name!r} (${plan.monthly_fee}/month, {plan.included_hours} h included)"


def plan_discrepancies(
    inputs: ReconcileInputs, pricing: Pricing, rules: ReconcileRules | None = None
) -> list[dict]:
    """plan_mismatch: the provider's live subscription plan ≠ organizations.plan. A
    missing subscription is not reported (the providers create none on their own).
    Dollar impact: the monthly fee difference, prorated to the day."""
    day = inputs.usage_date
    orgs = org_facts(inputs, rules or ReconcileRules())
    month_days = days_in_month(day)
    rows = []
    for row in inputs.get("plans").sort_values("org_id").itertuples(index=False):
        org = orgs.get(row.org_id)
        provider_plan = as_text(row.plan)
        if org is None or provider_plan is None or provider_plan == org.plan:
            continue
        ours = pricing.plans.get(org.plan or "")
        theirs = pricing.plans.get(provider_plan)
        dollars = None
        if ours is not None and theirs is not None:
            dollars = (theirs.monthly_fee - ours.monthly_fee) / Decimal(month_days)

        rows.append(
            discrepancy_row(
                day,
                Kind.PLAN_MISMATCH,
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
    settlement: SettlementRules | None = None,
) -> pd.DataFrame:
    """Every discrepancy of the day (DESIGN §8), one row each, DISCREPANCY_COLUMNS."""
    pricing = pricing or Pricing()
    rules = rules or ReconcileRules()
    rows = usage_discrepancies(inputs, pricing, rules)
    rows += plan_discrepancies(inputs, pricing, rules)
    rows += instance_discrepancies(inputs, pricing, rules)
    rows += account_discrepancies(inputs, pricing)
    frame = pd.DataFrame(rows, columns=DISCREPANCY_COLUMNS, dtype=object)
    frame = drop_covered_by_unknown(frame, unknown_targets(inputs))
    # What the provider may still be processing is settling, not money moved.
    frame = settle_lagging(
        frame,
        activity_by_target(inputs.get("activity")),
        inputs.now,
        settlement or SettlementRules(),
    )
    # Counted once: the day refines the kinds' money-moving flag (assets/discrepancy.py).
    frame = settle_money_moving(frame, org_facts(inputs, rules), pricing)
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


# ---------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------


def load_inputs(
    postgres: PostgresResource,
    usage_date: dt.date,
    now: dt.datetime,
    report_only: bool,
    rules: ReconcileRules | None = None,
) -> tuple[ReconcileInputs, pd.DataFrame, dt.datetime | None]:
    """Read the control plane and the billing database (separately) for one day."""
    params = {"usage_date": usage_date}
    rules = rules or ReconcileRules()
    with raw_connection(postgres.control_engine()) as connection:
        orgs = read_frame(
            connection,
            "reconcile/orgs.sql",
            {"default_daily_limit_s": rules.metering.default_daily_limit_s},
        )
        counters = read_frame(connection, "reconcile/counters.sql", params)
        latest = read_frame(connection, "reconcile/counters_latest.sql")["latest"].iloc[0]
        instances = read_frame(connection, "reconcile/instances.sql")
    with raw_connection(postgres.billing_engine()) as connection:
        inputs = ReconcileInputs(
            usage_date=usage_date,
            now=now,
            orgs=orgs,
            counters=counters,
            instances=instances,
            report_only=report_only,
            billed=read_frame(connection, "reconcile/billed.sql", params),
            ledger=read_frame(connection, "reconcile/ledger.sql", params),
            refusals=read_frame(connection, "reconcile/refusals.sql", params),
            provider_usage=read_frame(connection, "reconcile/provider_usage.sql", params),
            reads=read_frame(connection, "reconcile/provider_reads.sql", params),
            plans=read_frame(connection, "reconcile/provider_plans.sql", params),
            zombies=read_frame(connection, "reconcile/zombies.sql", params),
            credits=read_frame(connection, "reconcile/credits.sql", params),
            explanations=read_frame(connection, "reconcile/explanations.sql", params),
            activity=read_frame(connection, "settlement/activity.sql", params),
            customers=read_frame(connection, "reconcile/provider_customers.sql", params),
            invoices=read_frame(connection, "reconcile/provider_invoices.sql", params),
            sends=read_frame(connection, "reconcile/ledger_sends.sql", params),
        )
        inputs.period_billable = _period_billable(connection, inputs.get("invoices"))
    return inputs, with_columns(counters, "counters"), as_utc(latest)


def _period_billable(connection, invoices: pd.DataFrame) -> pd.DataFrame:
    """tally's billable seconds over each distinct invoice period (its UTC days)."""
    frames = []
    periods = invoices[["period_start", "period_end"]].drop_duplicates()
    for row in periods.itertuples(index=False):
        start, end = as_utc(row.period_start), as_utc(row.period_end)
        if start is None or end is None:
            continue
        # The period's days are those whose noon (where usage is stamped) it holds.
        first = start.date() if usage_noon(start.date()) >= start else start.date() + ONE_DAY
        last = end.date() if usage_noon(end.date()) < end else end.date() - ONE_DAY
        billed = read_frame(
            connection,
            "reconcile/period_billable.sql",
            {"period_first": first, "period_end": last + ONE_DAY},
        )
        frames.append(billed.assign(period_start=start, period_end=end))
    if not frames:
        return with_columns(None, "period_billable")
    return pd.concat(frames, ignore_index=True)


def write_discrepancies(connection, usage_date: dt.date, discrepancies: pd.DataFrame) -> None:
    rows = (
        tuple(
            as_int(row[column])
            if column in INT_COLUMNS
            else (None if missing(row[column]) else row[column])
            for column in DISCREPANCY_COLUMNS
        )
        for row in discrepancies[DISCREPANCY_COLUMNS].to_dict("records")
    )
    with connection.cursor() as cursor:
        replace_day_rows(
            cursor,
            "reconciliation",
            usage_date,
            deletes=["reconcile/delete.sql"],
            copies=[("reconcile/copy.sql", rows)],
        )


def discrepancy_checks(
    discrepancies: pd.DataFrame, counters_fresh: tuple[bool, dict]
) -> list[AssetCheckResult]:
    """no_unexplained_discrepancies (ERROR for money-moving kinds, else WARN) and
    usage_counters_fresh (WARN)."""
    unexplained = discrepancies[~discrepancies["explained"].astype(bool)]
    money = unexplained[unexplained["money_moving"].astype(bool)]
    fresh, counter_metadata = counters_fresh
    return [
        AssetCheckResult(
            check_name="no_unexplained_discrepancies",
            passed=unexplained.empty,
            severity=AssetCheckSeverity.ERROR if not money.empty else AssetCheckSeverity.WARN,
            metadata={
                "unexplained": len(unexplained),
                "money_moving_kinds": ", ".join(sorted(set(money["kind"]))) or "none",
                "other_kinds": ", ".join(
                    sorted(set(unexplained[~unexplained["money_moving"].astype(bool)]["kind"]))
                )
                or "none",
            },
        ),
        AssetCheckResult(
            check_name="usage_counters_fresh",
            passed=fresh,
            severity=AssetCheckSeverity.WARN,
            metadata=counter_metadata,
        ),
    ]


def _run_started_at(context: AssetExecutionContext, fallback: dt.datetime) -> dt.datetime:
    """When the run began (its duration is the reconciliation's duration metric)."""
    record = context.instance.get_run_record_by_id(context.run.run_id)
    if record is None or record.start_time is None:
        return fallback
    return dt.datetime.fromtimestamp(record.start_time, dt.UTC)


def reconcile_partition(
    context: AssetExecutionContext, postgres: PostgresResource, run_mode: RunMode
) -> MaterializeResult:
    """Reconcile one usage day (every org shard of it together)."""
    usage_date = partition_day(context.partition_key)
    now = dt.datetime.now(dt.UTC)
    rules = ReconcileRules()
    pricing = pricing_or_fail()
    inputs, counters, latest_counter = load_inputs(
        postgres, usage_date, now, run_mode.report_only, rules
    )
    if inputs.get("reads").empty:
        raise Failure(
            description=(
                f"provider_usage has not been read for {usage_date}; materialize "
                "provider_usage for this partition first (or run the daily_billing job)"
            )
        )
    discrepancies = compute_discrepancies(inputs, pricing, rules, SettlementRules.from_env())
    # Report-only on a day a real run reconciled: show what it finds, replace nothing
    # (the real run's discrepancies, explanations and proposals are what people act on).
    kept = run_mode.report_only and bool((inputs.get("reads")["status"] != "skipped").any())
    if kept:
        context.log.info(
            f"report-only: {len(discrepancies)} discrepancies found; the day's "
            "reconciliation from its last real run is kept"
        )
    else:
        with raw_connection(postgres.billing_engine()) as connection:
            write_discrepancies(connection, usage_date, discrepancies)
            # Same transaction: the billing database's own record that this day is
            # reconciled (freshness and `tally status` read it).
            with connection.cursor() as cursor:
                record_reconciliation(
                    cursor, usage_date, context.run.run_id, _run_started_at(context, now), now
                )

    credits = credit_candidates(discrepancies, inputs.get("credits"), pricing)
    counters_fresh = counters_check(counters, inputs.get("billed"), latest_counter, now, rules)
    metadata = reconciliation_metadata(inputs, discrepancies, credits, pricing)
    # Freshness counts only real runs' reconciliations (pipelines/freshness.py).
    metadata["report_only"] = run_mode.report_only
    metadata["kept_real_reconciliation"] = kept
    money = discrepancies[~discrepancies["explained"].astype(bool)]
    money = money[money["money_moving"].astype(bool)]
    if not money.empty:  # a line on-call can grep for: money may be wrong
        context.log.warning(
            f"{usage_date}: {len(money)} unexplained money-moving discrepancies; see "
            f"`tally export-discrepancies --start-date {usage_date} --end-date {usage_date}`",
            extra={"counts": {str(k): int(n) for k, n in money["kind"].value_counts().items()}},
        )
    return MaterializeResult(
        metadata=metadata,
        check_results=discrepancy_checks(discrepancies, counters_fresh),
    )


def build_reconciliation(deps: Sequence[str] = ("provider_usage",)) -> AssetsDefinition:
    """The reconciliation asset after `deps` (sharded days add the shared read-back)."""

    @asset(
        name="reconciliation",
        partitions_def=daily_partitions,
        group_name="reconcile",
        deps=list(deps),
        retry_policy=STEP_RETRY,
        check_specs=[
            AssetCheckSpec(
                "no_unexplained_discrepancies",
                asset="reconciliation",
                partitions_def=daily_partitions,
                description=(
                    "ERROR when a money-moving discrepancy is unexplained (unpushed, provider "
                    "missing/under/over, tier mismatch, cap exceeded, push window expired); "
                    "WARN when only other kinds are"
                ),
            ),
            AssetCheckSpec(
                "usage_counters_fresh",
                asset="reconciliation",
                partitions_def=daily_partitions,
                description=(
                    "WARN: control-plane counters missing for the day or not updated in 2 days"
                ),
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
        return reconcile_partition(context, postgres, run_mode)

    return reconciliation


reconciliation = build_reconciliation()
