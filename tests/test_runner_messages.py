"""`tally run`'s progress names what failed (issue 9, finding 6): a failed day prints
the failed step's own one-line error, also when Dagster raised it (a blocking check)."""

from __future__ import annotations

import datetime as dt

import pytest
from builders import add_heartbeats, add_instance, add_org, at, every_minute

import assets.pricing
from pipelines.runner import run_days

DAY = dt.date(2026, 11, 20)


@pytest.fixture()
def pricing_file(tmp_path, monkeypatch):
    def write(text: str) -> None:
        path = tmp_path / "pricing.yaml"
        path.write_text(text)
        monkeypatch.setenv("TALLY_PRICING_FILE", str(path))
        assets.pricing._load.cache_clear()

    assets.pricing._load.cache_clear()
    yield write
    assets.pricing._load.cache_clear()


def _run_day() -> list[str]:
    lines: list[str] = []
    failures = run_days([DAY], report_only=True, echo=lines.append)
    assert failures == 1, lines
    assert " FAILED " in lines[0]
    return lines[1:]


def test_a_failed_blocking_check_prints_the_check_and_what_it_found(engine, dagster_home):
    add_org(engine, "org-odd", plan="enterprise")
    add_instance(engine, "i-a", "org-odd", "medium")
    add_heartbeats(engine, every_minute("i-a", at(DAY, 10), 60))
    (line,) = _run_day()
    assert line.startswith("    quota_usage: ")
    assert "orgs_have_known_plans" in line and "org-odd='enterprise'" in line, line
    assert "dagster." not in line and "\n" not in line


def test_a_bad_pricing_file_prints_the_setting(engine, dagster_home, pricing_file):
    pricing_file("tier_rates:\n  xlarge: -4\n")
    add_org(engine, "org-a")
    (line,) = _run_day()
    assert line == (
        "    billed_usage: pricing configuration: "
        "tier_rates.xlarge = -4 must be a non-negative number"
    )
