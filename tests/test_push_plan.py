"""`plan_push` as a decision table, without a database: small frames shaped like
push/targets.sql, push/orgs.sql and push/ledger.sql in, the full action list out.
Any change to what the plan does, or to its order, fails here."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from assets.push_plan import (
    LEDGER_COLUMNS,
    TARGET_COLUMNS,
    PushAction,
    PushActionKind,
    plan_push,
)

SQL = Path(__file__).resolve().parents[1] / "sql" / "push"
ORG_COLUMNS = ["org_id", "provider", "provider_customer_id"]

DAY = dt.date(2024, 3, 4)
NOON = dt.datetime(2024, 3, 4, 12, tzinfo=dt.UTC)
NOW = NOON + dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
SECOND = dt.timedelta(seconds=1)

RESEND = PushActionKind.RESEND
VERIFY = PushActionKind.VERIFY
CANCEL = PushActionKind.CANCEL

UNKNOWN_PAYPAL = "unknown provider 'paypal'; set organizations.provider to stripe or polar"
UNKNOWN_NONE = "unknown provider None; set organizations.provider to stripe or polar"
NO_CUSTOMER = "no provider_customer_id; set it on the organization, then re-run the day"
TOO_OLD = "older than 35 days: Stripe refuses the event; issue an invoice item by hand"
FUTURE = "usage day not yet at noon UTC: the provider refuses future timestamps"


# --- input rows --------------------------------------------------------------


def ident(org_id: str, tier: str, seq: int) -> str:
    """The identifier format, spelled out (not through identifier_for)."""
    return f"tally:{org_id}:2024-03-04:{tier}:{seq}"


def org(org_id: str, provider: str | None = "stripe", customer: object = None) -> tuple:
    if customer is None and provider is not None:
        customer = f"cus_{org_id}"
    return (org_id, provider, customer)


def row(
    org_id: str,
    tier: str,
    seq: int,
    quantity: int,
    status: str,
    *,
    provider: str = "stripe",
    sent_ago: dt.timedelta | None = None,
    created_ago: dt.timedelta = 2 * HOUR,
) -> tuple:
    """A ledger row; sent rows default to 30 h old (past the cancel window)."""
    if sent_ago is None and status in ("sent", "cancelling", "cancelled"):
        sent_ago = 30 * HOUR
    sent_at = None if sent_ago is None else NOW - sent_ago
    return (
        org_id,
        tier,
        seq,
        provider,
        f"cus_{org_id}",
        quantity,
        ident(org_id, tier, seq),
        status,
        sent_at,
        NOW - created_ago,
    )


@dataclass
class Day:
    targets: list[tuple] = field(default_factory=list)
    orgs: list[tuple] = field(default_factory=lambda: [org("org-a")])
    ledger: list[tuple] = field(default_factory=list)
    now: dt.datetime = NOW


# --- expected actions --------------------------------------------------------


def send(
    org_id: str, tier: str, seconds: int, seq: int, provider: str = "stripe", customer: str = ""
) -> PushAction:
    return PushAction(
        PushActionKind.SEND,
        org_id,
        tier,
        provider,
        customer or f"cus_{org_id}",
        seconds,
        seq,
        ident(org_id, tier, seq),
    )


def on_row(
    kind: PushActionKind, org_id: str, tier: str, seq: int, quantity: int, provider: str = "stripe"
) -> PushAction:
    return PushAction(
        kind, org_id, tier, provider, f"cus_{org_id}", quantity, seq, ident(org_id, tier, seq)
    )


def refuse(
    org_id: str,
    tier: str,
    seconds: int,
    reason: str,
    provider: str | None = "stripe",
    customer: str | None = "",
) -> PushAction:
    if customer == "":
        customer = f"cus_{org_id}"
    return PushAction(
        PushActionKind.REFUSE, org_id, tier, provider, customer, seconds, reason=reason
    )


def credit(
    org_id: str, tier: str, delivered: int, billable: int, provider: str = "stripe"
) -> PushAction:
    return PushAction(
        PushActionKind.CREDIT,
        org_id,
        tier,
        provider,
        f"cus_{org_id}",
        delivered - billable,
        reason=f"{delivered} s delivered, past the cancel window; billable {billable} s",
    )


# --- the table ---------------------------------------------------------------

CASES = [
    # Nothing to do.
    pytest.param(Day(), [], id="empty-day"),
    pytest.param(Day(targets=[("org-a", "small", 0)]), [], id="zero-target-no-ledger"),
    pytest.param(
        Day(targets=[("org-a", "small", 3600)], ledger=[row("org-a", "small", 1, 3600, "sent")]),
        [],
        id="delta-zero-after-sent",
    ),
    # Sends.
    pytest.param(
        Day(targets=[("org-a", "small", 3600)]),
        [
            PushAction(
                PushActionKind.SEND,
                "org-a",
                "small",
                "stripe",
                "cus_org-a",
                3600,
                1,
                "tally:org-a:2024-03-04:small:1",
            )
        ],
        id="first-send-seq-1",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 5000)],
            ledger=[row("org-a", "small", 1, 3600, "sent"), row("org-a", "small", 2, 600, "sent")],
        ),
        [send("org-a", "small", 800, 3)],
        id="increase-on-top-of-sent-next-seq",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 4200)],
            ledger=[
                row("org-a", "small", 1, 3600, "sent"),
                row("org-a", "small", 2, 600, "failed"),
            ],
        ),
        [send("org-a", "small", 600, 3)],
        id="failed-row-not-delivered-but-takes-its-seq",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 3600)],
            ledger=[row("org-a", "small", 1, 3600, "cancelled")],
        ),
        [send("org-a", "small", 3600, 2)],
        id="cancelled-row-not-delivered",
    ),
    pytest.param(
        Day(targets=[("org-p", "small", 3600)], orgs=[org("org-p", "polar")]),
        [send("org-p", "small", 3600, 1, provider="polar")],
        id="first-send-polar",
    ),
    # Rows a previous run left pending or cancelling.
    pytest.param(
        Day(
            targets=[("org-a", "small", 3600)],
            ledger=[row("org-a", "small", 1, 3600, "pending", created_ago=HOUR)],
        ),
        [on_row(RESEND, "org-a", "small", 1, 3600)],
        id="pending-resent-same-identifier",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 4000)],
            ledger=[row("org-a", "small", 1, 3600, "pending")],
        ),
        [on_row(RESEND, "org-a", "small", 1, 3600), send("org-a", "small", 400, 2)],
        id="pending-counts-as-delivered-resend-before-send",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 3600)],
            ledger=[row("org-a", "small", 1, 3600, "pending", created_ago=23 * HOUR)],
        ),
        [on_row(VERIFY, "org-a", "small", 1, 3600)],
        id="stripe-pending-at-23h-verify",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 3600)],
            ledger=[row("org-a", "small", 1, 3600, "pending", created_ago=23 * HOUR - SECOND)],
        ),
        [on_row(RESEND, "org-a", "small", 1, 3600)],
        id="stripe-pending-just-under-23h-resend",
    ),
    pytest.param(
        Day(
            targets=[("org-p", "small", 3600)],
            orgs=[org("org-p", "polar")],
            ledger=[
                row("org-p", "small", 1, 3600, "pending", provider="polar", created_ago=72 * HOUR)
            ],
        ),
        [on_row(RESEND, "org-p", "small", 1, 3600, provider="polar")],
        id="polar-pending-old-resend",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 1800)],
            ledger=[
                row("org-a", "small", 1, 3600, "cancelling", sent_ago=HOUR),
                row("org-a", "small", 2, 1800, "sent"),
            ],
        ),
        [on_row(CANCEL, "org-a", "small", 1, 3600)],
        id="cancelling-row-cancelled-again",
    ),
    # Refusals.
    pytest.param(
        Day(targets=[("org-a", "small", 3600)], orgs=[org("org-a", "paypal")]),
        [refuse("org-a", "small", 3600, UNKNOWN_PAYPAL, provider="paypal")],
        id="refuse-unknown-provider",
    ),
    pytest.param(
        Day(targets=[("org-z", "small", 3600)]),
        [refuse("org-z", "small", 3600, UNKNOWN_NONE, provider=None, customer=None)],
        id="refuse-org-not-in-control-plane",
    ),
    pytest.param(
        Day(targets=[("org-a", "small", 3600)], orgs=[("org-a", "stripe", None)]),
        [refuse("org-a", "small", 3600, NO_CUSTOMER, customer=None)],
        id="refuse-customer-none",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 3600), ("org-b", "small", 60)],
            orgs=[("org-a", "stripe", float("nan")), org("org-b")],
        ),
        [
            send("org-b", "small", 60, 1),
            refuse("org-a", "small", 3600, NO_CUSTOMER, customer=None),
        ],
        id="refuse-customer-nan",
    ),
    pytest.param(
        Day(targets=[("org-a", "small", 3600)], orgs=[("org-a", "polar", "")]),
        [refuse("org-a", "small", 3600, NO_CUSTOMER, provider="polar", customer=None)],
        id="refuse-customer-empty-string",
    ),
    pytest.param(
        Day(targets=[("org-a", "small", 3600)], now=NOON + dt.timedelta(days=35)),
        [send("org-a", "small", 3600, 1)],
        id="stripe-exactly-35-days-sent",
    ),
    pytest.param(
        Day(targets=[("org-a", "small", 3600)], now=NOON + dt.timedelta(days=35) + SECOND),
        [refuse("org-a", "small", 3600, TOO_OLD)],
        id="refuse-stripe-just-over-35-days",
    ),
    pytest.param(
        Day(
            targets=[("org-p", "small", 3600)],
            orgs=[org("org-p", "polar")],
            now=NOON + dt.timedelta(days=60),
        ),
        [send("org-p", "small", 3600, 1, provider="polar")],
        id="polar-old-day-sent",
    ),
    pytest.param(
        Day(targets=[("org-a", "small", 3600)], now=NOON - dt.timedelta(minutes=5)),
        [send("org-a", "small", 3600, 1)],
        id="noon-minus-5min-sent",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 3600)],
            now=NOON - dt.timedelta(minutes=5) - SECOND,
        ),
        [refuse("org-a", "small", 3600, FUTURE)],
        id="refuse-before-noon-minus-5min",
    ),
    # Decreases.
    pytest.param(
        Day(
            targets=[("org-a", "small", 4000)],
            ledger=[
                row("org-a", "small", 1, 3600, "sent"),
                row("org-a", "small", 2, 1800, "sent", sent_ago=HOUR),
            ],
        ),
        [on_row(CANCEL, "org-a", "small", 2, 1800), send("org-a", "small", 400, 3)],
        id="stripe-decrease-cancel-young-send-remainder",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 1000)],
            ledger=[
                row("org-a", "small", 1, 3600, "sent", sent_ago=2 * HOUR),
                row("org-a", "small", 2, 1800, "sent", sent_ago=HOUR),
            ],
        ),
        [
            on_row(CANCEL, "org-a", "small", 1, 3600),
            on_row(CANCEL, "org-a", "small", 2, 1800),
            send("org-a", "small", 1000, 3),
        ],
        id="stripe-decrease-cancel-all-young-send-target",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 3600)],
            ledger=[
                row("org-a", "small", 1, 3600, "sent"),
                row("org-a", "small", 2, 1800, "sent", sent_ago=HOUR),
            ],
        ),
        [on_row(CANCEL, "org-a", "small", 2, 1800)],
        id="stripe-decrease-cancel-exactly-the-excess",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 1800)],
            ledger=[row("org-a", "small", 1, 3600, "sent")],
        ),
        [credit("org-a", "small", 3600, 1800)],
        id="stripe-decrease-past-cancel-window-credit",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 1800)],
            ledger=[
                row("org-a", "small", 1, 3600, "sent", sent_ago=dt.timedelta(hours=23, minutes=30))
            ],
        ),
        [credit("org-a", "small", 3600, 1800)],
        id="stripe-decrease-at-23h30-credit",
    ),
    pytest.param(
        Day(
            targets=[("org-a", "small", 1800)],
            ledger=[
                row(
                    "org-a",
                    "small",
                    1,
                    3600,
                    "sent",
                    sent_ago=dt.timedelta(hours=23, minutes=30) - SECOND,
                )
            ],
        ),
        [on_row(CANCEL, "org-a", "small", 1, 3600), send("org-a", "small", 1800, 2)],
        id="stripe-decrease-just-under-23h30-cancel",
    ),
    pytest.param(
        Day(
            targets=[("org-p", "small", 1800)],
            orgs=[org("org-p", "polar")],
            ledger=[row("org-p", "small", 1, 3600, "sent", provider="polar", sent_ago=HOUR)],
        ),
        [credit("org-p", "small", 3600, 1800, provider="polar")],
        id="polar-decrease-credit-no-cancel",
    ),
    pytest.param(
        Day(ledger=[row("org-a", "small", 1, 3600, "sent", sent_ago=HOUR)]),
        [on_row(CANCEL, "org-a", "small", 1, 3600)],
        id="stripe-decrease-to-zero-cancel-no-send",
    ),
    pytest.param(
        Day(ledger=[row("org-a", "small", 1, 3600, "sent")]),
        [credit("org-a", "small", 3600, 0)],
        id="stripe-decrease-to-zero-old-credit",
    ),
    # Order: resends, then cancels, then sends, then refusals and credits; each group
    # by (org_id, tier) whatever the input order.
    pytest.param(
        Day(
            targets=[
                ("org-e", "small", 60),
                ("org-d", "small", 100),
                ("org-c", "small", 1800),
                ("org-b", "small", 3600),
                ("org-a", "small", 4000),
                ("org-a", "gpu", 120),
            ],
            orgs=[
                org("org-e"),
                org("org-d"),
                org("org-c"),
                ("org-b", "polar", None),
                org("org-a"),
            ],
            ledger=[
                row("org-a", "small", 1, 3600, "pending"),
                row("org-c", "small", 1, 3600, "cancelling"),
                row("org-c", "small", 2, 1800, "sent"),
                row("org-d", "small", 1, 300, "sent"),
                row("org-e", "small", 1, 30, "pending", created_ago=24 * HOUR),
                row("org-e", "small", 2, 60, "sent", sent_ago=HOUR),
            ],
        ),
        [
            on_row(RESEND, "org-a", "small", 1, 3600),
            on_row(VERIFY, "org-e", "small", 1, 30),
            on_row(CANCEL, "org-c", "small", 1, 3600),
            on_row(CANCEL, "org-e", "small", 2, 60),
            send("org-a", "gpu", 120, 1),
            send("org-a", "small", 400, 2),
            send("org-e", "small", 30, 3),
            refuse("org-b", "small", 3600, NO_CUSTOMER, provider="polar", customer=None),
            credit("org-d", "small", 300, 100),
        ],
        id="order-across-orgs",
    ),
]


@pytest.mark.parametrize(("day", "expected"), CASES)
def test_plan_push(day: Day, expected: list[PushAction]) -> None:
    targets = pd.DataFrame(day.targets, columns=TARGET_COLUMNS)
    orgs = pd.DataFrame(day.orgs, columns=ORG_COLUMNS)
    ledger = pd.DataFrame(day.ledger, columns=LEDGER_COLUMNS)
    assert plan_push(DAY, targets, orgs, ledger, day.now) == expected


@pytest.mark.parametrize(
    ("sql", "columns"),
    [
        ("targets.sql", TARGET_COLUMNS),
        ("orgs.sql", ORG_COLUMNS),
        ("ledger.sql", LEDGER_COLUMNS),
    ],
)
def test_frames_have_the_columns_the_queries_select(sql: str, columns: list[str]) -> None:
    text = (SQL / sql).read_text()
    selected = re.search(r"SELECT\s+(.*?)\s+FROM", text, re.DOTALL)
    assert selected is not None
    assert [name.strip() for name in selected.group(1).split(",")] == columns


# --- the world changes between runs (issue 9) ------------------------------------


def at_account(ledger_row: tuple, provider: str, customer: str) -> tuple:
    """A ledger row sent to another (provider, customer) than the org's own."""
    return ledger_row[:3] + (provider, customer) + ledger_row[5:]


CHANGES = [
    pytest.param(
        # Stripe cus_x got 7,200 s, the org moved to Polar ext_x and got 3,600 s more;
        # billable falls to 9,000: the young Stripe event is cancelled and the rest
        # goes to the org's current account, never to Stripe under the Polar id.
        Day(
            targets=[("org-x", "small", 9000)],
            orgs=[org("org-x", "polar", "ext_x")],
            ledger=[
                at_account(
                    row("org-x", "small", 1, 7200, "sent", sent_ago=HOUR), "stripe", "cus_x"
                ),
                at_account(
                    row("org-x", "small", 2, 3600, "sent", provider="polar", sent_ago=HOUR),
                    "polar",
                    "ext_x",
                ),
            ],
        ),
        [
            PushAction(
                CANCEL, "org-x", "small", "stripe", "cus_x", 7200, 1, ident("org-x", "small", 1)
            ),
            send("org-x", "small", 5400, 3, provider="polar", customer="ext_x"),
        ],
        id="moved-provider-decrease-cancels-old-sends-to-current",
    ),
    pytest.param(
        # The same, with the Stripe event past the cancel window: 1,800 s too many
        # stand, proposed as a credit where most of the day was charged.
        Day(
            targets=[("org-x", "small", 9000)],
            orgs=[org("org-x", "polar", "ext_x")],
            ledger=[
                at_account(row("org-x", "small", 1, 7200, "sent"), "stripe", "cus_x"),
                at_account(
                    row("org-x", "small", 2, 3600, "sent", provider="polar"), "polar", "ext_x"
                ),
            ],
        ),
        [
            PushAction(
                PushActionKind.CREDIT,
                "org-x",
                "small",
                "stripe",
                "cus_x",
                1800,
                reason="10800 s delivered, past the cancel window; billable 9000 s",
            )
        ],
        id="moved-provider-old-decrease-credits-where-charged",
    ),
    pytest.param(
        # A cancel Stripe refused: the event stands and is never cancelled again nor
        # replaced; its excess is a credit.
        Day(
            targets=[("org-a", "small", 1800)],
            ledger=[row("org-a", "small", 1, 3600, "cancel_refused", sent_ago=HOUR)],
        ),
        [
            PushAction(
                PushActionKind.CREDIT,
                "org-a",
                "small",
                "stripe",
                "cus_org-a",
                1800,
                reason="3600 s delivered, past the cancel window; billable 1800 s",
            )
        ],
        id="cancel-refused-counts-as-delivered-credit",
    ),
    pytest.param(
        # More usage after a refused cancel: only the difference goes out.
        Day(
            targets=[("org-a", "small", 5400)],
            ledger=[row("org-a", "small", 1, 3600, "cancel_refused", sent_ago=HOUR)],
        ),
        [send("org-a", "small", 1800, 2)],
        id="cancel-refused-then-more-usage-sends-the-difference",
    ),
]


@pytest.mark.parametrize(("day", "expected"), CHANGES)
def test_plan_push_when_the_world_changes(day: Day, expected: list[PushAction]) -> None:
    test_plan_push(day, expected)


def test_long_org_ids_get_a_stable_digest_within_stripes_limit() -> None:
    from assets.push_plan import MAX_IDENTIFIER, identifier_for

    long_org = "org-" + "x" * 120
    first = identifier_for(long_org, DAY, "gpu", 1)
    assert len(first) <= MAX_IDENTIFIER
    assert first == identifier_for(long_org, DAY, "gpu", 1)  # stable across runs
    assert first != identifier_for(long_org + "y", DAY, "gpu", 1)
    assert first.startswith("tally:#") and first.endswith(":2024-03-04:gpu:1")
    # Short ids keep the readable form.
    assert identifier_for("org-a", DAY, "gpu", 1) == "tally:org-a:2024-03-04:gpu:1"
