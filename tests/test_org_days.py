"""`tally org ORG --days [--json]`: the month per day — billable hours per tier at
list price, what the ledger sent, what the provider recorded, credits proposed and
applied, explanations — after a real daily pipeline against the sandbox."""

from __future__ import annotations

import json
import re

import sqlalchemy as sa
from builders import add_org
from test_reconcile import DAY, PIPELINE, add_at_provider, run, used

from pipelines.cli import main

MONEY = re.compile(r"^\d+\.\d{2}$")


def _money_fields(value, path=""):
    """Every money field of the report (amounts), with its path."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("amount") and item is not None:
                yield f"{path}.{key}", item
            yield from _money_fields(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _money_fields(item, f"{path}[{index}]")


def _world(engine, sandbox) -> None:
    add_org(engine, "org-d")
    used(engine, "org-d", "i-gpu", "gpu", 3, 120)
    used(engine, "org-d", "i-small", "small", 5, 60)
    # The provider holds 10 minutes of gpu more than tally sent: provider_over.
    add_at_provider(sandbox, "stripe", "cus_org-d", "gpu", 600)
    assert run(PIPELINE).success


def _days(capsys, *extra) -> dict:
    capsys.readouterr()
    assert main(["org", "org-d", "--days", "--month", f"{DAY:%Y-%m}", *extra]) == 0
    return capsys.readouterr().out


def test_days_json_shows_sent_provider_credits_and_explanations(engine, providers_env, capsys):
    _world(engine, providers_env)
    assert (
        main(
            [
                "explain",
                "--day",
                DAY.isoformat(),
                "--org",
                "org-d",
                "--kind",
                "provider_over",
                "--reason",
                "duplicate test event, credited",
                "--by",
                "sam",
            ]
        )
        == 0
    )
    with engine.begin() as connection:
        proposal = connection.execute(
            sa.text(
                "SELECT proposal_id, amount FROM billing.credit_proposals "
                "WHERE org_id = 'org-d' AND kind = 'provider_over'"
            )
        ).one()
        connection.execute(
            sa.text(
                "INSERT INTO billing.billing_corrections (proposal_id, org_id, usage_date, tier, "
                "provider, customer_id, amount, currency, method, reason, approved_by) VALUES "
                "(:id, 'org-d', :day, 'gpu', 'stripe', 'cus_org-d', 0.4, 'usd', 'manual', "
                "'provider over', 'lead-lee')"
            ),
            {"id": proposal.proposal_id, "day": DAY},
        )
    report = json.loads(_days(capsys, "--json"))
    assert report["schema"] == "tally.org_days/1"
    (day,) = report["days"]
    assert day["usage_date"] == DAY.isoformat()
    tiers = {tier["tier"]: tier for tier in day["tiers"]}
    assert list(tiers) == ["gpu", "small"]  # most expensive first
    assert tiers["gpu"]["billable_hours"] == 2.0
    assert tiers["gpu"]["list_amount"] == "5.00"
    assert tiers["gpu"]["sent_seconds"] == 7200
    assert tiers["gpu"]["provider_seconds"] == 7800
    assert tiers["small"]["list_amount"] == "0.05"
    assert tiers["small"]["provider_seconds"] == 3600
    assert day["list_amount"] == "5.05"
    (proposed,) = [c for c in day["credits_proposed"] if c["kind"] == "provider_over"]
    assert proposed["proposal_id"] == proposal.proposal_id
    assert proposed["seconds"] == 600
    assert proposed["amount"] == f"{proposal.amount:.2f}"
    (applied,) = day["credits_applied"]
    assert (applied["amount"], applied["approved_by"]) == ("0.40", "lead-lee")
    (explained,) = day["explanations"]
    assert explained["kind"] == "provider_over" and explained["explained_by"] == "sam"
    for path, amount in _money_fields(report):
        assert isinstance(amount, str) and MONEY.match(amount), path

    text = _days(capsys)
    assert f"{DAY.isoformat()}  list price $5.05" in text
    assert re.search(r"gpu\s+2\.00\s+5\.00\s+2\.00\s+2\.17", text)
    assert f"credit proposed #{proposal.proposal_id} gpu provider_over" in text
    assert "credit applied  #" in text and "$0.40 by lead-lee" in text
    assert "duplicate test event, credited - sam" in text


def test_unknown_org_is_one_line_exit_2(engine, capsys):
    assert main(["org", "nobody", "--days"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no organization 'nobody'" in err[0]
