"""Credits for over-charges (DESIGN §4): proposals with amount, evidence and
escalation level, and the `issue_credits` op that applies approved ones at the
provider and records them in `billing.billing_corrections`.

Escalation: ≤ $50 a support agent, ≤ $500 a support lead, above that the VP
Engineering; when the same kind of over-charge hits ≥ 5 orgs on one day it is a
systemic bug and goes to engineering whatever the amount.

Never twice: a proposal is applied in one transaction holding its row lock
(`SELECT … FOR UPDATE`); a concurrent run waits, then finds it applied. A crash
between the provider call and the commit leaves the proposal `proposed`; the re-run
calls Stripe with the same Idempotency-Key (`tally-credit-{id}`, which replays the
first answer) after looking for a balance transaction already tagged with the
proposal id (which covers re-runs after Stripe's 24 h key lifetime).
"""

import datetime as dt
from collections.abc import Collection, Iterable
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
from assets.discrepancy import DiscrepancyKind, list_dollars, with_columns
from assets.markdown import markdown_table
from assets.pricing import Pricing, to_cents
from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.db import PostgresResource, load_sql, lock_day, raw_connection, read_frame
from resources.providers import (
    BillingProvider,
    CorrectionMethod,
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


def plan_proposals(
    usage_date: dt.date,
    candidates: pd.DataFrame,
    existing: pd.DataFrame,
    orgs: pd.DataFrame,
    pricing: Pricing | None = None,
    systemic_orgs: int = SYSTEMIC_ORGS,
) -> tuple[list[dict], list[dict], list[int]]:
    """What to write for one day → (upserts of reconciliation proposals, updates of
    usage_push's push_over_sent proposals still open, proposal ids to withdraw).

    A kind is systemic when it hits `systemic_orgs` or more orgs that day (counting
    open and applied proposals and the new candidates)."""
    pricing = pricing or Pricing()
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
                ),
                # The customer that was charged (it may no longer be the org's).
                "customer_id": usable_customer_id(getattr(row, "customer_id", None))
                or customers.get(row.org_id),
                "escalation": escalation_level(row.amount, is_systemic),
                "systemic": is_systemic,
            }
        )
    updates = []
    for row in existing[existing["status"] == ProposalStatus.PROPOSED].itertuples(index=False):
        if row.kind in RECONCILE_KINDS:
            continue
        amount = to_cents(pricing.amount(int(row.seconds), row.tier))
        is_systemic = systemic(row.kind)
        updates.append(
            {
                "proposal_id": int(row.proposal_id),
                "amount": amount,
                "customer_id": usable_customer_id(row.customer_id) or customers.get(row.org_id),
                "escalation": escalation_level(amount, is_systemic),
                "systemic": is_systemic,
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
            row.escalation or "–",
            row.status,
        ]
        for row in top.itertuples(index=False)
    ]
    return markdown_table(
        ["id", "org", "tier", "kind", "seconds", "amount", "escalation", "status"],
        rows,
        numeric={"id", "seconds", "amount"},
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


def _orgs(postgres: PostgresResource) -> pd.DataFrame:
    with raw_connection(postgres.control_engine()) as connection:
        orgs = read_frame(connection, "provider_usage/orgs.sql")
    if orgs.empty:
        orgs = pd.DataFrame(columns=["org_id", "provider", "provider_customer_id"])
    return orgs


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
        upserts, updates, withdraw = plan_proposals(usage_date, candidates, existing, orgs, pricing)
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
        stored = pd.DataFrame(columns=PROPOSAL_COLUMNS)
    open_ = stored[stored["status"] == ProposalStatus.PROPOSED]
    total = sum((amount for amount in open_["amount"] if amount is not None), Decimal(0))
    by_level = open_["escalation"].value_counts().to_dict()
    metadata: dict[str, Any] = {
        "usage_date": usage_date.isoformat(),
        "open_proposals": len(open_),
        "open_credit_dollars": MetadataValue.float(float(total)),
        "withdrawn_now": len(withdraw),
        "applied": int((stored["status"].isin(list(CREDITED))).sum()),
        "proposals": MetadataValue.md(_proposals_markdown(stored)),
    }
    for level in ESCALATION_LEVELS:
        metadata[f"open_{level}"] = int(by_level.get(level, 0))
    return MaterializeResult(metadata=metadata)


class IssueCreditsConfig(Config):
    """Which proposals to apply and who approved them."""

    proposal_ids: list[int]
    approver: str


def _description(proposal) -> str:
    return (
        f"tally credit #{proposal['proposal_id']}: {proposal['kind']} {proposal['tier']} "
        f"on {proposal['usage_date']}. {proposal['evidence']}"
    )


def apply_proposal(
    connection,
    providers: ProvidersResource,
    clients: dict[str, BillingProvider],
    proposal_id: int,
    approver: str,
    customers: dict[str, str],
) -> tuple[str, str]:
    """Apply one proposal under its row lock → (outcome, detail). Outcomes: applied,
    manual, already, skipped. Raises ProviderError (the transaction is rolled back)."""
    with connection.cursor() as cursor:
        cursor.execute(load_sql("credits/lock.sql"), {"proposal_id": proposal_id})
        found = cursor.fetchone()
        if found is None:
            connection.rollback()
            return "skipped", "no such proposal"
        proposal = dict(zip([column.name for column in cursor.description], found, strict=True))
    status = proposal["status"]
    if status in CREDITED:
        connection.rollback()
        return "already", f"already {status}; not applied again"
    if status != ProposalStatus.PROPOSED:
        connection.rollback()
        return "skipped", f"status {status}: the over-charge no longer shows in reconciliation"
    amount = proposal["amount"]
    if amount is None or amount <= 0:
        connection.rollback()
        return "skipped", (
            f"no amount yet; materialize credit_proposals for {proposal['usage_date']} first"
        )
    customer = proposal["customer_id"] or customers.get(proposal["org_id"])
    if not customer:
        connection.rollback()
        return "skipped", "the org has no provider_customer_id to credit"
    provider = proposal["provider"]
    client = clients.get(provider)
    if client is None:
        client = clients[provider] = providers.client(provider)
    cents = int((Decimal(amount) * 100).to_integral_value())
    result = client.apply_credit(
        customer, cents, proposal["currency"] or "usd", _description(proposal), proposal_id
    )
    outcome = (
        ProposalStatus.APPLIED
        if result.method == CorrectionMethod.STRIPE_BALANCE_TRANSACTION
        else ProposalStatus.MANUAL
    )
    reason = proposal["evidence"]
    if result.note:
        reason = f"{reason} [{result.note}]"
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
                "amount": amount,
                "currency": proposal["currency"] or "usd",
                "method": result.method,
                "provider_reference": result.reference,
                "reason": reason,
                "approved_by": approver,
            },
        )
        cursor.execute(
            load_sql("credits/mark.sql"),
            {
                "proposal_id": proposal_id,
                "status": outcome,
                "approved_by": approver,
                "customer_id": customer,
            },
        )
    connection.commit()
    detail = f"${amount} to {provider} customer {customer}"
    detail += f" ({result.reference})" if result.reference else f" — {result.note}"
    return outcome, detail


@op(
    description=(
        "Apply approved credit proposals at the provider (Stripe: negative customer "
        "balance transaction; Polar: recorded for manual action) and record them in "
        "billing.billing_corrections. Never applies a proposal twice."
    )
)
def apply_credits(
    context: OpExecutionContext,
    config: IssueCreditsConfig,
    postgres: PostgresResource,
    providers: ProvidersResource,
) -> Output:
    approver = config.approver.strip()
    if not approver:
        raise Failure(description="approver is empty; set the approver's name or e-mail")
    ids = sorted(set(config.proposal_ids))
    if not ids:
        raise Failure(description="proposal_ids is empty; list the proposals to apply")
    customers = billable_customers(_orgs(postgres))
    clients: dict[str, BillingProvider] = {}
    outcomes: dict[int, tuple[str, str]] = {}
    with raw_connection(postgres.billing_engine()) as connection:
        for proposal_id in ids:
            try:
                outcomes[proposal_id] = apply_proposal(
                    connection, providers, clients, proposal_id, approver, customers
                )
            except ProviderError as error:
                connection.rollback()
                outcomes[proposal_id] = ("failed", str(error))
            context.log.info(f"proposal {proposal_id}: {' — '.join(outcomes[proposal_id])}")
    counts = {
        name: sum(1 for outcome, _ in outcomes.values() if outcome == name)
        for name in ("applied", "manual", "already", "skipped", "failed")
    }
    table = markdown_table(
        ["proposal", "outcome", "detail"],
        [(pid, outcome, detail) for pid, (outcome, detail) in outcomes.items()],
        numeric={"proposal"},
    )
    metadata: dict[str, Any] = {
        **counts,
        "approver": approver,
        "outcomes": MetadataValue.md(table),
    }
    if counts["failed"]:
        failed = [f"#{pid}: {detail}" for pid, (o, detail) in outcomes.items() if o == "failed"]
        raise Failure(description="; ".join(failed), metadata=metadata)
    return Output({pid: outcome for pid, (outcome, _) in outcomes.items()}, metadata=metadata)
