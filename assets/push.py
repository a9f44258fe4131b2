"""Push billable usage to each org's provider exactly once (DESIGN §6).

Every event is first written to `billing.usage_push_ledger` as `pending` in its
own committed transaction, then sent, then marked `sent`. A crash leaves it
pending; the next run re-sends it with the same identifier before anything new,
and the provider's identifier dedupe turns a second delivery into "duplicate".
Only the difference between billable seconds and what the ledger says was sent
ever goes out; a decrease cancels young Stripe events or becomes a credit proposal.
"""

import datetime as dt
import hashlib
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias, cast

import pandas as pd
import psycopg
from dagster import (
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.calendar import past_stripe_window, usage_noon
from resources.db import PostgresResource, load_sql, raw_connection, read_frame
from resources.providers import (
    BillingProvider,
    Provider,
    ProviderError,
    ProvidersResource,
    SendStatus,
    UsageEvent,
    usable_customer_id,
)
from resources.settings import RunMode

# Stripe accepts cancellations, and dedupes identifiers, for 24 h; stay clear of the edge.
CANCEL_WINDOW = dt.timedelta(hours=23, minutes=30)
DEDUPE_WINDOW = dt.timedelta(hours=23)
SEND_BATCH = 2000
PROVIDER_NAMES = frozenset(provider.value for provider in Provider)


class LedgerStatus(StrEnum):
    """billing.usage_push_ledger.status (CHECK constraint: migration 0002, widened by
    0008 with cancel_refused)."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    # A cancel the provider refused: the event stands, is never cancelled again nor
    # replaced, and what it holds beyond billable becomes a credit proposal.
    CANCEL_REFUSED = "cancel_refused"


# Rows whose seconds the provider holds, or is about to: they count as delivered.
# A `cancelling` row is on its way out; `push_day` sends nothing for its (org, tier)
# until the provider has answered the cancel.
ACTIVE = frozenset({LedgerStatus.PENDING, LedgerStatus.SENT, LedgerStatus.CANCEL_REFUSED})


class PushActionKind(StrEnum):
    """What `plan_push` asks for one (org, tier)."""

    RESEND = "resend"  # a pending row, again, with its identifier and quantity
    VERIFY = "verify"  # a Stripe resend past the dedupe window: ask the provider first
    CANCEL = "cancel"
    SEND = "send"
    CREDIT = "credit"
    REFUSE = "refuse"


# The kinds that talk to the provider (and so need its client), and those that
# settle the ledger before anything new is planned and sent.
SETTLE_KINDS = frozenset({PushActionKind.RESEND, PushActionKind.VERIFY, PushActionKind.CANCEL})
PROVIDER_KINDS = SETTLE_KINDS | {PushActionKind.SEND}
TARGET_COLUMNS = ["org_id", "tier", "billable_seconds"]
LEDGER_COLUMNS = [
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
# A row of `ledger.itertuples()`: the columns of push/ledger.sql.
LedgerRow: TypeAlias = Any
# Counters for the asset's metadata.
Stats: TypeAlias = dict[str, int]


# Stripe refuses meter-event identifiers longer than 100 characters.
MAX_IDENTIFIER = 100


def identifier_for(org_id: str, usage_date: dt.date, tier: str, seq: int) -> str:
    """`tally:{org}:{day}:{tier}:{seq}`; an org id too long for Stripe's 100
    characters is replaced by `#` and the first 24 hex digits of its SHA-256 (stable,
    so a re-run finds the same identifier)."""
    identifier = f"tally:{org_id}:{usage_date.isoformat()}:{tier}:{seq}"
    if len(identifier) <= MAX_IDENTIFIER:
        return identifier
    digest = hashlib.sha256(org_id.encode()).hexdigest()[:24]
    return f"tally:#{digest}:{usage_date.isoformat()}:{tier}:{seq}"


@dataclass(frozen=True)
class PushAction:
    kind: PushActionKind
    org_id: str
    tier: str
    provider: str | None
    customer_id: str | None
    seconds: int
    seq: int = 0
    identifier: str = ""
    reason: str = ""


# ---------------------------------------------------------------------------
# The plan (pure)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _OrgTier:
    """One (org, tier) of the day and the seq its next new event takes."""

    org_id: str
    tier: str
    usage_date: dt.date
    next_seq: int

    def send(self, provider: str | None, customer: str | None, seconds: int) -> PushAction:
        return PushAction(
            PushActionKind.SEND,
            self.org_id,
            self.tier,
            provider,
            customer,
            seconds,
            self.next_seq,
            identifier_for(self.org_id, self.usage_date, self.tier, self.next_seq),
        )


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
    customer_id, quantity, identifier, status, sent_at, created_at).
    Returns resends (and verifies), then cancels, then sends, then refusals and
    credits, each group in (org_id, tier) order."""
    org_info = {row.org_id: row for row in orgs.itertuples(index=False)}
    wanted = {
        (row.org_id, row.tier): int(row.billable_seconds) for row in targets.itertuples(index=False)
    }
    rows_by_key = _ledger_by_key(ledger)

    resends: list[PushAction] = []
    cancels: list[PushAction] = []
    sends: list[PushAction] = []
    others: list[PushAction] = []
    for org_id, tier in sorted(set(wanted) | set(rows_by_key)):
        target = wanted.get((org_id, tier), 0)
        rows = rows_by_key.get((org_id, tier), [])
        provider, customer = _account(org_info.get(org_id))
        key = _OrgTier(org_id, tier, usage_date, max((int(row.seq) for row in rows), default=0) + 1)

        pending, cancelling = _pending_actions(rows, now)
        resends.extend(pending)
        cancels.extend(cancelling)
        delivered = sum(int(row.quantity) for row in rows if row.status in ACTIVE)
        if target > delivered:
            action = _increase(key, provider, customer, target - delivered, now)
            (others if action.kind == PushActionKind.REFUSE else sends).append(action)
        elif target < delivered:
            young, kept = _cancellable(rows, delivered, now)
            cancels.extend(young)
            if kept < target:
                action = _increase(key, provider, customer, target - kept, now)
                (others if action.kind == PushActionKind.REFUSE else sends).append(action)
            elif kept > target:
                others.append(_credit(key, rows, kept, target))
    return resends + cancels + sends + others


def _ledger_by_key(ledger: pd.DataFrame) -> dict[tuple[str, str], list[LedgerRow]]:
    """The day's ledger rows per (org_id, tier), in the frame's order."""
    rows_by_key: dict[tuple[str, str], list[LedgerRow]] = {}
    for row in ledger.itertuples(index=False):
        rows_by_key.setdefault((row.org_id, row.tier), []).append(row)
    return rows_by_key


def _account(info: Any) -> tuple[str | None, str | None]:
    """(provider, customer id) of an organizations row; no row, or a missing or empty
    customer id, gives None."""
    provider = getattr(info, "provider", None)
    return provider, usable_customer_id(getattr(info, "provider_customer_id", None))


def _pending_actions(
    rows: list[LedgerRow], now: dt.datetime
) -> tuple[list[PushAction], list[PushAction]]:
    """(resends, cancels) for rows a previous run left unfinished: pending rows are
    re-sent (verified first when Stripe's dedupe window has passed), cancelling rows
    are cancelled again."""
    resends: list[PushAction] = []
    cancels: list[PushAction] = []
    for row in rows:
        if row.status == LedgerStatus.PENDING:
            # Past Stripe's 24 h identifier dedupe a blind re-send could count twice.
            stale = (
                row.provider == Provider.STRIPE
                and getattr(row, "created_at", None) is not None
                and now - row.created_at >= DEDUPE_WINDOW
            )
            kind = PushActionKind.VERIFY if stale else PushActionKind.RESEND
            resends.append(_from_row(kind, row))
        elif row.status == LedgerStatus.CANCELLING:
            cancels.append(_from_row(PushActionKind.CANCEL, row))
    return resends, cancels


def _increase(
    key: _OrgTier, provider: str | None, customer: str | None, seconds: int, now: dt.datetime
) -> PushAction:
    """More billable seconds than delivered: send the difference, unless refused."""
    refusal = _refusal(provider, customer, key.usage_date, now)
    if refusal:
        return PushAction(
            PushActionKind.REFUSE, key.org_id, key.tier, provider, customer, seconds, reason=refusal
        )
    return key.send(provider, customer, seconds)


def _cancellable(
    rows: list[LedgerRow], delivered: int, now: dt.datetime
) -> tuple[list[PushAction], int]:
    """Fewer seconds than delivered (never a negative event): cancel the Stripe
    events the provider accepted less than CANCEL_WINDOW ago (`sent_at` is when it
    first accepted them). Returns (cancels, seconds kept after them); a shortfall
    is then sent to the org's current account, an excess proposed as a credit."""
    young = [
        row
        for row in rows
        if row.provider == Provider.STRIPE
        and row.status == LedgerStatus.SENT
        and row.sent_at is not None
        and not pd.isna(row.sent_at)
        and now - row.sent_at < CANCEL_WINDOW
    ]
    kept = delivered - sum(int(row.quantity) for row in young)
    return [_from_row(PushActionKind.CANCEL, row) for row in young], kept


def _credit(key: _OrgTier, rows: list[LedgerRow], kept: int, target: int) -> PushAction:
    """A credit proposal for what stands beyond billable, at the (provider, customer)
    that received the most of the day's delivered seconds (latest on a tie)."""
    received: dict[tuple[str, str], tuple[int, int]] = {}
    for row in rows:
        if row.status in ACTIVE:
            account = (row.provider, row.customer_id)
            seconds, _ = received.get(account, (0, 0))
            received[account] = (seconds + int(row.quantity), int(row.seq))
    provider, customer = max(received, key=lambda account: received[account])
    return PushAction(
        PushActionKind.CREDIT,
        key.org_id,
        key.tier,
        provider,
        customer,
        kept - target,
        reason=f"{kept} s delivered, past the cancel window; billable {target} s",
    )


def _from_row(kind: PushActionKind, row: LedgerRow) -> PushAction:
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
    if provider not in PROVIDER_NAMES:
        return f"unknown provider {provider!r}; set organizations.provider to stripe or polar"
    if customer is None:
        return "no provider_customer_id; set it on the organization, then re-run the day"
    if provider == Provider.STRIPE and past_stripe_window(usage_date, now):
        return "older than 35 days: Stripe refuses the event; issue an invoice item by hand"
    if usage_noon(usage_date) - now > dt.timedelta(minutes=5):
        return "usage day not yet at noon UTC: the provider refuses future timestamps"
    return ""


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
) -> dict[str, Any]:
    """Run the plan for one day on a billing-database connection that holds the
    day's push lock. `orgs` (org_id, provider, provider_customer_id) comes from the
    control plane, which may be another database. Returns counters for metadata,
    plus `errors` (messages) and `retryable` (some error is not a configuration one)."""
    params = {"usage_date": usage_date}
    targets, ledger = _read_day(connection, params)
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
            error = _settle_provider(connection, client, actions, ledger, usage_date, stats)
            if error is not None:
                errors.append(error)
                stopped.add(provider)
        targets, ledger = _read_day(connection, params)
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
                send_exactly_once(connection, client, sends, usage_date, stats)
            except ProviderError as error:
                errors.append(str(error))
        _record_client_stats(stats, provider, client, started)
    return {**stats, "errors": errors, "retryable": len(errors) > config_errors}


def _read_day(
    connection: psycopg.Connection, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(targets, ledger) of the day; an empty result still has its columns."""
    targets = read_frame(connection, "push/targets.sql", params)
    if targets.empty:
        targets = pd.DataFrame(columns=TARGET_COLUMNS)
    ledger = read_frame(connection, "push/ledger.sql", params)
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
    connection: psycopg.Connection,
    client: BillingProvider,
    actions: list[PushAction],
    ledger: pd.DataFrame,
    usage_date: dt.date,
    stats: Stats,
) -> str | None:
    """One provider's phase 1, in order: verify stale pending rows, re-send pending
    rows, cancel. Returns the message of the provider error that stopped it."""
    mine = [a for a in actions if a.provider == client.name]
    started = time.monotonic()
    try:
        client.ensure_meters({a.tier for a in mine})
        verified_missing = _verify_stale_pending(
            connection, client, ledger, _of_kind(mine, PushActionKind.VERIFY), usage_date, stats
        )
        resends = _of_kind(mine, PushActionKind.RESEND) + verified_missing
        _deliver(connection, client, resends, usage_date, stats, resend=True)
        _cancel(connection, client, _of_kind(mine, PushActionKind.CANCEL), usage_date, stats)
    except ProviderError as error:
        return str(error)
    finally:
        stats[f"{client.name}_settle_ms"] = int((time.monotonic() - started) * 1000)
    return None


def _record_client_stats(
    stats: Stats, provider: str, client: BillingProvider, started: float
) -> None:
    """`<provider>_push_ms` (both phases) and the client's request counters."""
    settle_ms = stats.pop(f"{provider}_settle_ms", 0)
    stats[f"{provider}_push_ms"] = settle_ms + int((time.monotonic() - started) * 1000)
    for key, value in client.stats().items():
        stats[f"{provider}_{key}"] = value


def _of_kind(actions: list[PushAction], kind: PushActionKind) -> list[PushAction]:
    return [a for a in actions if a.kind == kind]


def send_exactly_once(
    connection: psycopg.Connection,
    client: BillingProvider,
    actions: list[PushAction],
    usage_date: dt.date,
    stats: Stats,
) -> None:
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
        _insert_pending(connection, batch, usage_date)
        connection.commit()  # pending rows are durable before anything is sent
        _deliver(connection, client, batch, usage_date, stats, resend=False)


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
    connection: psycopg.Connection,
    client: BillingProvider,
    ledger: pd.DataFrame,
    actions: list[PushAction],
    usage_date: dt.date,
    stats: Stats,
) -> list[PushAction]:
    """Pending Stripe rows older than the dedupe window: read what Stripe holds for
    (customer, tier, day). Rows the recorded total already covers (beyond what the
    ledger says was sent) were delivered and are marked sent; the rest are returned
    to be re-sent."""
    if not actions:
        return []
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
    _mark(connection, updates)
    return resend


def _deliver(
    connection: psycopg.Connection,
    client: BillingProvider,
    actions: list[PushAction],
    usage_date: dt.date,
    stats: Stats,
    *,
    resend: bool,
) -> None:
    """Send events whose rows are already in the ledger; mark each sent or failed."""
    if not actions:
        return
    outcomes = client.send([_event(a, usage_date) for a in actions])
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
        else:
            # The provider said no: nothing was stored under this identifier.
            updates.append(_update(outcome.identifier, LedgerStatus.FAILED, outcome.detail[:500]))
            stats["rejected"] += 1
    _mark(connection, updates)


def _cancel(
    connection: psycopg.Connection,
    client: BillingProvider,
    actions: list[PushAction],
    usage_date: dt.date,
    stats: Stats,
) -> None:
    """Cancel events: the row is `cancelling` (committed) before the request, so a
    crash leaves it to be cancelled again by the next run."""
    for action in actions:
        _mark(connection, [_update(action.identifier, LedgerStatus.CANCELLING)])
        answer = client.cancel(_event(action, usage_date))
        if answer == "cancelled":  # the provider's answer
            _mark(connection, [_update(action.identifier, LedgerStatus.CANCELLED)])
            stats["cancelled"] += 1
        else:
            # Refused (too late): the event stands. It is never cancelled again nor
            # replaced; the re-plan proposes a credit for its excess.
            refused = f"cancel refused: {answer}"[:500]
            _mark(connection, [_update(action.identifier, LedgerStatus.CANCEL_REFUSED, refused)])
            stats["cancels_refused"] = stats.get("cancels_refused", 0) + 1


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
    metadata: dict[str, MetadataValue] = {
        key: MetadataValue.int(int(value)) for key, value in stats.items()
    }
    metadata["hours_pushed_stripe"] = MetadataValue.float(stats["seconds_stripe"] / 3600)
    metadata["hours_pushed_polar"] = MetadataValue.float(stats["seconds_polar"] / 3600)
    if errors:
        # A missing key will not fix itself: fail at once. Provider outages retry.
        raise Failure(description="; ".join(errors), metadata=metadata, allow_retries=retryable)
    return MaterializeResult(metadata=metadata)
