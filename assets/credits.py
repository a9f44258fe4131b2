"""Credits for over-charges (DESIGN §4): proposals with amount, evidence and
escalation level, and the `issue_credits` op that applies approved ones at the
provider and records them in `billing.billing_corrections`.

Escalation: ≤ $50 a support agent, ≤ $500 a support lead, above that the VP
Engineering; when the same kind of over-charge hits ≥ 5 orgs on one day it is a
systemic bug and goes to engineering whatever the amount. The level follows the
amount net of included hours (assets/credit_net.py). Authority: the approver roster
(assets/approvers.py) gives each approver a level; `issue_credits` refuses an
approver below the proposal's level, a missing ticket, and a proposal the provider
no longer shows as over (re-read before paying); refusals are recorded in
billing.credit_refusals and never apply anything. The customer's "credit applied"
e-mail has its ledger on billing.billing_corrections (docs/reconciliation.md,
"Credits: who may approve").

Never twice: a proposal is applied in one transaction holding its row lock
(`SELECT … FOR UPDATE`); a concurrent run waits, then finds it applied. A crash
between the provider call and the commit leaves the proposal `proposed`; the re-run
calls Stripe with the same Idempotency-Key (`tally-credit-{id}`, which replays the
first answer) after looking for a balance transaction already tagged with the
proposal id (which covers re-runs after Stripe's 24 h key lifetime).
"""

import datetime as dt
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

import pandas as pd
from dagster import (
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    Output,
    asset,
    op,
)

from assets.config import pricing_or_fail
from assets.credit_net import NetCredit, net_credit, proposal_changes
from assets.credit_notice import CreditNotice, credit_notice_message
from assets.discrepancy import DiscrepancyKind, list_dollars, with_columns
from assets.markdown import markdown_table
from assets.pricing import Pricing, to_cents
from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.calendar import month_start, next_month
from resources.db import PostgresResource, load_sql, lock_day, raw_connection, read_frame
from resources.notify import NotifyError, SmtpResource
from resources.providers import (
    BillingProvider,
    CorrectionMethod,
    CreditResult,
    ProviderError,
    ProvidersResource,
    usable_customer_id,
)


class ProposalStatus(StrEnum):
    """billing.credit_proposals.status (CHECK constraint in migration 0003)."""

    PROPOSED = "proposed"
    WITHDRAWN = "withdrawn"
    APPLIED = "applied"
    MANUAL = "manual"


class ProposalKind(StrEnum):
    """What a proposal hands back: reconciliation's over-charges, and usage_push's
    seconds delivered past the cancel window (push_over_sent)."""

    PROVIDER_OVER = "provider_over"
    TIER_MISMATCH = "tier_mismatch"
    PUSH_OVER_SENT = "push_over_sent"


class EscalationLevel(StrEnum):
    """Who approves (CHECK constraint in migration 0003), per the runbook's path."""

    SUPPORT_AGENT = "support_agent"
    SUPPORT_LEAD = "support_lead"
    VP_ENGINEERING = "vp_engineering"
    ENGINEERING = "engineering"


ESCALATION_LEVELS = tuple(EscalationLevel)
# Proposals that already hand an over-charge back (credit applied or recorded), and
# those still standing (not withdrawn).
CREDITED = (ProposalStatus.APPLIED, ProposalStatus.MANUAL)
LIVE_PROPOSALS = (ProposalStatus.PROPOSED, *CREDITED)
SUPPORT_AGENT_LIMIT = Decimal("50")
SUPPORT_LEAD_LIMIT = Decimal("500")
SYSTEMIC_ORGS = 5
RECONCILE_KINDS = (ProposalKind.PROVIDER_OVER, ProposalKind.TIER_MISMATCH)
PROPOSAL_COLUMNS = [
    "proposal_id",
    "org_id",
    "usage_date",
    "tier",
    "provider",
    "kind",
    "seconds",
    "amount",
    "evidence",
    "customer_id",
    "escalation",
    "systemic",
    "status",
]


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------


def escalation_level(amount: Decimal, systemic: bool) -> EscalationLevel:
    if systemic:
        return EscalationLevel.ENGINEERING
    if amount <= SUPPORT_AGENT_LIMIT:
        return EscalationLevel.SUPPORT_AGENT
    if amount <= SUPPORT_LEAD_LIMIT:
        return EscalationLevel.SUPPORT_LEAD
    return EscalationLevel.VP_ENGINEERING


# Authority, lowest first: an approver may approve a proposal at or below their own
# level (runbook: agent, lead, engineering for systemic bugs, VP above $500).
AUTHORITY = (
    EscalationLevel.SUPPORT_AGENT,
    EscalationLevel.SUPPORT_LEAD,
    EscalationLevel.ENGINEERING,
    EscalationLevel.VP_ENGINEERING,
)
LEVEL_SCOPE = {
    EscalationLevel.SUPPORT_AGENT: f"net credits up to ${SUPPORT_AGENT_LIMIT}",
    EscalationLevel.SUPPORT_LEAD: f"net credits up to ${SUPPORT_LEAD_LIMIT}",
    EscalationLevel.ENGINEERING: (
        f"systemic over-charges (one kind on {SYSTEMIC_ORGS}+ orgs a day), "
        f"else up to ${SUPPORT_LEAD_LIMIT}"
    ),
    EscalationLevel.VP_ENGINEERING: "any credit",
}


class RefusalReason(StrEnum):
    """billing.credit_refusals.reason (CHECK constraint in migration 0013)."""

    NOT_ON_ROSTER = "not_on_roster"
    BELOW_LEVEL = "below_level"
    NO_TICKET = "no_ticket"
    PROVIDER_NOT_OVER = "provider_not_over"


def may_approve(approver: EscalationLevel, proposal: EscalationLevel) -> bool:
    return AUTHORITY.index(approver) >= AUTHORITY.index(proposal)


def authority_refusal(
    proposal_id: int,
    approver: str,
    approver_level: EscalationLevel | None,
    ticket: str,
    proposal_level: EscalationLevel,
    net_amount: Decimal,
) -> tuple[RefusalReason, str] | None:
    """Why this approval does not count (one line naming approver, levels and amount),
    or None when it does. The ticket comes first: without one nothing is approved."""
    if not ticket.strip():
        return RefusalReason.NO_TICKET, (
            f"proposal #{proposal_id}: no ticket id; give the support ticket the credit "
            "answers (job config `ticket`, or `tally credits approve --ticket`)"
        )
    if approver_level is None:
        return RefusalReason.NOT_ON_ROSTER, (
            f"proposal #{proposal_id}: approver '{approver}' is not on the approver roster; "
            "add them with their level (config/approvers.toml or TALLY_APPROVERS_FILE) or "
            f"ask a {proposal_level} who is"
        )
    if not may_approve(approver_level, proposal_level):
        return RefusalReason.BELOW_LEVEL, (
            f"proposal #{proposal_id}: approver '{approver}' is {approver_level} "
            f"({LEVEL_SCOPE[approver_level]}); the proposal needs {proposal_level} "
            f"({LEVEL_SCOPE[proposal_level]}) for ${net_amount} net"
        )
    return None


def provider_over_seconds(
    tiers: Iterable[str],
    recorded: dict[str, int],
    billable: dict[str, int],
    credited: dict[str, int],
) -> int:
    """Seconds the provider holds now beyond billable and beyond what other
    proposals already handed back, summed over the proposal's tiers."""
    return sum(
        max(0, recorded.get(tier, 0) - billable.get(tier, 0) - credited.get(tier, 0))
        for tier in tiers
    )


def credited_seconds(
    credits: pd.DataFrame, kinds: Iterable[str], statuses: Collection[str]
) -> dict[tuple[str, str], int]:
    """(org, tier) → seconds of proposals of `kinds` with a status in `statuses`."""
    chosen = credits[credits["kind"].isin(list(kinds)) & credits["status"].isin(list(statuses))]
    totals: dict[tuple[str, str], int] = {}
    for row in chosen.itertuples(index=False):
        totals[(row.org_id, row.tier)] = totals.get((row.org_id, row.tier), 0) + int(row.seconds)
    return totals


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
    columns = ["org_id", "tier", "provider", "kind", "seconds", "amount", "evidence", "customer_id"]
    proposals = with_columns(proposals, "credits")
    push = credited_seconds(proposals, (ProposalKind.PUSH_OVER_SENT,), LIVE_PROPOSALS)
    out: list[list[Any]] = []
    if discrepancies is None or discrepancies.empty:
        return pd.DataFrame(out, columns=columns)
    explained = discrepancies["explained"].astype(bool)
    over = discrepancies[(discrepancies["kind"] == DiscrepancyKind.PROVIDER_OVER) & ~explained]
    for row in over.itertuples(index=False):
        already = push.get((row.org_id, row.tier), 0)
        seconds = int(row.delta_seconds) - already
        amount = list_dollars(pricing, seconds, row.tier)
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
        out.append(
            [
                row.org_id,
                row.tier,
                row.provider,
                ProposalKind.PROVIDER_OVER,
                seconds,
                amount,
                evidence,
                usable_customer_id(getattr(row, "customer_id", None)),
            ]
        )
    shuffled = discrepancies[(discrepancies["kind"] == DiscrepancyKind.TIER_MISMATCH) & ~explained]
    for org_id, rows in shuffled.groupby("org_id", sort=True):
        net = Decimal(0)
        for row in rows.itertuples(index=False):
            amount = list_dollars(pricing, int(row.delta_seconds), row.tier)
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
                ProposalKind.TIER_MISMATCH,
                int(gained["delta_seconds"].sum()),
                net,
                f"usage recorded under the wrong tier on {rows['usage_date'].iloc[0]}: {parts}; "
                f"net over-charge at list rates ${to_cents(net)}",
                None,
            ]
        )
    frame = pd.DataFrame(out, columns=columns)
    frame["amount"] = [to_cents(amount) for amount in frame["amount"]]
    return frame


NetOf = Callable[[str, str, str, int, Decimal], NetCredit]


def _list_is_net(org_id: str, tier: str, kind: str, seconds: int, amount: Decimal) -> NetCredit:
    return NetCredit(amount, amount, 0)


def net_evidence(net: NetCredit) -> str:
    """What the evidence adds when included hours lower the credit."""
    if net.net_amount == net.list_amount:
        return ""
    return (
        f"; {net.included_seconds} s fell inside the org's included hours: net credit "
        f"${net.net_amount} (list ${net.list_amount})"
    )


def plan_proposals(
    usage_date: dt.date,
    candidates: pd.DataFrame,
    existing: pd.DataFrame,
    orgs: pd.DataFrame,
    pricing: Pricing | None = None,
    systemic_orgs: int = SYSTEMIC_ORGS,
    net_of: NetOf | None = None,
) -> tuple[list[dict], list[dict], list[int]]:
    """What to write for one day → (upserts of reconciliation proposals, updates of
    usage_push's push_over_sent proposals still open, proposal ids to withdraw).

    A kind is systemic when it hits `systemic_orgs` or more orgs that day (counting
    open and applied proposals and the new candidates). `net_of(org, tier, kind,
    seconds, list amount)` prices a proposal net of included hours (default: the list
    amount); the escalation level follows the net amount."""
    pricing = pricing or Pricing()
    net_of = net_of or _list_is_net
    existing = existing if not existing.empty else pd.DataFrame(columns=PROPOSAL_COLUMNS)
    customers = billable_customers(orgs)
    live = existing[existing["status"].isin(LIVE_PROPOSALS)]
    orgs_by_kind: dict[str, set[str]] = {}
    for row in live.itertuples(index=False):
        if row.kind not in RECONCILE_KINDS:
            orgs_by_kind.setdefault(row.kind, set()).add(row.org_id)
    for row in candidates.itertuples(index=False):
        orgs_by_kind.setdefault(row.kind, set()).add(row.org_id)

    def systemic(kind: str) -> bool:
        return len(orgs_by_kind.get(kind, ())) >= systemic_orgs

    upserts = []
    for row in candidates.itertuples(index=False):
        is_systemic = systemic(row.kind)
        net = net_of(row.org_id, row.tier, row.kind, int(row.seconds), row.amount)
        upserts.append(
            {
                "org_id": row.org_id,
                "usage_date": usage_date,
                "tier": row.tier,
                "provider": row.provider,
                "kind": row.kind,
                "seconds": int(row.seconds),
                "amount": row.amount,
                "evidence": row.evidence
                + (
                    f"; systemic: {row.kind} on {len(orgs_by_kind[row.kind])} orgs this day"
                    if is_systemic
                    else ""
                )
                + net_evidence(net),
                # The customer that was charged (it may no longer be the org's).
                "customer_id": usable_customer_id(getattr(row, "customer_id", None))
                or customers.get(row.org_id),
                "escalation": escalation_level(net.net_amount, is_systemic),
                "systemic": is_systemic,
                "net_amount": net.net_amount,
                "included_seconds": net.included_seconds,
            }
        )
    updates = []
    for row in existing[existing["status"] == ProposalStatus.PROPOSED].itertuples(index=False):
        if row.kind in RECONCILE_KINDS:
            continue
        amount = to_cents(pricing.amount(int(row.seconds), row.tier))
        is_systemic = systemic(row.kind)
        net = net_of(row.org_id, row.tier, row.kind, int(row.seconds), amount)
        updates.append(
            {
                "proposal_id": int(row.proposal_id),
                "amount": amount,
                "customer_id": usable_customer_id(row.customer_id) or customers.get(row.org_id),
                "escalation": escalation_level(net.net_amount, is_systemic),
                "systemic": is_systemic,
                "net_amount": net.net_amount,
                "included_seconds": net.included_seconds,
            }
        )
    wanted = {(row.org_id, row.tier, row.kind) for row in candidates.itertuples(index=False)}
    withdraw = [
        int(row.proposal_id)
        for row in existing.itertuples(index=False)
        if row.kind in RECONCILE_KINDS
        and row.status == ProposalStatus.PROPOSED
        and (row.org_id, row.tier, row.kind) not in wanted
    ]
    return upserts, updates, withdraw


def _proposals_markdown(proposals: pd.DataFrame, limit: int = 20) -> str:
    top = proposals.sort_values("amount", ascending=False, key=lambda s: s.fillna(-1)).head(limit)
    rows = [
        [
            row.proposal_id,
            row.org_id,
            row.tier,
            row.kind,
            f"{int(row.seconds):,}",
            "–" if row.amount is None or pd.isna(row.amount) else f"${row.amount}",
            "–" if row.net_amount is None or pd.isna(row.net_amount) else f"${row.net_amount}",
            row.escalation or "–",
            row.status,
        ]
        for row in top.itertuples(index=False)
    ]
    return markdown_table(
        ["id", "org", "tier", "kind", "seconds", "list", "net", "escalation", "status"],
        rows,
        numeric={"id", "seconds", "list", "net"},
        empty="_no credit proposals on this day_",
    )


# ---------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------


def billable_customers(orgs: pd.DataFrame) -> dict[str, str]:
    """org_id → provider customer id, for the orgs that have a usable one."""
    customers = {}
    for row in orgs.itertuples(index=False):
        customer = usable_customer_id(row.provider_customer_id)
        if customer is not None:
            customers[row.org_id] = customer
    return customers


ORG_COLUMNS = ["org_id", "name", "billing_email", "plan", "provider", "provider_customer_id"]


def _orgs(postgres: PostgresResource) -> pd.DataFrame:
    with raw_connection(postgres.control_engine()) as connection:
        orgs = read_frame(connection, "credits/orgs.sql")
    if orgs.empty:
        orgs = pd.DataFrame(columns=ORG_COLUMNS)
    return orgs


def read_month_usage(connection, org_ids: Collection[str], usage_date: dt.date) -> pd.DataFrame:
    """The orgs' billable rows of `usage_date`'s whole month (every day known now)."""
    if not org_ids:
        return pd.DataFrame(columns=["org_id", "usage_date", "tier", "billable_seconds"])
    return read_frame(
        connection,
        "credits/month_usage.sql",
        {
            "org_ids": sorted(org_ids),
            "month_start": month_start(usage_date),
            "next_month": next_month(month_start(usage_date)),
        },
    )


def pricer(
    usage_date: dt.date,
    usage: pd.DataFrame,
    orgs: pd.DataFrame,
    pricing: Pricing,
    discrepancies: pd.DataFrame | None,
) -> NetOf:
    """`net_of` for one day's proposals: priced against the month's usage and each
    org's plan (an org whose plan is not priced is credited the list amount)."""
    plans = {
        str(row.org_id): pricing.plans.get(str(row.plan)) for row in orgs.itertuples(index=False)
    }

    def net_of(org_id: str, tier: str, kind: str, seconds: int, amount: Decimal) -> NetCredit:
        changes = proposal_changes(kind, org_id, usage_date, tier, seconds, discrepancies)
        return net_credit(usage, org_id, plans.get(org_id), pricing, changes, amount)

    return net_of


@asset(
    partitions_def=daily_partitions,
    group_name="reconcile",
    deps=["reconciliation"],
    retry_policy=STEP_RETRY,
    description=(
        "Credit proposals for the day's over-charges (provider_over, tier_mismatch, and "
        "usage_push's push_over_sent) with amount, evidence and escalation level; "
        "applied by the issue_credits job."
    ),
)
def credit_proposals(
    context: AssetExecutionContext, postgres: PostgresResource
) -> MaterializeResult:
    usage_date = partition_day(context.partition_key)
    params = {"usage_date": usage_date}
    pricing = pricing_or_fail()
    orgs = _orgs(postgres)
    with raw_connection(postgres.billing_engine()) as connection:
        with connection.cursor() as cursor:
            lock_day(cursor, "credit_proposals", usage_date)
        discrepancies = read_frame(connection, "credits/day_discrepancies.sql", params)
        existing = read_frame(connection, "credits/day.sql", params)
        candidates = credit_candidates(discrepancies, existing, pricing)
        priced = set(candidates["org_id"]) | set(
            existing.loc[existing["status"] == ProposalStatus.PROPOSED, "org_id"]
            if not existing.empty
            else []
        )
        net_of = pricer(
            usage_date,
            read_month_usage(connection, priced, usage_date),
            orgs,
            pricing,
            discrepancies,
        )
        upserts, updates, withdraw = plan_proposals(
            usage_date, candidates, existing, orgs, pricing, net_of=net_of
        )
        with connection.cursor() as cursor:
            if upserts:
                cursor.executemany(load_sql("credits/upsert.sql"), upserts)
            if updates:
                cursor.executemany(load_sql("credits/update.sql"), updates)
            if withdraw:
                cursor.executemany(
                    load_sql("credits/withdraw.sql"), [{"proposal_id": pid} for pid in withdraw]
                )
        connection.commit()
        stored = read_frame(connection, "credits/day.sql", params)
    if stored.empty:
        stored = pd.DataFrame(columns=[*PROPOSAL_COLUMNS, "net_amount"])
    open_ = stored[stored["status"] == ProposalStatus.PROPOSED]
    total = sum((amount for amount in open_["amount"] if amount is not None), Decimal(0))
    net_total = sum(
        (amount for amount in open_["net_amount"] if amount is not None and not pd.isna(amount)),
        Decimal(0),
    )
    by_level = open_["escalation"].value_counts().to_dict()
    metadata: dict[str, Any] = {
        "usage_date": usage_date.isoformat(),
        "open_proposals": len(open_),
        "open_credit_dollars": MetadataValue.float(float(total)),
        "open_credit_net_dollars": MetadataValue.float(float(net_total)),
        "withdrawn_now": len(withdraw),
        "applied": int((stored["status"].isin(list(CREDITED))).sum()),
        "proposals": MetadataValue.md(_proposals_markdown(stored)),
    }
    for level in ESCALATION_LEVELS:
        metadata[f"open_{level}"] = int(by_level.get(level, 0))
    return MaterializeResult(metadata=metadata)


class IssueCreditsConfig(Config):
    """Which proposals to apply, who approved them and under which support ticket."""

    proposal_ids: list[int]
    approver: str
    ticket: str = ""  # required: checked by the op, so a missing one is recorded


class Outcome(StrEnum):
    """What issue_credits did with one proposal."""

    APPLIED = "applied"  # handed back at the provider (or $0: inside included hours)
    MANUAL = "manual"  # recorded for a person to apply (Polar)
    ALREADY = "already"
    SKIPPED = "skipped"
    REFUSED = "refused"  # the approval does not count, or the provider is not over now
    FAILED = "failed"  # the provider call failed; nothing recorded, safe to re-run


class NoticeStatus(StrEnum):
    """billing.billing_corrections.notice_status (CHECK constraint in migration 0013)."""

    OWED = "owed"
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    NO_ADDRESS = "no_address"
    NOT_NEEDED = "not_needed"


@dataclass(frozen=True)
class Approval:
    approver: str
    level: EscalationLevel | None  # None: not on the roster
    ticket: str


@dataclass
class CreditRun:
    """What one issue_credits run reads once: the control plane's orgs, the pricing,
    and the provider clients it opened."""

    providers: ProvidersResource
    orgs: pd.DataFrame
    pricing: Pricing
    clients: dict[str, BillingProvider] = field(default_factory=dict)

    def client(self, provider: str) -> BillingProvider:
        if provider not in self.clients:
            self.clients[provider] = self.providers.client(provider)
        return self.clients[provider]

    @property
    def customers(self) -> dict[str, str]:
        return billable_customers(self.orgs)


def _description(proposal) -> str:
    return (
        f"tally credit #{proposal['proposal_id']}: {proposal['kind']} {proposal['tier']} "
        f"on {proposal['usage_date']}. {proposal['evidence']}"
    )


def _refuse(connection, proposal: dict, approval: Approval, level, net, refusal) -> tuple:
    reason, detail = refusal
    with connection.cursor() as cursor:
        cursor.execute(
            load_sql("credits/refusal.sql"),
            {
                "proposal_id": proposal["proposal_id"],
                "approver": approval.approver,
                "approver_level": approval.level,
                "proposal_level": level,
                "net_amount": net,
                "ticket_id": approval.ticket or None,
                "reason": reason,
                "detail": detail,
            },
        )
    connection.commit()
    return Outcome.REFUSED, detail


def _lock(connection, proposal_id: int) -> dict | None:
    with connection.cursor() as cursor:
        cursor.execute(load_sql("credits/lock.sql"), {"proposal_id": proposal_id})
        found = cursor.fetchone()
        if found is None:
            return None
        return dict(zip([column.name for column in cursor.description], found, strict=True))


def reprice(connection, run: CreditRun, proposal: dict) -> NetCredit:
    """The proposal net of included hours against the month's usage known now (later
    days of the month may have used included hours since it was proposed)."""
    usage_date = proposal["usage_date"]
    discrepancies = None
    if proposal["kind"] == ProposalKind.TIER_MISMATCH:
        discrepancies = read_frame(
            connection, "credits/day_discrepancies.sql", {"usage_date": usage_date}
        )
    usage = read_month_usage(connection, [proposal["org_id"]], usage_date)
    net_of = pricer(usage_date, usage, run.orgs, run.pricing, discrepancies)
    return net_of(
        proposal["org_id"],
        proposal["tier"],
        proposal["kind"],
        int(proposal["seconds"]),
        Decimal(proposal["amount"]),
    )


def reread_refusal(connection, run: CreditRun, proposal: dict, customer: str) -> str | None:
    """Re-read the provider for the proposal's day the way read-back does
    (`provider_day`, `recorded_usage`, `attribute_to_orgs`) → why it is not over any
    more (a cancel still processing when reconciled has landed since), or None."""
    from assets.provider_usage import attribute_to_orgs, provider_day

    usage_date, org_id, provider = proposal["usage_date"], proposal["org_id"], proposal["provider"]
    params = {"usage_date": usage_date}
    sent = read_frame(connection, "provider_usage/sent.sql", params)
    if sent.empty:
        sent = pd.DataFrame(columns=["org_id", "provider", "customer_id", "tier", "seconds"])
    day = provider_day(provider, run.orgs, sent)
    day.sent = {pair: by_org for pair, by_org in day.sent.items() if pair[0] == customer}
    day.current = {c: orgs for c, orgs in day.current.items() if c == customer}
    if not day.current.get(customer) and not day.sent:
        day.current[customer] = [org_id]  # a moved org: its old customer still holds it
    tiers = str(proposal["tier"]).split("+")
    recorded = run.client(provider).recorded_usage(
        usage_date, [customer], tiers, day.expected(), create_meters=False
    )
    unread = sorted(set(tiers) & set(recorded.unread_tiers))
    if unread:
        return (
            f"proposal #{proposal['proposal_id']}: {provider} could not be re-read for "
            f"{', '.join(unread)} on {usage_date}; nothing paid without a fresh read"
        )
    held = {
        pair[1]: seconds
        for org, pair, seconds in attribute_to_orgs(recorded.seconds, day)
        if org == org_id and pair[0] == customer
    }
    billable_rows = read_frame(
        connection, "credits/billable.sql", {"org_id": org_id, "usage_date": usage_date}
    )
    billable = {
        str(row.tier): int(row.billable_seconds) for row in billable_rows.itertuples(index=False)
    }
    others = read_frame(connection, "credits/day.sql", params)
    credited: dict[str, int] = {}
    if not others.empty:
        done = others[
            (others["org_id"] == org_id)
            & others["status"].isin(list(CREDITED))
            & (others["proposal_id"] != proposal["proposal_id"])
        ]
        for row in done.itertuples(index=False):
            for tier in str(row.tier).split("+"):
                credited[tier] = credited.get(tier, 0) + int(row.seconds)
    over = provider_over_seconds(tiers, held, billable, credited)
    if over >= int(proposal["seconds"]):
        return None
    shown = ", ".join(
        f"{tier} {held.get(tier, 0)} s held / {billable.get(tier, 0)} s billable" for tier in tiers
    )
    day_text = usage_date.isoformat()
    return (
        f"proposal #{proposal['proposal_id']}: {provider} no longer shows the over-charge on "
        f"{day_text} ({shown}: over by {over} s, the proposal credits {proposal['seconds']} s); "
        f"nothing paid; re-run the day (tally run --start-date {day_text} --end-date "
        f"{day_text}) to re-price or withdraw it"
    )


def apply_proposal(
    connection, run: CreditRun, proposal_id: int, approval: Approval
) -> tuple[Outcome, str]:
    """Apply one proposal under its row lock → (outcome, detail). Checks, in order:
    status, amount, customer, the approval against the level of the amount net of
    included hours (repriced now), the provider re-read; a refusal is recorded and
    nothing is applied. Raises ProviderError (the transaction is rolled back)."""
    proposal = _lock(connection, proposal_id)
    if proposal is None:
        connection.rollback()
        return Outcome.SKIPPED, "no such proposal"
    status = proposal["status"]
    if status in CREDITED:
        connection.rollback()
        return Outcome.ALREADY, f"already {status}; not applied again"
    if status != ProposalStatus.PROPOSED:
        connection.rollback()
        return Outcome.SKIPPED, (
            f"status {status}: the over-charge no longer shows in reconciliation"
        )
    amount = proposal["amount"]
    if amount is None or amount <= 0:
        connection.rollback()
        return Outcome.SKIPPED, (
            f"no amount yet; materialize credit_proposals for {proposal['usage_date']} first"
        )
    customer = proposal["customer_id"] or run.customers.get(proposal["org_id"])
    if not customer:
        connection.rollback()
        return Outcome.SKIPPED, "the org has no provider_customer_id to credit"
    net = reprice(connection, run, proposal)
    level = escalation_level(net.net_amount, bool(proposal["systemic"]))
    refusal = authority_refusal(
        proposal_id, approval.approver, approval.level, approval.ticket, level, net.net_amount
    )
    if refusal is not None:
        return _refuse(connection, proposal, approval, level, net.net_amount, refusal)
    provider = proposal["provider"]
    stale = reread_refusal(connection, run, proposal, customer)
    if stale is not None:
        refusal = (RefusalReason.PROVIDER_NOT_OVER, stale)
        return _refuse(connection, proposal, approval, level, net.net_amount, refusal)
    currency = proposal["currency"] or "usd"
    if net.net_amount > 0:
        cents = int((net.net_amount * 100).to_integral_value())
        result = run.client(provider).apply_credit(
            customer, cents, currency, _description(proposal), proposal_id
        )
    else:  # every over-charged second was inside included hours: nothing to hand back
        result = CreditResult(
            CorrectionMethod.INCLUDED_HOURS,
            None,
            f"all {net.included_seconds} s inside the org's included hours: $0 to hand back",
        )
    outcome = Outcome.MANUAL if result.method == CorrectionMethod.MANUAL else Outcome.APPLIED
    reason = proposal["evidence"]
    if result.note:
        reason = f"{reason} [{result.note}]"
    recipient = _billing_email(run.orgs, proposal["org_id"])
    if net.net_amount <= 0:
        notice = NoticeStatus.NOT_NEEDED
    else:
        notice = NoticeStatus.OWED if recipient else NoticeStatus.NO_ADDRESS
    with connection.cursor() as cursor:
        cursor.execute(
            load_sql("credits/insert_correction.sql"),
            {
                "proposal_id": proposal_id,
                "org_id": proposal["org_id"],
                "usage_date": proposal["usage_date"],
                "tier": proposal["tier"],
                "provider": provider,
                "customer_id": customer,
                "amount": net.net_amount,
                "list_amount": net.list_amount,
                "currency": currency,
                "method": result.method,
                "provider_reference": result.reference,
                "reason": reason,
                "approved_by": approval.approver,
                "approver_level": approval.level,
                "ticket_id": approval.ticket,
                "notice_status": notice,
                "notice_recipient": recipient,
            },
        )
        cursor.execute(
            load_sql("credits/mark.sql"),
            {
                "proposal_id": proposal_id,
                "status": ProposalStatus.MANUAL
                if outcome == Outcome.MANUAL
                else ProposalStatus.APPLIED,
                "approved_by": approval.approver,
                "approver_level": approval.level,
                "ticket_id": approval.ticket,
                "net_amount": net.net_amount,
                "included_seconds": net.included_seconds,
                "escalation": level,
                "customer_id": customer,
            },
        )
    connection.commit()
    detail = f"${net.net_amount} net (list ${net.list_amount}) to {provider} customer {customer}"
    detail += f" ({result.reference})" if result.reference else f" — {result.note}"
    return outcome, detail


def approve_proposal(connection, proposal_id: int, approval: Approval) -> tuple[Outcome, str]:
    """`tally credits approve`: record the approval (refused below the proposal's
    level, without a ticket or off the roster; the refusal is recorded). Nothing is
    paid here; issue_credits re-checks at the amount it reprices when it pays."""
    proposal = _lock(connection, proposal_id)
    if proposal is None:
        connection.rollback()
        return Outcome.SKIPPED, f"no proposal #{proposal_id}; see `tally credits list`"
    if proposal["status"] != ProposalStatus.PROPOSED:
        connection.rollback()
        return Outcome.SKIPPED, f"proposal #{proposal_id} is {proposal['status']}, not open"
    net = proposal["net_amount"] if proposal["net_amount"] is not None else proposal["amount"]
    if net is None:
        connection.rollback()
        return Outcome.SKIPPED, (
            f"proposal #{proposal_id} has no amount yet; materialize credit_proposals for "
            f"{proposal['usage_date']} first"
        )
    level = escalation_level(Decimal(net), bool(proposal["systemic"]))
    refusal = authority_refusal(
        proposal_id, approval.approver, approval.level, approval.ticket, level, Decimal(net)
    )
    if refusal is not None:
        return _refuse(connection, proposal, approval, level, net, refusal)
    with connection.cursor() as cursor:
        cursor.execute(
            load_sql("credits/approve.sql"),
            {
                "proposal_id": proposal_id,
                "approved_by": approval.approver,
                "approver_level": approval.level,
                "ticket_id": approval.ticket,
            },
        )
    connection.commit()
    return Outcome.APPLIED, (
        f"proposal #{proposal_id} approved by {approval.approver} ({approval.level}) under "
        f"ticket {approval.ticket}: ${net} net, level {level}"
    )


def _billing_email(orgs: pd.DataFrame, org_id: str) -> str | None:
    found = orgs[orgs["org_id"] == org_id]
    if found.empty:
        return None
    email = found["billing_email"].iloc[0]
    return email.strip() if isinstance(email, str) and email.strip() else None


def _org_name(orgs: pd.DataFrame, org_id: str) -> str:
    found = orgs[orgs["org_id"] == org_id]
    name = found["name"].iloc[0] if not found.empty else None
    return name if isinstance(name, str) and name else org_id


def deliver_notices(
    connection, smtp: SmtpResource, orgs: pd.DataFrame, proposal_ids: list[int]
) -> dict[int, str]:
    """Send the customer's "credit applied" e-mail for each correction of these
    proposals still owed. Each is marked pending in its own committed transaction
    right before the SMTP hand-off (a crash leaves it pending: never sent twice);
    SMTP unset leaves it owed for a later run → proposal id → what happened."""
    owed = read_frame(connection, "credits/notices_owed.sql", {"proposal_ids": proposal_ids})
    done: dict[int, str] = {}
    if owed.empty:
        return done
    if not smtp.configured():
        return {int(pid): "e-mail owed: SMTP_HOST unset" for pid in owed["proposal_id"]}
    for row in owed.itertuples(index=False):
        pid = int(row.proposal_id)
        with connection.cursor() as cursor:
            cursor.execute(load_sql("credits/notice_claim.sql"), {"proposal_id": pid})
            claimed = cursor.fetchone()
        connection.commit()
        if claimed is None:  # another run took it
            continue
        message = credit_notice_message(
            CreditNotice(
                org_name=_org_name(orgs, row.org_id),
                ticket_id=str(row.ticket_id or ""),
                amount=Decimal(row.amount),
                currency=str(row.currency),
                usage_date=row.usage_date,
                tier=str(row.tier),
                seconds=int(row.seconds),
                manual=row.method == CorrectionMethod.MANUAL,
            )
        )
        status, error = NoticeStatus.SENT, None
        try:
            smtp.send(row.notice_recipient, message.subject, message.text, message.html)
        except NotifyError as failure:
            status, error = NoticeStatus.FAILED, str(failure)
        with connection.cursor() as cursor:
            cursor.execute(
                load_sql("credits/notice_mark.sql"),
                {"proposal_id": pid, "notice_status": status, "notice_error": error},
            )
        connection.commit()
        done[pid] = f"e-mail to {row.notice_recipient}: {status}" + (f" ({error})" if error else "")
    return done


@op(
    description=(
        "Apply approved credit proposals (config: proposal_ids, approver, ticket) at the "
        "provider (Stripe: negative customer balance transaction; Polar: recorded for "
        "manual action), net of included hours, after re-reading the provider's day; "
        "refuses an approver below the proposal's level (roster: config/approvers.toml), "
        "records everything in billing.billing_corrections / billing.credit_refusals and "
        "e-mails the customer once. Never applies a proposal twice."
    )
)
def apply_credits(
    context: OpExecutionContext,
    config: IssueCreditsConfig,
    postgres: PostgresResource,
    providers: ProvidersResource,
    smtp: SmtpResource,
) -> Output:
    from assets.approvers import roster_or_fail  # it imports the levels from here

    approver = config.approver.strip()
    if not approver:
        raise Failure(description="approver is empty; set the approver's name or e-mail")
    ids = sorted(set(config.proposal_ids))
    if not ids:
        raise Failure(description="proposal_ids is empty; list the proposals to apply")
    roster = roster_or_fail()
    approval = Approval(approver, roster.level_of(approver), config.ticket.strip())
    run = CreditRun(providers, _orgs(postgres), pricing_or_fail())
    outcomes: dict[int, tuple[str, str]] = {}
    with raw_connection(postgres.billing_engine()) as connection:
        for proposal_id in ids:
            try:
                outcomes[proposal_id] = apply_proposal(connection, run, proposal_id, approval)
            except ProviderError as error:
                connection.rollback()
                outcomes[proposal_id] = (Outcome.FAILED, str(error))
            context.log.info(f"proposal {proposal_id}: {' — '.join(outcomes[proposal_id])}")
        notices = deliver_notices(connection, smtp, run.orgs, ids)
    for pid, line in notices.items():
        context.log.info(f"proposal {pid}: {line}")
    counts = {
        outcome.value: sum(1 for found, _ in outcomes.values() if found == outcome)
        for outcome in Outcome
    }
    table = markdown_table(
        ["proposal", "outcome", "detail", "customer e-mail"],
        [
            (pid, outcome, detail, notices.get(pid, "–"))
            for pid, (outcome, detail) in outcomes.items()
        ],
        numeric={"proposal"},
    )
    metadata: dict[str, Any] = {
        **counts,
        "approver": approver,
        "approver_level": str(approval.level or "not on the roster"),
        "ticket": approval.ticket or "–",
        "outcomes": MetadataValue.md(table),
    }
    problems = [
        detail if detail.startswith("proposal #") else f"proposal #{pid}: {detail}"
        for pid, (found, detail) in outcomes.items()
        if found in (Outcome.REFUSED, Outcome.FAILED)
    ]
    if problems:
        # The allowed ones are applied (and mailed) above; the run fails naming the rest.
        raise Failure(description="; ".join(problems), metadata=metadata, allow_retries=False)
    return Output({pid: str(outcome) for pid, (outcome, _) in outcomes.items()}, metadata=metadata)
