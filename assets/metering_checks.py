"""What the billed_usage asset reports: the blocking invariants of DESIGN §4 on the
stored rows, the Great Expectations suites on what reaches billing, the quarantine
warning, and the materialization's metadata (totals, a preview table). Pure:
frames and results in, check results and metadata out."""

import datetime as dt

import pandas as pd
from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue

from assets.extract import DayExtract
from assets.heartbeat_cleaning import billable_heartbeats
from assets.late_heartbeats import LateDay
from assets.markdown import markdown_table
from assets.metering_rules import SECONDS_COLUMNS, MeteringResult, MeteringRules

# Preview column → billed_usage column (hours, two decimals).
_PREVIEW_HOURS = {
    "runtime h": "runtime_seconds",
    "billable h": "billable_seconds",
    "idle h": "idle_paused_seconds",
    "over cont. h": "over_continuous_seconds",
    "over daily h": "over_daily_seconds",
}


def _markdown_preview(billed: pd.DataFrame, limit: int = 15) -> str:
    """The day's largest rows by billable seconds."""
    top = billed.sort_values("billable_seconds", ascending=False).head(limit)
    rows = (
        [row["org_id"], row["tier"], *(f"{row[c] / 3600:.2f}" for c in _PREVIEW_HOURS.values())]
        for row in top.to_dict("records")
    )
    return markdown_table(
        ["org", "tier", *_PREVIEW_HOURS],
        rows,
        numeric=_PREVIEW_HOURS,
        empty="_no usage on this day_",
    )


def billed_usage_checks(
    billed: pd.DataFrame, throttle: pd.DataFrame, rules: MeteringRules
) -> dict[str, tuple[bool, dict]]:
    """The blocking invariants of DESIGN §4 on rows read back from the table."""
    identity_broken = billed["runtime_seconds"] != billed[SECONDS_COLUMNS[1:]].sum(axis=1)
    negative = (billed[SECONDS_COLUMNS] < 0).any(axis=1)
    per_org = billed.groupby("org_id")["billable_seconds"].sum()
    limits = (
        throttle.set_index("org_id")["daily_limit_s"]
        .reindex(per_org.index)
        .fillna(rules.default_daily_limit_s)
    )
    over_cap = per_org[per_org > limits]
    return {
        "runtime_identity": (not identity_broken.any(), {"violations": int(identity_broken.sum())}),
        "billable_within_daily_limit": (
            over_cap.empty,
            {"orgs_over_limit": over_cap.index.tolist()[:20]},
        ),
        "no_negative_seconds": (not negative.any(), {"negative_rows": int(negative.sum())}),
    }


def _billable_sample(
    extract: DayExtract, run_time: dt.datetime, rules: MeteringRules, known_tiers: frozenset[str]
) -> pd.DataFrame:
    """An evenly spread sample of the extract, after quarantine (what reaches billing)."""
    from assets.quality import sample_positions

    sample = extract.heartbeats.take(sample_positions(len(extract.heartbeats))).to_frame()
    return billable_heartbeats(
        sample, extract.instances, extract.throttle, run_time, rules, known_tiers
    )


def check_results(
    stored: pd.DataFrame,
    extract: DayExtract,
    result: MeteringResult,
    run_time: dt.datetime,
    rules: MeteringRules,
    known_tiers: frozenset[str],
) -> list[AssetCheckResult]:
    """The invariants, the Great Expectations suites (against the priced tiers) on
    a sample of what reaches billing and on the stored rows, and the quarantine
    warning. Quarantined rows never fail a blocking check: they are counted."""
    from assets.quality import great_expectations_checks

    checks = [
        AssetCheckResult(check_name=name, passed=passed, metadata=details)
        for name, (passed, details) in billed_usage_checks(stored, extract.throttle, rules).items()
    ]
    billable = _billable_sample(extract, run_time, rules, known_tiers)
    checks += great_expectations_checks(billable, extract.instances, stored, known_tiers)
    checks.append(_quarantine_warning(extract, result))
    return checks


def _quarantine_warning(extract: DayExtract, result: MeteringResult) -> AssetCheckResult:
    """WARN (never blocking) when rows were quarantined or a throttle setting was
    out of bounds (that org billed with the default)."""
    reasons = result.quarantine["reason"].value_counts().to_dict()
    return AssetCheckResult(
        check_name="no_quarantined_heartbeats",
        passed=not reasons and not extract.invalid_throttle,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "quarantined": len(result.quarantine),
            **{f"quarantined_{reason}": int(n) for reason, n in reasons.items()},
            **_invalid_throttle_metadata(extract),
        },
    )


def _invalid_throttle_metadata(extract: DayExtract) -> dict:
    """How many throttle values were out of bounds, and one line per value."""
    lines = [setting.describe() for setting in extract.invalid_throttle]
    return {
        "invalid_throttle_settings": len(lines),
        "invalid_throttle_settings_detail": MetadataValue.text("\n".join(lines)),
    }


def materialization_metadata(
    usage_date: dt.date, stored: pd.DataFrame, extract: DayExtract, result: MeteringResult
) -> dict:
    hours = {column: float(stored[column].sum()) / 3600 for column in SECONDS_COLUMNS}
    return {
        **_invalid_throttle_metadata(extract),
        "usage_date": usage_date.isoformat(),
        "rows": len(stored),
        "orgs": int(stored["org_id"].nunique()),
        "heartbeats_extracted": len(extract.heartbeats),
        "duplicates_collapsed": result.duplicates_collapsed,
        "quarantined": len(result.quarantine),
        "runtime_hours": MetadataValue.float(round(hours["runtime_seconds"], 3)),
        "billable_hours": MetadataValue.float(round(hours["billable_seconds"], 3)),
        "idle_paused_hours": MetadataValue.float(round(hours["idle_paused_seconds"], 3)),
        "over_continuous_hours": MetadataValue.float(round(hours["over_continuous_seconds"], 3)),
        "over_daily_hours": MetadataValue.float(round(hours["over_daily_seconds"], 3)),
        "preview": MetadataValue.md(_markdown_preview(stored)),
    }


def late_heartbeats_check(late: list[LateDay]) -> AssetCheckResult:
    """WARN when earlier days got heartbeats after they were billed: how many, per
    day, and which of those days are past the Stripe window (reported, not pushed)."""
    return AssetCheckResult(
        check_name="no_late_heartbeats",
        passed=not late,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "late_days": len(late),
            "late_heartbeats": sum(day.late_heartbeats for day in late),
            "by_day": ", ".join(
                f"{day.usage_date}: {day.late_heartbeats}"
                + (" (past the Stripe window)" if day.past_stripe_window else "")
                for day in late
            )
            or "none",
            "fix": "tally late --run" if late else "nothing to do",
        },
    )
