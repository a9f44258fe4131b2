"""`tally credits list|approve|apply`: credits for support staff, without SQL.

`list` shows the open proposals across all days (id, org, day, kind, list and net
amount, escalation level, approval). `approve --id N --by NAME --ticket T` records
an approval after the same checks `issue_credits` makes (roster, level of the net
amount, ticket); a refusal is recorded and exits 1. `apply [--id N]` runs the
`issue_credits` job in-process on the local Dagster instance (visible in the UI),
once per (approver, ticket) of the approved proposals, then refreshes the finance
review; the job re-checks everything at the amount it reprices and re-reads the
provider before paying. Mistakes in the arguments: one line, exit 2 (`CreditsError`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pandas as pd

EXIT_OK, EXIT_FAILED = 0, 1


class CreditsError(ValueError):
    """A mistake the user can fix; the message names it and the fix."""


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _money(value: Any) -> str:
    text = _text(value)
    return f"${Decimal(text):,.2f}" if text else "–"


def open_proposals(billing_engine, control_engine) -> list[dict[str, Any]]:
    from resources.db import raw_connection, read_frame

    with raw_connection(control_engine) as connection:
        orgs = read_frame(connection, "credits/orgs.sql")
    names = dict(zip(orgs["org_id"], orgs["name"], strict=True)) if not orgs.empty else {}
    with raw_connection(billing_engine) as connection:
        found = read_frame(connection, "credits/open.sql")
    rows = []
    for row in found.itertuples(index=False):
        net = row.net_amount if _text(row.net_amount) else row.amount
        rows.append(
            {
                "proposal_id": int(row.proposal_id),
                "org_id": row.org_id,
                "org_name": _text(names.get(row.org_id)),
                "usage_date": row.usage_date.isoformat(),
                "kind": row.kind,
                "tier": row.tier,
                "seconds": int(row.seconds),
                "list_amount": _text(row.amount) or None,
                "net_amount": _text(net) or None,
                "escalation": _text(row.escalation) or None,
                "approved_by": _text(row.approved_by) or None,
                "approver_level": _text(row.approver_level) or None,
                "ticket_id": _text(row.ticket_id) or None,
            }
        )
    return rows


def run_list(as_json: bool, echo: Callable[[str], None] = print) -> int:
    from resources.db import billing_engine, control_engine

    rows = open_proposals(billing_engine(), control_engine())
    if as_json:
        echo(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        echo("no open credit proposals")
        return EXIT_OK
    header = f"{'id':>6}  {'org':<14} {'day':<10}  {'kind':<14} {'list':>10} {'net':>10}  "
    echo(header + f"{'level':<14} approved")
    for row in rows:
        approved = (
            f"{row['approved_by']} ({row['approver_level']}, ticket {row['ticket_id']})"
            if row["approved_by"] and row["ticket_id"]
            else "–"
        )
        echo(
            f"{row['proposal_id']:>6}  {row['org_id']:<14} {row['usage_date']:<10}  "
            f"{row['kind']:<14} {_money(row['list_amount']):>10} {_money(row['net_amount']):>10}  "
            f"{row['escalation'] or '–':<14} {approved}"
        )
    return EXIT_OK


def check_names(by: str, ticket: str) -> tuple[str, str]:
    by, ticket = by.strip(), ticket.strip()
    if not by:
        raise CreditsError("--by is empty; give the approver's name or e-mail as on the roster")
    if not ticket:
        raise CreditsError("--ticket is empty; give the support ticket the credit answers")
    return by, ticket


def _roster():
    from assets.approvers import RosterError, current_roster

    try:
        return current_roster()
    except RosterError as error:
        raise CreditsError(f"approver roster: {error}") from None


def run_approve(proposal_id: int, by: str, ticket: str, echo: Callable[[str], None] = print) -> int:
    from assets.credits import Approval, Outcome, approve_proposal
    from resources.db import billing_engine, raw_connection

    by, ticket = check_names(by, ticket)
    roster = _roster()
    with raw_connection(billing_engine()) as connection:
        outcome, detail = approve_proposal(
            connection, proposal_id, Approval(by, roster.level_of(by), ticket)
        )
    if outcome == Outcome.SKIPPED:
        raise CreditsError(detail)
    if outcome == Outcome.REFUSED:
        echo(f"refused (recorded): {detail}")
        return EXIT_FAILED
    echo(f"{detail}; pay it with `tally credits apply --id {proposal_id}`")
    return EXIT_OK


def approved_groups(rows: list[dict[str, Any]], only: int | None) -> dict[tuple[str, str], list]:
    """(approver, ticket) → proposal ids of the approved open proposals (all, or `only`)."""
    if only is not None:
        chosen = [row for row in rows if row["proposal_id"] == only]
        if not chosen:
            raise CreditsError(
                f"proposal #{only} is not open; see `tally credits list` for open proposals"
            )
        if not chosen[0]["approved_by"] or not chosen[0]["ticket_id"]:
            raise CreditsError(
                f"proposal #{only} is not approved; approve it first: tally credits approve "
                f"--id {only} --by NAME --ticket TICKET"
            )
        rows = chosen
    groups: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        if row["approved_by"] and row["ticket_id"]:
            groups.setdefault((row["approved_by"], row["ticket_id"]), []).append(row["proposal_id"])
    return groups


def run_apply(only: int | None, echo: Callable[[str], None] = print) -> int:
    from pipelines.definitions import defs
    from pipelines.local import open_local_instance
    from pipelines.runner import failure_messages, refresh_review, runs_of_the_workspace
    from resources.db import billing_engine, control_engine

    billing, control = billing_engine(), control_engine()
    groups = approved_groups(open_proposals(billing, control), only)
    if not groups:
        echo("no approved credit proposals to apply; approve with `tally credits approve`")
        return EXIT_OK
    job = defs.resolve_job_def("issue_credits")
    failed = 0
    with open_local_instance() as instance, runs_of_the_workspace(instance):
        for (approver, ticket), ids in sorted(groups.items()):
            result = job.execute_in_process(
                instance=instance,
                run_config={
                    "ops": {
                        "apply_credits": {
                            "config": {"proposal_ids": ids, "approver": approver, "ticket": ticket}
                        }
                    },
                    "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
                },
                raise_on_error=False,
                tags={"tally/source": "cli"},
            )
            if result.success:
                for pid, outcome in sorted(result.output_for_node("apply_credits").items()):
                    echo(f"#{pid}: {outcome} (approved by {approver}, ticket {ticket})")
                echo(f"    run {result.run_id}")
                continue
            failed += 1
            still_open = {row["proposal_id"] for row in open_proposals(billing, control)}
            for pid in ids:
                state = "not applied" if pid in still_open else "applied"
                echo(f"#{pid}: {state} (approved by {approver}, ticket {ticket})")
            echo(f"    run {result.run_id} FAILED")
            for step, message in failure_messages(result):
                echo(f"    {step}: {message}")
        refresh_review(instance, echo)
    return EXIT_FAILED if failed else EXIT_OK
