"""`tally explain --day D --org O --kind K [--tier T] --reason TEXT --by NAME`
(and `--revoke`): acknowledge a discrepancy without SQL.

The explanation goes to `billing.discrepancy_explanations` (what every later
reconciliation of the day applies, assets/reconcile.py) and, in the same
transaction, marks the day's stored rows explained with the same note, so the finance
review and `tally org` show it at once. Without `--tier` every tier of that (day, kind,
org) is explained. `--revoke` withdraws it (who and when stay on record, migration
0010) and makes the rows it explained unexplained again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


class ExplainError(ValueError):
    """A mistake the user can fix; the message names it and the fix."""


@dataclass(frozen=True)
class ExplainRequest:
    usage_date: dt.date
    org_id: str
    kind: str
    tier: str | None  # None: every tier of the (day, kind, org)
    reason: str | None
    by: str
    revoke: bool = False


def check_request(request: ExplainRequest) -> ExplainRequest:
    """The request with its text trimmed, or ExplainError naming what is wrong."""
    from assets.discrepancy import KINDS

    if request.kind not in KINDS:
        raise ExplainError(
            f"unknown kind '{request.kind}'; kinds: {', '.join(kind.value for kind in KINDS)}"
        )
    by = request.by.strip()
    if not by:
        raise ExplainError("--by is empty; give your name or e-mail, e.g. --by alice@example.com")
    reason = (request.reason or "").strip()
    if not request.revoke and not reason:
        raise ExplainError("--reason is empty; say why this discrepancy is acceptable")
    if request.revoke and reason:
        raise ExplainError("--revoke takes no --reason; drop one of them")
    if not request.org_id.strip():
        raise ExplainError("--org is empty; give the org id, e.g. --org org-0001")
    return ExplainRequest(
        request.usage_date,
        request.org_id.strip(),
        request.kind,
        None if request.tier is None else request.tier.strip(),
        reason or None,
        by,
        request.revoke,
    )


def _note(explanation: str, by: str) -> str:
    """What reconciliation appends to an explained row's detail (assets/reconcile.py)."""
    return f"; explained: {explanation} ({by})"


def explain(control_engine, billing_engine, request: ExplainRequest) -> list[str]:
    """Record (or revoke) the explanation → one line per tier done."""
    from resources.db import load_sql, raw_connection, read_frame

    request = check_request(request)
    with raw_connection(control_engine) as connection:
        org = read_frame(connection, "explain/org.sql", {"org_id": request.org_id})
    if org.empty:
        raise ExplainError(f"no organization '{request.org_id}' in the control plane; check --org")
    key = {
        "usage_date": request.usage_date,
        "kind": request.kind,
        "org_id": request.org_id,
        "tier": request.tier,
    }
    lines = []
    with raw_connection(billing_engine) as connection:
        if request.revoke:
            active = read_frame(connection, "explain/active.sql", key)
            if active.empty:
                raise ExplainError(
                    f"no explanation of {request.kind} for {request.org_id} on "
                    f"{request.usage_date}{_tier_text(request.tier)} to revoke"
                )
            with connection.cursor() as cursor:
                for tier in active["tier"]:
                    params = {**key, "tier": tier, "revoked_by": request.by}
                    cursor.execute(load_sql("explain/revoke.sql"), params)
                    revoked = cursor.fetchone()
                    if revoked is None:  # revoked by someone else meanwhile
                        continue
                    cursor.execute(
                        load_sql("explain/unmark.sql"), {**params, "note": _note(*revoked)}
                    )
                    lines.append(
                        f"revoked: {request.kind} {request.org_id} {request.usage_date}"
                        f"{_tier_text(tier)}; {cursor.rowcount} row(s) unexplained again"
                    )
            connection.commit()
            return lines
        targets = read_frame(connection, "explain/targets.sql", key)
        if targets.empty:
            raise ExplainError(
                f"no {request.kind} discrepancy for {request.org_id} on {request.usage_date}"
                f"{_tier_text(request.tier)}; see `tally review` or `tally org "
                f"{request.org_id}` for what there is"
            )
        with connection.cursor() as cursor:
            for tier in targets["tier"]:
                params = {
                    **key,
                    "tier": tier,
                    "explanation": request.reason,
                    "explained_by": request.by,
                }
                # A new text replaces the old one: its note leaves the rows first.
                cursor.execute(load_sql("explain/revoke.sql"), {**params, "revoked_by": request.by})
                previous = cursor.fetchone()
                if previous is not None:
                    cursor.execute(
                        load_sql("explain/unmark.sql"), {**params, "note": _note(*previous)}
                    )
                cursor.execute(load_sql("explain/upsert.sql"), params)
                cursor.execute(load_sql("explain/mark.sql"), params)
                lines.append(
                    f"explained: {request.kind} {request.org_id} {request.usage_date}"
                    f"{_tier_text(tier)} by {request.by}; {cursor.rowcount} row(s) marked"
                )
        connection.commit()
    return lines


def _tier_text(tier: str | None) -> str:
    return f" tier {tier}" if tier else ""


def run_explain(request: ExplainRequest) -> int:
    from resources.db import billing_engine, control_engine

    for line in explain(control_engine(), billing_engine(), request):
        print(line)
    return 0
