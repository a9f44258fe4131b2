"""The budget-alert enums match billing.budget_alert_ledger: the statuses are exactly
what the status column's CHECK constraint (migration 0004) allows, read back from
pg_constraint, and every action but `send` settles a row with a status of that name."""

from __future__ import annotations

import re

import sqlalchemy as sa

from assets.budget_alerts import AlertAction, BudgetAlertStatus


def ledger_status_values(engine: sa.Engine) -> set[str]:
    """The values the CHECK (status IN (...)) constraint of the ledger allows."""
    with engine.connect() as connection:
        definitions = (
            connection.execute(
                sa.text(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = 'billing.budget_alert_ledger'::regclass AND contype = 'c'"
                )
            )
            .scalars()
            .all()
        )
    # e.g. CHECK ((status = ANY (ARRAY['queued'::text, 'pending'::text, ...])))
    (definition,) = [text for text in definitions if re.search(r"\(\(?status\b", text)]
    return set(re.findall(r"'([^']*)'::text", definition))


def test_budget_alert_status_matches_the_check_constraint(engine: sa.Engine) -> None:
    allowed = ledger_status_values(engine)
    assert {"queued", "sent", "superseded"} <= allowed  # the constraint was really parsed
    assert {status.value for status in BudgetAlertStatus} == allowed


def test_every_action_but_send_is_a_ledger_status() -> None:
    settled = {action.value for action in AlertAction} - {AlertAction.SEND.value}
    assert settled <= {status.value for status in BudgetAlertStatus}
    assert AlertAction.SEND.value not in {status.value for status in BudgetAlertStatus}
