"""`tally export-discrepancies` (the CLI entry point, in process): CSV content and
user errors."""

from __future__ import annotations

import csv
import datetime as dt

import pytest
from builders import add_org, discrepancy_rows
from test_reconcile import DAY, PIPELINE, add_at_provider, run, used

from assets.metering import billed_usage
from assets.push import usage_push
from pipelines.cli import main


def tally(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_writes_the_range_with_credits(engine, providers_env, tmp_path, capsys):
    add_org(engine, "org-over", customer="cus_over")
    add_org(engine, "org-nocust", customer="")
    used(engine, "org-over", "i-over", "gpu", 2, 30)
    used(engine, "org-nocust", "i-nocust", "small", 1, 60)
    run([billed_usage, usage_push])
    add_at_provider(providers_env, "stripe", "cus_over", "gpu", 1800)
    run(PIPELINE[2:])
    earlier = DAY - dt.timedelta(days=3)
    used(engine, "org-nocust", "i-nocust-2", "small", 5, 30, day=earlier)
    run(PIPELINE, day=earlier)
    assert len(discrepancy_rows(engine, DAY)) == 2

    output = tmp_path / "discrepancies.csv"
    code, out, err = tally(
        capsys,
        "export-discrepancies",
        "--start-date",
        earlier.isoformat(),
        "--end-date",
        DAY.isoformat(),
        "--output",
        str(output),
    )
    assert code == 0, err
    assert f"exported 3 discrepancies ({earlier} .. {DAY})" in out
    with output.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["usage_date"], r["kind"], r["org_id"], r["tier"]) for r in rows] == [
        (earlier.isoformat(), "unpushed", "org-nocust", "small"),
        (DAY.isoformat(), "provider_over", "org-over", "gpu"),
        (DAY.isoformat(), "unpushed", "org-nocust", "small"),
    ]
    over = rows[1]
    assert (over["billable_seconds"], over["provider_seconds"], over["delta_seconds"]) == (
        "1800",
        "3600",
        "1800",
    )
    assert over["dollar_impact"] == "1.25" and over["money_moving"] == "true"
    assert over["credit_amount"] == "1.25" and over["credit_status"] == "proposed"
    assert over["credit_escalation"] == "support_agent" and over["credit_proposal_id"]
    unpushed = rows[2]
    assert unpushed["provider_seconds"] == "" and unpushed["credit_amount"] == ""
    assert unpushed["delta_seconds"] == "-3600" and unpushed["explained"] == "false"
    assert "provider_customer_id" in unpushed["detail"]

    empty = tmp_path / "none.csv"
    code, out, _ = tally(
        capsys,
        "export-discrepancies",
        "--start-date",
        "2025-01-01",
        "--end-date",
        "2025-01-02",
        "--output",
        str(empty),
    )
    assert code == 0 and "exported 0 discrepancies" in out
    assert empty.read_text().splitlines()[0].startswith("usage_date,kind,org_id,tier")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--start-date", "2026-02-30", "--end-date", "2026-03-01", "--output", "x.csv"],
            "not a date",
        ),
        (
            ["--start-date", "2026-03-02", "--end-date", "2026-03-01", "--output", "x.csv"],
            "before --start-date",
        ),
        (
            [
                "--start-date",
                "2026-03-01",
                "--end-date",
                "2026-03-01",
                "--output",
                "/nonexistent-dir/x.csv",
            ],
            "cannot write /nonexistent-dir/x.csv",
        ),
        (["--start-date", "2026-03-01", "--end-date", "2026-03-01"], "--output"),
    ],
)
def test_export_user_errors_are_one_line_exit_2(engine, args, fragment, capsys):
    code, out, err = tally(capsys, "export-discrepancies", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    assert lines[0].startswith("tally: error: ") and out == ""
