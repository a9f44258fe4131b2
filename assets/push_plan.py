"""What to push for one day (DESIGN §6): the ledger's statuses, the action kinds,
the identifiers, and `plan_push`, the decision table from billable seconds, the
org's account and the day's ledger to the actions. Pure: no Dagster, no I/O;
tested directly in tests/test_push_plan.py. `assets/push.py` carries it out."""

import datetime as dt
import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

import pandas as pd

from resources.calendar import past_stripe_window, usage_noon
from resources.providers.base import Provider, usable_customer_id

# Stripe accepts cancellations, and dedupes identifiers, for 24 h; stay clear of the edge.
CANCEL_WINDOW = dt.timedelta(hours=23, minutes=30)
DEDUPE_WINDOW = dt.timedelta(hours=23)
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
