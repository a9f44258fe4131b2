"""`tally explain` (issue 12): a discrepancy acknowledged without SQL, shown in the
finance review and in `tally org`, kept by the next reconciliation of the day, and
withdrawn with `--revoke`. Real PostgreSQL, the sandbox, real Dagster runs."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa
from builders import add_org
from test_reconcile import DAY, PIPELINE, add_at_provider, run, used

from assets.reconcile import reconciliation
from pipelines.cli import main
from pipelines.review import current_review


def rows(engine, kind: str = "provider_over") -> list[tuple]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                sa.text(
                    "SELECT org_id, tier, explained, detail FROM billing.discrepancies "
                    "WHERE kind = :kind ORDER BY org_id, tier"
                ),
                {"kind": kind},
            )
        ]


def explain(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    code = main(["explain", *args])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


@pytest.fixture()
def double_charged(engine, providers_env):
    """org-s over-charged 30 min of small at Stripe on DAY, reconciled."""
    add_org(engine, "org-s", customer="cus_S1")
    used(engine, "org-s", "i-s1", "small", 1, 60)
    run(PIPELINE)
    add_at_provider(providers_env, "stripe", "cus_S1", "small", 1800)
    run(PIPELINE)
    ((org, tier, explained, _),) = rows(engine)
    assert (org, tier, explained) == ("org-s", "small", False)
    return engine


BASE = ["--day", DAY.isoformat(), "--org", "org-s", "--kind", "provider_over"]


def test_explain_shows_in_review_and_org_and_survives_reconciliation_until_revoked(
    double_charged, capsys
):
    engine = double_charged
    assert [line.kind for line in current_review().unexplained] == ["provider_over"]

    code, out, err = explain(
        capsys, *BASE, "--reason", "duplicate meter event, refunded by hand", "--by", "alice"
    )
    assert (code, err) == (0, [])
    assert out == [f"explained: provider_over org-s {DAY} tier small by alice; 1 row(s) marked"]
    ((_, _, explained, detail),) = rows(engine)
    assert explained and detail.endswith(
        "; explained: duplicate meter event, refunded by hand (alice)"
    )
    assert current_review().unexplained == []  # it leaves the review's unexplained list

    assert main(["org", "org-s", "--month", f"{DAY:%Y-%m}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (item,) = report["explanations"]
    assert (item["kind"], item["tier"], item["explained_by"], item["revoked_at"]) == (
        "provider_over",
        "small",
        "alice",
        None,
    )
    assert report["discrepancies"]["open"] == 0
    assert main(["org", "org-s", "--month", f"{DAY:%Y-%m}"]) == 0
    text = capsys.readouterr().out
    assert f"explained      {DAY} provider_over small: duplicate meter event" in text

    # The next reconciliation of the day applies the same explanation.
    run([reconciliation])
    ((_, _, explained, detail),) = rows(engine)
    assert explained and detail.count("; explained:") == 1

    code, out, _ = explain(capsys, *BASE, "--by", "bob", "--revoke")
    assert code == 0 and out == [
        f"revoked: provider_over org-s {DAY} tier small; 1 row(s) unexplained again"
    ]
    ((_, _, explained, detail),) = rows(engine)
    assert not explained and "explained:" not in detail
    assert [line.kind for line in current_review().unexplained] == ["provider_over"]
    run([reconciliation])  # a revoked explanation explains nothing any more
    assert rows(engine)[0][2] is False
    with engine.connect() as connection:
        revoked = connection.execute(
            sa.text("SELECT explained_by, revoked_by FROM billing.discrepancy_explanations")
        ).one()
    assert tuple(revoked) == ("alice", "bob")  # who explained and who withdrew, on record


def test_explaining_again_replaces_the_text_on_the_rows(double_charged, capsys):
    assert explain(capsys, *BASE, "--reason", "first", "--by", "alice")[0] == 0
    assert explain(capsys, *BASE, "--reason", "second", "--by", "carol")[0] == 0
    ((_, _, explained, detail),) = rows(double_charged)
    assert explained and "(carol)" in detail and "first (alice)" not in detail
    assert explain(capsys, *BASE, "--by", "bob", "--revoke")[0] == 0
    assert rows(double_charged)[0][2] is False


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--day", "2026-11-20", "--org", "org-s", "--kind", "overcharge"],
            "unknown kind 'overcharge'; kinds: unpushed, provider_missing",
        ),
        (["--day", "20-11-2026", "--org", "org-s", "--kind", "provider_over"], "not a date"),
        (["--day", "2026-11-20", "--org", "org-s", "--kind", "provider_over"], "--reason is empty"),
        (
            ["--day", "2026-11-20", "--org", "org-s", "--kind", "unpushed", "--revoke"]
            + ["--reason", "x"],
            "--revoke takes no --reason",
        ),
    ],
)
def test_bad_arguments_end_in_one_line_and_exit_2(args, fragment, capsys):
    code, out, err = explain(capsys, *args, "--by", "alice")
    assert code == 2 and out == [] and len(err) == 1, err
    assert fragment in err[0]


def test_unknown_org_and_nothing_to_explain_or_revoke_exit_2(double_charged, capsys):
    code, _, err = explain(
        capsys, "--day", DAY.isoformat(), "--org", "org-nope", "--kind", "provider_over",
        "--reason", "x", "--by", "alice",
    )  # fmt: skip
    assert code == 2 and len(err) == 1 and "no organization 'org-nope'" in err[0]
    other_day = (DAY - dt.timedelta(days=3)).isoformat()
    code, _, err = explain(
        capsys, "--day", other_day, "--org", "org-s", "--kind", "provider_over",
        "--reason", "x", "--by", "alice",
    )  # fmt: skip
    assert code == 2 and len(err) == 1 and "no provider_over discrepancy for org-s" in err[0]
    code, _, err = explain(capsys, *BASE, "--by", "alice", "--revoke")
    assert code == 2 and len(err) == 1 and "no explanation of provider_over" in err[0]
