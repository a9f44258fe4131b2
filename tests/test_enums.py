"""Each enum that names a stored value matches its migration's CHECK constraint, read
back from pg_constraint: adding a kind or a status in one place and not the other
fails here."""

from __future__ import annotations

import re
from enum import StrEnum

import pytest
import sqlalchemy as sa

from assets.credits import EscalationLevel, ProposalStatus
from assets.discrepancy import DiscrepancyKind
from assets.push_plan import LedgerStatus
from pipelines.freshness import AlertDelivery, FreshnessState
from resources.providers import CorrectionMethod


def allowed_values(engine: sa.Engine, table: str, column: str) -> set[str]:
    """The values a CHECK (column IN (...)) constraint of `table` allows."""
    with engine.connect() as connection:
        definitions = connection.execute(
            sa.text(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = CAST(:table AS regclass) AND contype = 'c'"
            ),
            {"table": table},
        ).scalars()
        for definition in definitions:
            # e.g. CHECK ((kind = ANY (ARRAY['unpushed'::text, ...])))
            if re.search(rf"\(\(?{column}\b", definition) and "ARRAY" in definition:
                return set(re.findall(r"'([^']*)'::text", definition))
    raise AssertionError(f"no CHECK constraint on {table}.{column}")


@pytest.mark.parametrize(
    ("enum", "table", "column"),
    [
        (DiscrepancyKind, "billing.discrepancies", "kind"),
        (ProposalStatus, "billing.credit_proposals", "status"),
        (EscalationLevel, "billing.credit_proposals", "escalation"),
        (FreshnessState, "billing.freshness_alerts", "state"),
        (AlertDelivery, "billing.freshness_alerts", "status"),
        (LedgerStatus, "billing.usage_push_ledger", "status"),
        (CorrectionMethod, "billing.billing_corrections", "method"),
    ],
)
def test_enum_matches_check_constraint(
    engine: sa.Engine, enum: type[StrEnum], table: str, column: str
) -> None:
    assert {member.value for member in enum} == allowed_values(engine, table, column)
