"""Credits with authority (issue 12, item 4) against the sandbox, PostgreSQL and a real
SMTP server: the approver roster and levels, the ticket, the re-read before paying,
credits net of included hours, the customer's e-mail once, Polar's manual path and
`tally credits list|approve|apply`."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pandas as pd
import pytest
import sqlalchemy as sa
from builders import add_org
from test_enums import allowed_values
from test_reconcile import DAY, PIPELINE, RECONCILE, add_at_provider, run, used

from assets.approvers import RosterError, load_roster, roster_from_mapping
from assets.credit_net import net_credit, proposal_changes
from assets.credits import (
    EscalationLevel,
    NoticeStatus,
    RefusalReason,
    authority_refusal,
    may_approve,
)
from assets.metering import billed_usage
from assets.pricing import DEFAULT_PLANS, Pricing
from assets.push import usage_push
from pipelines.cli import main
from pipelines.jobs import issue_credits
from resources.db import PostgresResource
from resources.notify import SmtpResource
from resources.providers import ProvidersResource

AGENT, LEAD, ENG, VP = (
    EscalationLevel.SUPPORT_AGENT,
    EscalationLevel.SUPPORT_LEAD,
    EscalationLevel.ENGINEERING,
    EscalationLevel.VP_ENGINEERING,
)


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("approver", "proposal", "allowed"),
    [
        (AGENT, AGENT, True),
        (AGENT, LEAD, False),
        (AGENT, VP, False),
        (LEAD, AGENT, True),
        (LEAD, LEAD, True),
        (LEAD, ENG, False),
        (LEAD, VP, False),
        (ENG, ENG, True),
        (ENG, LEAD, True),
        (ENG, VP, False),
        (VP, VP, True),
        (VP, ENG, True),
    ],
)
def test_who_may_approve_which_level(approver, proposal, allowed):
    assert may_approve(approver, proposal) is allowed


def test_authority_refusals_name_approver_levels_and_amount():
    reason, text = authority_refusal(7, "random-intern", AGENT, "SUP-1", VP, Decimal("900.00"))
    assert reason == RefusalReason.BELOW_LEVEL
    assert text == (
        "proposal #7: approver 'random-intern' is support_agent (net credits up to $50); "
        "the proposal needs vp_engineering (any credit) for $900.00 net"
    )
    assert authority_refusal(7, "x", VP, " ", AGENT, Decimal(1))[0] == RefusalReason.NO_TICKET
    assert authority_refusal(7, "x", None, "T", AGENT, Decimal(1))[0] == RefusalReason.NOT_ON_ROSTER
    assert authority_refusal(7, "x", LEAD, "T", LEAD, Decimal(500)) is None


def test_the_roster_file_is_validated(tmp_path):
    roster = roster_from_mapping({"approvers": {" Ana@Example.com ": "support_lead"}}, "f")
    assert roster.level_of("ana@example.COM") == LEAD and roster.level_of("bob") is None
    with pytest.raises(RosterError, match=r"approvers.bob = 'boss' is not a level; use one of"):
        roster_from_mapping({"approvers": {"bob": "boss"}}, "f")
    bad = tmp_path / "approvers.toml"
    bad.write_text("[approvers\n")
    with pytest.raises(RosterError, match="is not valid TOML"):
        load_roster(bad)
    with pytest.raises(RosterError, match="TALLY_APPROVERS_FILE"):
        load_roster(tmp_path / "missing.toml")


H = 3600
BASE = DEFAULT_PLANS["base-plus-usage"]  # 100 h included, overage billed
FREE = DEFAULT_PLANS["free-tier"]  # 10 h included, overage not billed
ONLY = DEFAULT_PLANS["usage-only"]  # nothing included
D1, D2 = dt.date(2026, 3, 2), dt.date(2026, 3, 20)


def month(*rows):
    return pd.DataFrame(
        [("o", day, tier, seconds) for day, tier, seconds in rows],
        columns=["org_id", "usage_date", "tier", "billable_seconds"],
    )


@pytest.mark.parametrize(
    ("plan", "usage", "changes", "list_amount", "net", "inside"),
    [
        # no included hours: the list amount
        (ONLY, [(D1, "gpu", 2 * H)], [(D1, "gpu", H)], "2.50", "2.50", 0),
        # all inside the 100 included hours: worth $0
        (BASE, [(D1, "gpu", 2 * H)], [(D1, "gpu", H)], "2.50", "0.00", H),
        # half inside: 99.5 h used earlier, 1 h over-charged later → 0.5 h at $2.50
        (BASE, [(D1, "small", 99 * H + H // 2)], [(D2, "gpu", H)], "2.50", "1.25", H // 2),
        # the same day: gpu takes the included hours first (quota's rule), so what the
        # over-charge cost is the half hour of small it pushed out of them
        (BASE, [(D1, "small", 99 * H + H // 2)], [(D1, "gpu", H)], "2.50", "0.03", H // 2),
        # already past the included hours: every second paid
        (BASE, [(D1, "gpu", 120 * H)], [(D1, "gpu", H)], "2.50", "2.50", 0),
        # a plan that does not bill overage: nothing was paid
        (FREE, [(D1, "gpu", 20 * H)], [(D1, "gpu", H)], "2.50", "0.00", 0),
        # inside then, but later days of the month used the hours: displaced gpu
        # overage costs more than the list amount, the credit stops at list
        (BASE, [(D2, "gpu", 100 * H)], [(D1, "small", H)], "0.05", "0.05", 0),
        # tier mismatch inside included hours: no rate difference was paid
        (BASE, [(D1, "small", 2 * H)], [(D1, "gpu", H), (D1, "small", -H)], "2.45", "0.00", H),
        # unknown plan or unknown changes: the list amount
        (None, [(D1, "gpu", 2 * H)], [(D1, "gpu", H)], "2.50", "2.50", 0),
        (BASE, [(D1, "gpu", 2 * H)], None, "2.50", "2.50", 0),
    ],
)
def test_net_of_included_hours(plan, usage, changes, list_amount, net, inside):
    credit = net_credit(month(*usage), "o", plan, Pricing(), changes, Decimal(list_amount))
    assert (credit.list_amount, credit.net_amount, credit.included_seconds) == (
        Decimal(list_amount),
        Decimal(net),
        inside,
    )


def test_tier_mismatch_changes_come_from_the_orgs_discrepancies():
    frame = pd.DataFrame(
        [
            ("tier_mismatch", "o", "gpu", 3600),
            ("tier_mismatch", "o", "small", -3600),
            ("tier_mismatch", "other", "gpu", 60),
            ("provider_over", "o", "large", 10),
        ],
        columns=["kind", "org_id", "tier", "delta_seconds"],
    )
    changes = proposal_changes("tier_mismatch", "o", D1, "gpu", 3600, frame)
    assert changes == [(D1, "gpu", 3600), (D1, "small", -3600)]
    assert proposal_changes("provider_over", "o", D1, "gpu", 5, frame) == [(D1, "gpu", 5)]
    assert proposal_changes("tier_mismatch", "x", D1, "gpu", 5, frame) is None


def test_enums_match_migration_0013(engine):
    assert {s.value for s in NoticeStatus} == allowed_values(
        engine, "billing.billing_corrections", "notice_status"
    )
    assert {r.value for r in RefusalReason} == allowed_values(
        engine, "billing.credit_refusals", "reason"
    )


# --------------------------------------------------------------------------- real runs


def issue(ids, approver, ticket="SUP-42"):
    return issue_credits.execute_in_process(
        run_config={
            "ops": {
                "apply_credits": {
                    "config": {"proposal_ids": list(ids), "approver": approver, "ticket": ticket}
                }
            }
        },
        resources={
            "postgres": PostgresResource(),
            "providers": ProvidersResource(),
            "smtp": SmtpResource(),
        },
        raise_on_error=False,
    )


def failure_of(result) -> str:
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    return failure.step_failure_data.user_failure_data.description


def table(engine, sql: str, **params) -> list[dict]:
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(sa.text(sql), params)]


def proposals(engine) -> dict[str, dict]:
    rows = table(engine, "SELECT * FROM billing.credit_proposals ORDER BY proposal_id")
    return {row["org_id"]: row for row in rows}


def corrections(engine) -> dict[int, dict]:
    rows = table(engine, "SELECT * FROM billing.billing_corrections")
    return {row["proposal_id"]: row for row in rows}


def refusals(engine) -> list[dict]:
    return table(engine, "SELECT * FROM billing.credit_refusals ORDER BY refusal_id")


def balance(stripe_client, customer: str) -> tuple[int, int]:
    transactions = stripe_client.v1.customers.balance_transactions.list(customer, {"limit": 100})
    return stripe_client.v1.customers.retrieve(customer).balance, len(transactions.data)


def over_charged(engine, sandbox, org, seconds, *, tier="gpu", plan="usage-only", **org_args):
    """`org` used 1 h of `tier` on DAY; the provider holds `seconds` more."""
    customer = org_args.pop("customer", f"cus_{org}")
    provider = org_args.get("provider", "stripe")
    add_org(engine, org, customer=customer, plan=plan, **org_args)
    used(engine, org, f"i-{org}", tier, 1, 60)
    run([billed_usage, usage_push])
    add_at_provider(sandbox, provider, customer, tier, seconds)


def test_an_agent_cannot_approve_900_dollars_and_the_allowed_ones_still_apply(
    engine, providers_env, stripe_client, smtp_server
):
    over_charged(engine, providers_env, "org-big", 360 * H)  # 360 h of gpu: $900
    over_charged(engine, providers_env, "org-small", 1800)  # $1.25
    run(RECONCILE)
    found = proposals(engine)
    big, small = found["org-big"], found["org-small"]
    assert (big["amount"], big["net_amount"], big["escalation"]) == (
        Decimal("900.00"),
        Decimal("900.00"),
        "vp_engineering",
    )

    result = issue([big["proposal_id"], small["proposal_id"]], "agent@example.com")
    assert not result.success
    assert failure_of(result) == (
        f"proposal #{big['proposal_id']}: approver 'agent@example.com' is support_agent "
        "(net credits up to $50); the proposal needs vp_engineering (any credit) for $900.00 net"
    )
    # Nothing for the refused one at the provider; the allowed one was applied.
    assert balance(stripe_client, "cus_org-big") == (0, 0)
    assert balance(stripe_client, "cus_org-small") == (-125, 1)
    done = corrections(engine)
    assert set(done) == {small["proposal_id"]}
    assert (
        done[small["proposal_id"]]["approver_level"],
        done[small["proposal_id"]]["ticket_id"],
    ) == (
        "support_agent",
        "SUP-42",
    )
    (refusal,) = refusals(engine)
    assert (refusal["proposal_id"], refusal["approver"], refusal["approver_level"]) == (
        big["proposal_id"],
        "agent@example.com",
        "support_agent",
    )
    assert (refusal["proposal_level"], refusal["net_amount"], refusal["reason"]) == (
        "vp_engineering",
        Decimal("900.00"),
        "below_level",
    )
    assert proposals(engine)["org-big"]["status"] == "proposed"

    # Someone not on the roster is refused too; the VP may.
    stranger = issue([big["proposal_id"]], "random-intern")
    assert "'random-intern' is not on the approver roster" in failure_of(stranger)
    assert refusals(engine)[-1]["reason"] == "not_on_roster"
    assert issue([big["proposal_id"]], "VP@example.com").success
    assert balance(stripe_client, "cus_org-big") == (-90000, 1)
    assert corrections(engine)[big["proposal_id"]]["approver_level"] == "vp_engineering"


def test_a_ticket_is_required_and_its_absence_recorded(engine, providers_env, stripe_client):
    over_charged(engine, providers_env, "org-t", 1800)
    run(RECONCILE)
    proposal_id = proposals(engine)["org-t"]["proposal_id"]
    result = issue([proposal_id], "lead@example.com", ticket="  ")
    assert not result.success
    assert f"proposal #{proposal_id}: no ticket id" in failure_of(result)
    assert [r["reason"] for r in refusals(engine)] == ["no_ticket"]
    assert corrections(engine) == {}
    assert balance(stripe_client, "cus_org-t") == (0, 0)


def test_the_customer_is_told_once_and_an_owed_email_is_sent_later(
    engine, providers_env, smtp_server, monkeypatch
):
    over_charged(engine, providers_env, "org-m", 1800, email="ap@org-m.test")
    run(RECONCILE)
    proposal_id = proposals(engine)["org-m"]["proposal_id"]

    monkeypatch.delenv("SMTP_HOST")  # SMTP unset: applied, e-mail owed
    assert issue([proposal_id], "lead@example.com").success
    row = corrections(engine)[proposal_id]
    assert (row["notice_status"], row["notice_recipient"]) == ("owed", "ap@org-m.test")
    assert smtp_server.messages == []

    monkeypatch.setenv("SMTP_HOST", smtp_server.host)
    for _ in range(2):  # configured now: sent by the next run, never by the one after
        result = issue([proposal_id], "lead@example.com")
        assert result.output_for_node("apply_credits") == {proposal_id: "already"}
    (mail,) = smtp_server.messages
    assert mail["To"] == "ap@org-m.test"
    assert mail["Subject"] == "Credit Applied - Billing Issue Resolved"
    assert mail.get_content_type() == "multipart/alternative"
    text = mail.get_body(("plain",)).get_content()
    html = mail.get_body(("html",)).get_content()
    for body in (text, html):
        assert "org-m Inc." in body and "Ticket #SUP-42" in body and "$1.25" in body
    assert "<p>" in html and "<p>" not in text
    row = corrections(engine)[proposal_id]
    assert (row["notice_status"], row["notice_attempts"]) == ("sent", 1)
    assert row["notice_sent_at"] is not None


def test_a_credit_inside_included_hours_is_worth_nothing(
    engine, providers_env, stripe_client, smtp_server
):
    # base-plus-usage includes 100 h: 1 h used, 30 min of gpu over-charged inside them.
    over_charged(engine, providers_env, "org-inc", 1800, plan="base-plus-usage")
    run(RECONCILE)
    proposal = proposals(engine)["org-inc"]
    assert (proposal["amount"], proposal["net_amount"], proposal["included_seconds"]) == (
        Decimal("1.25"),
        Decimal("0.00"),
        1800,
    )
    assert proposal["escalation"] == "support_agent"
    assert "1800 s fell inside the org's included hours: net credit $0.00" in proposal["evidence"]

    result = issue([proposal["proposal_id"]], "agent@example.com")
    assert result.output_for_node("apply_credits") == {proposal["proposal_id"]: "applied"}
    row = corrections(engine)[proposal["proposal_id"]]
    assert (row["amount"], row["list_amount"], row["method"]) == (
        Decimal("0.00"),
        Decimal("1.25"),
        "included_hours",
    )
    assert row["notice_status"] == "not_needed" and smtp_server.messages == []
    assert balance(stripe_client, "cus_org-inc") == (0, 0)


def test_polar_credits_are_recorded_as_manual_with_instructions(engine, providers_env, smtp_server):
    over_charged(
        engine, providers_env, "org-p", 3600, tier="large", provider="polar", customer="ext_p"
    )
    run(RECONCILE)
    proposal_id = proposals(engine)["org-p"]["proposal_id"]
    result = issue([proposal_id], "agent@example.com")
    assert result.output_for_node("apply_credits") == {proposal_id: "manual"}
    row = corrections(engine)[proposal_id]
    assert (row["method"], row["amount"], row["provider_reference"]) == (
        "manual",
        Decimal("0.20"),
        None,
    )
    assert "in the Polar dashboard refund 0.20 USD on customer ext_p's order" in row["reason"]
    assert f"tally credit #{proposal_id}" in row["reason"]
    (mail,) = smtp_server.messages
    assert "are applying a credit of $0.20" in mail.get_body(("plain",)).get_content()
    assert proposals(engine)["org-p"]["status"] == "manual"


def test_a_proposal_the_provider_no_longer_shows_over_is_refused(
    engine, providers_env, stripe_client
):
    over_charged(engine, providers_env, "org-r", 1800)
    run(RECONCILE)
    proposal_id = proposals(engine)["org-r"]["proposal_id"]
    # Since reconciliation the provider's own correction has landed.
    add_at_provider(providers_env, "stripe", "cus_org-r", "gpu", -1800)
    result = issue([proposal_id], "lead@example.com")
    assert not result.success
    assert failure_of(result).startswith(
        f"proposal #{proposal_id}: stripe no longer shows the over-charge on {DAY} "
        "(gpu 3600 s held / 3600 s billable: over by 0 s, the proposal credits 1800 s); "
        "nothing paid"
    )
    assert [r["reason"] for r in refusals(engine)] == ["provider_not_over"]
    assert corrections(engine) == {} and balance(stripe_client, "cus_org-r") == (0, 0)
    # Re-reconciled, the proposal is withdrawn.
    run(PIPELINE)
    assert proposals(engine)["org-r"]["status"] == "withdrawn"


def tally(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["credits", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_tally_credits_list_approve_apply(
    engine, providers_env, stripe_client, smtp_server, dagster_home, capsys
):
    over_charged(engine, providers_env, "org-c", 120 * H)  # 120 h of gpu: $300
    run(RECONCILE)
    proposal_id = proposals(engine)["org-c"]["proposal_id"]

    code, out, _ = tally(capsys, "list")
    assert code == 0
    (line,) = [line for line in out.splitlines() if line.split()[0] == str(proposal_id)]
    assert line.split()[1:7] == [
        "org-c",
        DAY.isoformat(),
        "provider_over",
        "$300.00",
        "$300.00",
        "support_lead",
    ]

    code, out, _ = tally(capsys, "list", "--json")
    (listed,) = json.loads(out)
    assert (listed["proposal_id"], listed["list_amount"], listed["net_amount"]) == (
        proposal_id,
        "300.00",
        "300.00",
    )
    assert (listed["escalation"], listed["org_name"], listed["approved_by"]) == (
        "support_lead",
        "org-c Inc.",
        None,
    )

    code, out, _ = tally(
        capsys,
        "approve",
        "--id",
        str(proposal_id),
        "--by",
        "agent@example.com",
        "--ticket",
        "SUP-9",
    )
    assert code == 1 and out.startswith("refused (recorded): ")
    assert refusals(engine)[-1]["reason"] == "below_level"
    code, out, _ = tally(capsys, "apply", "--id", str(proposal_id))
    assert code == 2  # not approved
    code, out, _ = tally(
        capsys, "approve", "--id", str(proposal_id), "--by", "lead@example.com", "--ticket", "SUP-9"
    )
    assert code == 0 and "approved by lead@example.com (support_lead)" in out
    assert balance(stripe_client, "cus_org-c") == (0, 0)  # approving pays nothing

    code, out, _ = tally(capsys, "apply")
    assert code == 0, out
    assert f"#{proposal_id}: applied (approved by lead@example.com, ticket SUP-9)" in out
    assert balance(stripe_client, "cus_org-c") == (-30000, 1)
    row = corrections(engine)[proposal_id]
    assert (row["approved_by"], row["ticket_id"], row["notice_status"]) == (
        "lead@example.com",
        "SUP-9",
        "sent",
    )
    code, out, _ = tally(capsys, "list")
    assert (code, out.strip()) == (0, "no open credit proposals")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: ACTION"),
        (["approve", "--id", "x", "--by", "a", "--ticket", "t"], "argument --id: invalid int"),
        (["approve", "--id", "1", "--by", "a"], "the following arguments are required: --ticket"),
        (["approve", "--id", "1", "--by", " ", "--ticket", "t"], "--by is empty"),
        (["approve", "--id", "1", "--by", "a", "--ticket", ""], "--ticket is empty"),
        (["approve", "--id", "999999", "--by", "a", "--ticket", "t"], "no proposal #999999"),
        (["apply", "--id", "999999"], "proposal #999999 is not open"),
    ],
)
def test_tally_credits_misuse_is_one_line_and_exit_2(engine, capsys, args, message):
    code, out, err = tally(capsys, *args)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("tally: error: ") and message in line


def test_a_broken_roster_fails_the_run_naming_the_file(engine, tmp_path, monkeypatch):
    roster = tmp_path / "approvers.toml"
    roster.write_text('[approvers]\n"ana" = "boss"\n')
    monkeypatch.setenv("TALLY_APPROVERS_FILE", str(roster))
    result = issue([1], "ana")
    assert failure_of(result).startswith(f"approver roster: {roster}: approvers.ana = 'boss'")
