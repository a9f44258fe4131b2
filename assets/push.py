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
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import pandas as pd
import psycopg
from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    PartitionsDefinition,
    asset,
)

from assets.push_plan import (
    LEDGER_COLUMNS,
    PROVIDER_KINDS,
    SETTLE_KINDS,
    TARGET_COLUMNS,
    LedgerStatus,
    PushAction,
    PushActionKind,
    plan_push,
)
from assets.shards import ALL, Shard
from pipelines.partitions import daily_partitions, day_and_shard
from pipelines.retry import STEP_RETRY
from resources.db import PostgresResource, load_sql, raw_connection, read_frame
from resources.providers import (
    BillingProvider,
    ProviderError,
    ProvidersResource,
    SendStatus,
    UsageEvent,
    provider_error_metric_key,
)
from resources.settings import RunMode

SEND_BATCH = 2000
# Counters for the asset's metadata.
Stats: TypeAlias = dict[str, int]


@dataclass
class _Session:
    """One provider's part of a day's push: the ledger connection (holding the day's
    push lock), the provider's client, the day and the counters."""

    connection: psycopg.Connection
    client: BillingProvider
    usage_date: dt.date
    stats: Stats
    # Events whose answer never came (their rows stay pending for the next run).
    unanswered: list[str] = field(default_factory=list)

    def failure(self) -> str | None:
        """The message for the step's failure when events went unanswered."""
        if not self.unanswered:
            return None
        count = len(self.unanswered)
        return f"{count} event(s) unanswered, left pending for the next run: {self.unanswered[0]}"


# ---------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------


def _event(action: PushAction, usage_date: dt.date) -> UsageEvent:
    # Only ledger rows (customer_id NOT NULL) and unrefused sends reach a provider.
    customer = cast(str, action.customer_id)
    return UsageEvent(action.identifier, customer, action.tier, action.seconds, usage_date)


def _mark(connection: psycopg.Connection, updates: list[dict[str, Any]]) -> None:
    if updates:
        with connection.cursor() as cursor:
            cursor.executemany(load_sql("push/mark.sql"), updates)
        connection.commit()


def _update(
    identifier: str,
    status: LedgerStatus,
    error: str | None = None,
    *,
    received_earlier: bool = False,
) -> dict[str, Any]:
    """A ledger update. `sent_at` is when the provider first accepted the event: now
    for a first `sent` answer; for a `duplicate` answer (or a delivery verified at
    Stripe) it was an earlier attempt, so the row's creation time, the earliest it
    can have been — the cancel window is judged from then, never from a re-send.
    Any re-send counts as received earlier: its answer may be a replay."""
    return {
        "identifier": identifier,
        "status": status,
        "last_error": error,
        "received_earlier": received_earlier,
    }


def push_day(
    connection: psycopg.Connection,
    providers: ProvidersResource,
    usage_date: dt.date,
    now: dt.datetime,
    orgs: pd.DataFrame,
    shard: Shard = ALL,
) -> dict[str, Any]:
    """Run the plan for one day on a billing-database connection that holds the
    day's push lock. `orgs` (org_id, provider, provider_customer_id) comes from the
    control plane, which may be another database. Returns counters for metadata,
    plus `errors` (messages) and `retryable` (some error is not a configuration one)."""
    params = {"usage_date": usage_date, **shard.params()}
    targets, ledger = _read_day(connection, params, shard)
    actions = plan_push(usage_date, targets, orgs, ledger, now)
    stats = _new_stats()
    clients, errors = _open_clients(providers, actions)
    config_errors = len(errors)
    # Phase 1, every provider: settle what earlier runs left open and cancel young
    # events. Only then is the day planned again from the ledger as it now stands,
    # so a refused cancel is never replaced and a move of provider never sends new
    # usage before the old provider's cancel is confirmed.
    stopped: set[str] = set()
    if any(action.kind in SETTLE_KINDS for action in actions):
        for provider, client in clients.items():
            session = _Session(connection, client, usage_date, stats)
            error = _settle_provider(session, actions, ledger)
            if error is not None:  # the provider is down: nothing new goes to it
                errors.append(error)
                stopped.add(provider)
            elif (unanswered := session.failure()) is not None:
                errors.append(unanswered)  # those rows stay pending; the rest goes on
        targets, ledger = _read_day(connection, params, shard)
        actions = plan_push(usage_date, targets, orgs, ledger, now)
        more, more_errors = _open_clients(providers, actions, opened=clients)
        clients.update(more)
        errors += more_errors
        config_errors += len(more_errors)
    # Phase 2: refusals and credit proposals, then the new events — none for an
    # (org, tier) whose cancel is still unanswered (a provider error stopped it).
    _record_refusals_and_credits(connection, actions, params, stats)
    unsettled = {
        (row.org_id, row.tier)
        for row in ledger.itertuples(index=False)
        if row.status == LedgerStatus.CANCELLING
    }
    for provider, client in clients.items():
        started = time.monotonic()
        if provider not in stopped:
            sends = [
                a
                for a in actions
                if a.provider == provider
                and a.kind == PushActionKind.SEND
                and (a.org_id, a.tier) not in unsettled
            ]
            try:
                if sends:
                    client.ensure_meters({a.tier for a in sends})
                session = _Session(connection, client, usage_date, stats)
                send_exactly_once(session, sends)
                if (unanswered := session.failure()) is not None:
                    errors.append(unanswered)
            except ProviderError as error:
                errors.append(str(error))
        _record_client_stats(stats, provider, client, started)
    return {**stats, "errors": errors, "retryable": len(errors) > config_errors}


def _read_day(
    connection: psycopg.Connection, params: dict[str, Any], shard: Shard = ALL
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(targets, ledger) of the day's `shard` (its part's billed rows, its orgs'
    ledger rows); an empty result still has its columns."""
    targets = read_frame(connection, "push/targets.sql", params)
    if targets.empty:
        targets = pd.DataFrame(columns=TARGET_COLUMNS)
    ledger = read_frame(connection, "push/ledger.sql", params)
    if shard.sharded and not ledger.empty:
        ledger = ledger[ledger["org_id"].astype(str).map(shard.owns).astype(bool)]
    if ledger.empty:
        ledger = pd.DataFrame(columns=LEDGER_COLUMNS)
    connection.commit()
    return targets, ledger


def _new_stats() -> Stats:
    return {
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


def _record_refusals_and_credits(
    connection: psycopg.Connection,
    actions: list[PushAction],
    params: dict[str, Any],
    stats: Stats,
) -> None:
    """Replace the day's refusals and record credit proposals, in one transaction."""
    with connection.cursor() as cursor:
        cursor.execute(load_sql("push/clear_refusals.sql"), params)
        for action in actions:
            if action.kind == PushActionKind.REFUSE:
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
            elif action.kind == PushActionKind.CREDIT:
                cursor.execute(
                    load_sql("push/credit_proposal.sql"),
                    {
                        **params,
                        "org_id": action.org_id,
                        "tier": action.tier,
                        "provider": action.provider,
                        "customer_id": action.customer_id,
                        "seconds": action.seconds,
                        "evidence": action.reason,
                    },
                )
                stats["credit_proposals"] += 1
    connection.commit()


def _open_clients(
    providers: ProvidersResource,
    actions: list[PushAction],
    opened: dict[str, BillingProvider] | None = None,
) -> tuple[dict[str, BillingProvider], list[str]]:
    """A client per provider the plan talks to (beyond those `opened`), in name
    order, and the messages of those that could not be opened (configuration
    errors: a missing key or URL)."""
    clients: dict[str, BillingProvider] = {}
    errors: list[str] = []
    # Ledger rows (provider NOT NULL) and unrefused sends always name a provider.
    needed = cast(set[str], {a.provider for a in actions if a.kind in PROVIDER_KINDS})
    for provider in sorted(needed - set(opened or {})):
        try:
            clients[provider] = providers.client(provider)
        except ProviderError as error:
            errors.append(str(error))
    return clients, errors


def _settle_provider(
    session: _Session, actions: list[PushAction], ledger: pd.DataFrame
) -> str | None:
    """One provider's phase 1, in order: verify stale pending rows, re-send pending
    rows, cancel. Returns the message of the provider error that stopped it (events
    merely unanswered are in `session.unanswered`)."""
    client = session.client
    mine = [a for a in actions if a.provider == client.name]
    started = time.monotonic()
    try:
        client.ensure_meters({a.tier for a in mine})
        verified_missing = _verify_stale_pending(
            session, ledger, _of_kind(mine, PushActionKind.VERIFY)
        )
        resends = _of_kind(mine, PushActionKind.RESEND) + verified_missing
        _deliver(session, resends, resend=True)
        _cancel(session, _of_kind(mine, PushActionKind.CANCEL))
    except ProviderError as error:
        return str(error)
    finally:
        session.stats[f"{client.name}_settle_ms"] = int((time.monotonic() - started) * 1000)
    return None


def _record_client_stats(
    stats: Stats, provider: str, client: BillingProvider, started: float
) -> None:
    """`<provider>_push_ms` (both phases) and the client's request counters; the
    failed-request count under the key the metrics server sums."""
    settle_ms = stats.pop(f"{provider}_settle_ms", 0)
    stats[f"{provider}_push_ms"] = settle_ms + int((time.monotonic() - started) * 1000)
    counters = client.stats()
    for key in ("requests", "retried", "rate_limited"):
        stats[f"{provider}_{key}"] = counters[key]
    stats[provider_error_metric_key(provider)] = counters["errors"]


def _of_kind(actions: list[PushAction], kind: PushActionKind) -> list[PushAction]:
    return [a for a in actions if a.kind == kind]


def send_exactly_once(session: _Session, actions: list[PushAction]) -> None:
    """Send new events so that each is stored by the provider exactly once.

    In batches of SEND_BATCH: the batch's ledger rows are inserted as `pending` and
    committed before any of its events leaves, so no event is ever out without a
    durable row naming its identifier. A row is marked `sent` only after the provider
    answered `sent` or `duplicate` for that identifier. A crash (or a lost answer)
    in between leaves the row `pending`; the next run re-sends it first, with the
    same identifier and quantity, and the provider's identifier dedupe makes a second
    delivery a `duplicate` (past Stripe's dedupe window the run asks Stripe first,
    `_verify_stale_pending`). `rejected` means the provider stored nothing under the
    identifier: the row is marked `failed` and its seconds count as not delivered."""
    for start in range(0, len(actions), SEND_BATCH):
        batch = actions[start : start + SEND_BATCH]
        _insert_pending(session.connection, batch, session.usage_date)
        session.connection.commit()  # pending rows are durable before anything is sent
        _deliver(session, batch, resend=False)


def _insert_pending(
    connection: psycopg.Connection, actions: list[PushAction], usage_date: dt.date
) -> None:
    with connection.cursor() as cursor:
        cursor.executemany(
            load_sql("push/insert_pending.sql"),
            [
                {
                    "usage_date": usage_date,
                    "org_id": a.org_id,
                    "tier": a.tier,
                    "seq": a.seq,
                    "provider": a.provider,
                    "customer_id": a.customer_id,
                    "quantity": a.seconds,
                    "identifier": a.identifier,
                }
                for a in actions
            ],
        )


def _verify_stale_pending(
    session: _Session, ledger: pd.DataFrame, actions: list[PushAction]
) -> list[PushAction]:
    """Pending Stripe rows older than the dedupe window: read what Stripe holds for
    (customer, tier, day). Rows the recorded total already covers (beyond what the
    ledger says was sent) were delivered and are marked sent; the rest are returned
    to be re-sent."""
    if not actions:
        return []
    client, usage_date, stats = session.client, session.usage_date, session.stats
    resend: list[PushAction] = []
    updates = []
    by_key: dict[tuple[str, str], list[PushAction]] = {}
    for action in actions:
        by_key.setdefault((action.org_id, action.tier), []).append(action)
    for (org_id, tier), pending in by_key.items():
        customer = cast(str, pending[0].customer_id)  # a ledger row's: NOT NULL
        recorded = client.recorded_usage(usage_date, [customer], [tier], {}).seconds.get(
            (customer, tier), 0
        )
        rows = ledger[(ledger["org_id"] == org_id) & (ledger["tier"] == tier)]
        delivered = rows["status"].isin([LedgerStatus.SENT, LedgerStatus.CANCEL_REFUSED])
        unaccounted = recorded - int(rows.loc[delivered, "quantity"].sum())
        for action in sorted(pending, key=lambda a: a.seq):
            if action.seconds <= unaccounted:
                unaccounted -= action.seconds
                updates.append(
                    _update(
                        action.identifier,
                        LedgerStatus.SENT,
                        "delivered: verified at Stripe after the dedupe window",
                        received_earlier=True,
                    )
                )
                stats["verified_delivered"] = stats.get("verified_delivered", 0) + 1
                stats[f"seconds_{action.provider}"] += action.seconds
            else:
                resend.append(action)
    _mark(session.connection, updates)
    return resend


def _deliver(session: _Session, actions: list[PushAction], *, resend: bool) -> None:
    """Send events whose rows are already in the ledger; mark each sent or failed."""
    if not actions:
        return
    stats = session.stats
    outcomes = session.client.send([_event(a, session.usage_date) for a in actions])
    by_identifier = {a.identifier: a for a in actions}
    updates = []
    for outcome in outcomes:
        action = by_identifier[outcome.identifier]
        if outcome.status in (SendStatus.SENT, SendStatus.DUPLICATE):
            duplicate = outcome.status == SendStatus.DUPLICATE
            # A re-send's success may be Stripe replaying the first attempt's answer
            # (same Idempotency-Key): either way it may have been accepted earlier.
            updates.append(
                _update(outcome.identifier, LedgerStatus.SENT, received_earlier=duplicate or resend)
            )
            stats["resent" if resend else "sent"] += 1
            stats["deduplicated"] += duplicate
            stats[f"seconds_{action.provider}"] += action.seconds
        elif outcome.status == SendStatus.UNANSWERED:
            # Delivery unknown: the row stays pending; the next run re-sends it.
            session.unanswered.append(outcome.detail)
            stats["unanswered"] = stats.get("unanswered", 0) + 1
        else:
            # The provider said no: nothing was stored under this identifier.
            updates.append(_update(outcome.identifier, LedgerStatus.FAILED, outcome.detail[:500]))
            stats["rejected"] += 1
    _mark(session.connection, updates)


def _cancel(session: _Session, actions: list[PushAction]) -> None:
    """Cancel events: the row is `cancelling` (committed) before the request, so a
    crash leaves it to be cancelled again by the next run."""
    connection = session.connection
    for action in actions:
        _mark(connection, [_update(action.identifier, LedgerStatus.CANCELLING)])
        answer = session.client.cancel(_event(action, session.usage_date))
        if answer == "cancelled":  # the provider's answer
            _mark(connection, [_update(action.identifier, LedgerStatus.CANCELLED)])
            session.stats["cancelled"] += 1
        else:
            # Refused (too late): the event stands. It is never cancelled again nor
            # replaced; the re-plan proposes a credit for its excess.
            refused = f"cancel refused: {answer}"[:500]
            _mark(connection, [_update(action.identifier, LedgerStatus.CANCEL_REFUSED, refused)])
            session.stats["cancels_refused"] = session.stats.get("cancels_refused", 0) + 1


def push_partition(
    context: AssetExecutionContext,
    postgres: PostgresResource,
    providers: ProvidersResource,
    run_mode: RunMode,
) -> MaterializeResult:
    """Push one partition: a usage day, or one org shard of it."""
    usage_date, shard = day_and_shard(context.partition_key, context.assets_def.partitions_def)
    if run_mode.report_only:
        context.log.info("report_only: nothing pushed")
        return MaterializeResult(metadata={"report_only": True, "events_sent": 0})
    with raw_connection(postgres.control_engine()) as connection:
        orgs = read_frame(connection, "push/orgs.sql")
    with raw_connection(postgres.billing_engine()) as connection:
        # Shards of a day push different orgs: each shard has its own lock.
        lock = {"usage_date": f"{usage_date.isoformat()}/{shard.label}"}
        connection.execute(load_sql("push/lock.sql"), lock)
        connection.commit()
        try:
            stats = push_day(
                connection, providers, usage_date, dt.datetime.now(dt.UTC), orgs, shard
            )
        finally:
            connection.rollback()
            connection.execute(load_sql("push/unlock.sql"), lock)
            connection.commit()
    errors = stats.pop("errors")
    retryable = stats.pop("retryable")
    metadata: dict[str, MetadataValue] = {
        key: MetadataValue.int(int(value)) for key, value in stats.items()
    }
    metadata["hours_pushed_stripe"] = MetadataValue.float(stats["seconds_stripe"] / 3600)
    metadata["hours_pushed_polar"] = MetadataValue.float(stats["seconds_polar"] / 3600)
    refused = {key: int(stats.get(key, 0)) for key in ("refused", "cancels_refused")}
    if any(refused.values()):  # a line on-call can grep for: usage that was not billed
        context.log.warning(
            f"{usage_date}: {refused['refused']} push(es) refused (billing.push_refusals), "
            f"{refused['cancels_refused']} cancel(s) refused (the ledger); see docs/push.md",
            extra={"counts": refused},
        )
    if errors:
        # A missing key will not fix itself: fail at once. Provider outages retry.
        raise Failure(description="; ".join(errors), metadata=metadata, allow_retries=retryable)
    return MaterializeResult(metadata=metadata)


def build_usage_push(partitions_def: PartitionsDefinition = daily_partitions) -> AssetsDefinition:
    """The usage_push asset over `partitions_def` (the days, or day × shard)."""

    @asset(
        name="usage_push",
        partitions_def=partitions_def,
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
        return push_partition(context, postgres, providers, run_mode)

    return usage_push


usage_push = build_usage_push()
