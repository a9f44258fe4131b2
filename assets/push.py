"""Push billable usage to each org's provider exactly once (DESIGN §6).

Every event is first written to `billing.usage_push_ledger` as `pending` in its
own committed transaction, then sent, then marked `sent`. A crash leaves it
pending; the next run re-sends it with the same identifier before anything new,
and the provider's identifier dedupe turns a second delivery into "duplicate".
Only the difference between billable seconds and what the ledger says was sent
ever goes out; a decrease cancels young Stripe events or becomes a credit proposal.
"""

import datetime as dt
import time
from dataclasses import dataclass

import pandas as pd
from dagster import (
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.db import PostgresResource, load_sql, raw_connection, read_frame
from resources.calendar import STRIPE_EVENT_WINDOW as STRIPE_MAX_EVENT_AGE
from resources.providers import (
    ProviderError,
    ProvidersResource,
    UsageEvent,
)
from resources.settings import RunMode

# Stripe accepts cancellations, and dedupes identifiers, for 24 h; stay clear of the edge.
CANCEL_WINDOW = dt.timedelta(hours=23, minutes=30)
DEDUPE_WINDOW = dt.timedelta(hours=23)
SEND_BATCH = 2000
ACTIVE = ("pending", "sent")


def identifier_for(org_id: str, usage_date: dt.date, tier: str, seq: int) -> str:
    return f"tally:{org_id}:{usage_date.isoformat()}:{tier}:{seq}"


@dataclass(frozen=True)
class PushAction:
    # resend | verify (a Stripe resend past the dedupe window: ask the provider
    # first) | cancel | send | credit | refuse
    kind: str
    org_id: str
    tier: str
    provider: str | None
    customer_id: str | None
    seconds: int
    seq: int = 0
    identifier: str = ""
    reason: str = ""


def plan_push(
    usage_date: dt.date,
    targets: pd.DataFrame,
    orgs: pd.DataFrame,
    ledger: pd.DataFrame,
    now: dt.datetime,
) -> list[PushAction]:
    """What to do for one day, in order: re-send pending rows, cancel, send deltas.

    targets: org_id, tier, billable_seconds. orgs: org_id, provider,
    provider_customer_id. ledger: the day's rows (org_id, tier, seq, provider,
    customer_id, quantity, identifier, status, sent_at)."""
    org_info = {row.org_id: row for row in orgs.itertuples(index=False)}
    wanted = {
        (row.org_id, row.tier): int(row.billable_seconds) for row in targets.itertuples(index=False)
    }
    rows_by_key: dict[tuple[str, str], list] = {}
    for row in ledger.itertuples(index=False):
        rows_by_key.setdefault((row.org_id, row.tier), []).append(row)

    resends: list[PushAction] = []
    cancels: list[PushAction] = []
    sends: list[PushAction] = []
    others: list[PushAction] = []
    for org_id, tier in sorted(set(wanted) | set(rows_by_key)):
        target = wanted.get((org_id, tier), 0)
        rows = rows_by_key.get((org_id, tier), [])
        info = org_info.get(org_id)
        provider = getattr(info, "provider", None)
        customer = getattr(info, "provider_customer_id", None)
        customer = None if customer is None or pd.isna(customer) or not customer else customer
        next_seq = max((int(row.seq) for row in rows), default=0) + 1

        for row in rows:
            if row.status == "pending":
                # Past Stripe's 24 h identifier dedupe a blind re-send could count twice.
                stale = (
                    row.provider == "stripe"
                    and getattr(row, "created_at", None) is not None
                    and now - row.created_at >= DEDUPE_WINDOW
                )
                resends.append(_from_row("verify" if stale else "resend", row))
            elif row.status == "cancelling":
                cancels.append(_from_row("cancel", row))
        delivered = sum(int(row.quantity) for row in rows if row.status in ACTIVE)
        delta = target - delivered
        if delta == 0:
            continue
        if delta > 0:
            refusal = _refusal(provider, customer, usage_date, now)
            if refusal:
                others.append(
                    PushAction("refuse", org_id, tier, provider, customer, delta, reason=refusal)
                )
                continue
            sends.append(
                PushAction(
                    "send",
                    org_id,
                    tier,
                    provider,
                    customer,
                    delta,
                    next_seq,
                    identifier_for(org_id, usage_date, tier, next_seq),
                )
            )
            continue
        # Fewer seconds than already sent: never a negative event. Young Stripe events
        # are cancelled; what is left beyond the target becomes a credit proposal.
        row_provider = rows[0].provider
        cancellable = [
            row
            for row in rows
            if row_provider == "stripe"
            and row.status == "sent"
            and row.sent_at is not None
            and not pd.isna(row.sent_at)
            and now - row.sent_at < CANCEL_WINDOW
        ]
        cancels.extend(_from_row("cancel", row) for row in cancellable)
        kept = delivered - sum(int(row.quantity) for row in cancellable)
        if kept < target:
            sends.append(
                PushAction(
                    "send",
                    org_id,
                    tier,
                    row_provider,
                    customer or rows[0].customer_id,
                    target - kept,
                    next_seq,
                    identifier_for(org_id, usage_date, tier, next_seq),
                )
            )
        elif kept > target:
            others.append(
                PushAction(
                    "credit",
                    org_id,
                    tier,
                    row_provider,
                    rows[0].customer_id,
                    kept - target,
                    reason=f"{kept} s delivered, past the cancel window; billable {target} s",
                )
            )
    return resends + cancels + sends + others


def _from_row(kind: str, row) -> PushAction:
    """An action on an existing ledger row (same identifier, same quantity)."""
    return PushAction(
        kind,
        row.org_id,
        row.tier,
        row.provider,
        row.customer_id,
        int(row.quantity),
        int(row.seq),
        row.identifier,
    )


def _refusal(
    provider: str | None, customer: str | None, usage_date: dt.date, now: dt.datetime
) -> str:
    if provider not in ("stripe", "polar"):
        return f"unknown provider {provider!r}; set organizations.provider to stripe or polar"
    if customer is None:
        return "no provider_customer_id; set it on the organization, then re-run the day"
    noon = dt.datetime.combine(usage_date, dt.time(12), tzinfo=dt.UTC)
    if provider == "stripe" and now - noon > STRIPE_MAX_EVENT_AGE:
        return "older than 35 days: Stripe refuses the event; issue an invoice item by hand"
    if noon - now > dt.timedelta(minutes=5):
        return "usage day not yet at noon UTC: the provider refuses future timestamps"
    return ""


# ---------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------


def _event(action: PushAction, usage_date: dt.date) -> UsageEvent:
    return UsageEvent(
        action.identifier, action.customer_id, action.tier, action.seconds, usage_date
    )


def _mark(connection, updates: list[dict]) -> None:
    if updates:
        with connection.cursor() as cursor:
            cursor.executemany(load_sql("push/mark.sql"), updates)
        connection.commit()


def _update(identifier: str, status: str, error: str | None = None) -> dict:
    return {"identifier": identifier, "status": status, "last_error": error}


def push_day(
    connection,
    providers: ProvidersResource,
    usage_date: dt.date,
    now: dt.datetime,
    orgs: pd.DataFrame,
) -> dict:
    """Run the plan for one day on a billing-database connection that holds the
    day's push lock. `orgs` (org_id, provider, provider_customer_id) comes from the
    control plane, which may be another database. Returns counters for metadata."""
    params = {"usage_date": usage_date}
    targets = read_frame(connection, "push/targets.sql", params)
    if targets.empty:
        targets = pd.DataFrame(columns=["org_id", "tier", "billable_seconds"])
    ledger = read_frame(connection, "push/ledger.sql", params)
    if ledger.empty:
        ledger = pd.DataFrame(
            columns=[
                "org_id",
                "tier",
                "seq",
                "provider",
                "customer_id",
                "quantity",
                "identifier",
                "status",
                "sent_at",
                "created_at",
            ]
        )
    connection.commit()
    actions = plan_push(usage_date, targets, orgs, ledger, now)

    stats = {
        "sent": 0,
        "resent": 0,
        "deduplicated": 0,
        "rejected": 0,
        "refused": 0,
        "cancelled": 0,
        "credit_proposals": 0,
        "seconds_stripe": 0,
        "seconds_polar": 0,
    }
    errors: list[str] = []
    config_errors = 0
    with connection.cursor() as cursor:
        cursor.execute(load_sql("push/clear_refusals.sql"), params)
        for action in actions:
            if action.kind == "refuse":
                cursor.execute(
                    load_sql("push/refusal.sql"),
                    {
                        **params,
                        "org_id": action.org_id,
                        "tier": action.tier,
                        "provider": action.provider,
                        "seconds": action.seconds,
                        "reason": action.reason,
                    },
                )
                stats["refused"] += 1
            elif action.kind == "credit":
                cursor.execute(
                    load_sql("push/credit_proposal.sql"),
                    {
                        **params,
                        "org_id": action.org_id,
                        "tier": action.tier,
                        "provider": action.provider,
                        "seconds": action.seconds,
                        "evidence": action.reason,
                    },
                )
                stats["credit_proposals"] += 1
    connection.commit()

    clients = {}
    for provider in sorted(
        {a.provider for a in actions if a.kind in ("resend", "verify", "cancel", "send")}
    ):
        try:
            clients[provider] = providers.client(provider)
        except ProviderError as error:
            errors.append(str(error))
            config_errors += 1
    for provider, client in clients.items():
        mine = [a for a in actions if a.provider == provider]
        started = time.monotonic()
        try:
            client.ensure_meters({a.tier for a in mine})
            verified_missing = _verify_stale_pending(
                connection,
                providers,
                ledger,
                [a for a in mine if a.kind == "verify"],
                usage_date,
                stats,
            )
            _deliver(
                connection,
                client,
                [a for a in mine if a.kind == "resend"] + verified_missing,
                usage_date,
                stats,
                resend=True,
            )
            _cancel(connection, client, [a for a in mine if a.kind == "cancel"], usage_date, stats)
            new = [a for a in mine if a.kind == "send"]
            for start in range(0, len(new), SEND_BATCH):
                batch = new[start : start + SEND_BATCH]
                with connection.cursor() as cursor:
                    cursor.executemany(
                        load_sql("push/insert_pending.sql"),
                        [
                            {
                                **params,
                                "org_id": a.org_id,
                                "tier": a.tier,
                                "seq": a.seq,
                                "provider": a.provider,
                                "customer_id": a.customer_id,
                                "quantity": a.seconds,
                                "identifier": a.identifier,
                            }
                            for a in batch
                        ],
                    )
                connection.commit()  # pending rows are durable before anything is sent
                _deliver(connection, client, batch, usage_date, stats, resend=False)
        except ProviderError as error:
            errors.append(str(error))
        stats[f"{provider}_push_ms"] = int((time.monotonic() - started) * 1000)
        for key, value in client.stats().items():
            stats[f"{provider}_{key}"] = value
    stats["errors"] = errors
    stats["retryable"] = len(errors) > config_errors
    return stats


def _verify_stale_pending(
    connection,
    providers: ProvidersResource,
    ledger: pd.DataFrame,
    actions: list[PushAction],
    usage_date: dt.date,
    stats: dict,
) -> list[PushAction]:
    """Pending Stripe rows older than the dedupe window: read what Stripe holds for
    (customer, tier, day). Rows the recorded total already covers (beyond what the
    ledger says was sent) were delivered and are marked sent; the rest are returned
    to be re-sent."""
    if not actions:
        return []
    reader = providers.client("stripe")
    resend: list[PushAction] = []
    updates = []
    by_key: dict[tuple[str, str], list[PushAction]] = {}
    for action in actions:
        by_key.setdefault((action.org_id, action.tier), []).append(action)
    for (org_id, tier), pending in by_key.items():
        customer = pending[0].customer_id
        recorded = reader.recorded_usage(usage_date, [customer], [tier], {}).seconds.get(
            (customer, tier), 0
        )
        rows = ledger[(ledger["org_id"] == org_id) & (ledger["tier"] == tier)]
        unaccounted = recorded - int(rows.loc[rows["status"] == "sent", "quantity"].sum())
        for action in sorted(pending, key=lambda a: a.seq):
            if action.seconds <= unaccounted:
                unaccounted -= action.seconds
                updates.append(
                    _update(
                        action.identifier,
                        "sent",
                        "delivered: verified at Stripe after the dedupe window",
                    )
                )
                stats["verified_delivered"] = stats.get("verified_delivered", 0) + 1
                stats[f"seconds_{action.provider}"] += action.seconds
            else:
                resend.append(action)
    _mark(connection, updates)
    return resend


def _deliver(
    connection, client, actions: list[PushAction], usage_date: dt.date, stats: dict, *, resend: bool
) -> None:
    if not actions:
        return
    outcomes = client.send([_event(a, usage_date) for a in actions])
    by_identifier = {a.identifier: a for a in actions}
    updates = []
    for outcome in outcomes:
        action = by_identifier[outcome.identifier]
        if outcome.status in ("sent", "duplicate"):
            updates.append(_update(outcome.identifier, "sent"))
            stats["resent" if resend else "sent"] += 1
            stats["deduplicated"] += outcome.status == "duplicate"
            stats[f"seconds_{action.provider}"] += action.seconds
        else:
            # The provider said no: nothing was stored under this identifier.
            updates.append(_update(outcome.identifier, "failed", outcome.detail[:500]))
            stats["rejected"] += 1
    _mark(connection, updates)


def _cancel(
    connection, client, actions: list[PushAction], usage_date: dt.date, stats: dict
) -> None:
    for action in actions:
        _mark(connection, [_update(action.identifier, "cancelling")])
        answer = client.cancel(_event(action, usage_date))
        if answer == "cancelled":
            _mark(connection, [_update(action.identifier, "cancelled")])
            stats["cancelled"] += 1
        else:
            # Too late to cancel: the event stands; reconciliation proposes the credit.
            _mark(connection, [_update(action.identifier, "sent", answer[:500])])


@asset(
    partitions_def=daily_partitions,
    group_name="push",
    deps=["billed_usage"],
    retry_policy=STEP_RETRY,
    description="Billable seconds pushed to Stripe / Polar exactly once through the ledger.",
)
def usage_push(
    context: AssetExecutionContext,
    postgres: PostgresResource,
    providers: ProvidersResource,
    run_mode: RunMode,
) -> MaterializeResult:
    usage_date = partition_day(context.partition_key)
    if run_mode.report_only:
        context.log.info("report_only: nothing pushed")
        return MaterializeResult(metadata={"report_only": True, "events_sent": 0})
    with raw_connection(postgres.control_engine()) as connection:
        orgs = read_frame(connection, "push/orgs.sql")
    with raw_connection(postgres.billing_engine()) as connection:
        lock = {"usage_date": usage_date.isoformat()}
        connection.execute(load_sql("push/lock.sql"), lock)
        connection.commit()
        try:
            stats = push_day(connection, providers, usage_date, dt.datetime.now(dt.UTC), orgs)
        finally:
            connection.rollback()
            connection.execute(load_sql("push/unlock.sql"), lock)
            connection.commit()
    errors = stats.pop("errors")
    retryable = stats.pop("retryable")
    metadata = {key: MetadataValue.int(int(value)) for key, value in stats.items()}
    metadata["hours_pushed_stripe"] = MetadataValue.float(stats["seconds_stripe"] / 3600)
    metadata["hours_pushed_polar"] = MetadataValue.float(stats["seconds_polar"] / 3600)
    if errors:
        # A missing key will not fix itself: fail at once. Provider outages retry.
        raise Failure(description="; ".join(errors), metadata=metadata, allow_retries=retryable)
    return MaterializeResult(metadata=metadata)
