"""`tally demo`: a believable week on a laptop, end to end, in one command."""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING

from pipelines.runner import run_days
from pipelines.summary import (
    SUMMARY_HEADER,
    credits_report,
    day_summary_row,
    discrepancy_report,
    month_to_date_report,
    report_month_day,
)
from resources.db import control_engine, recreate_embedded_database

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from pipelines.demo_sandbox import DemoSandbox


def _simulate_double_charge(engine: Engine, sandbox: DemoSandbox, day: dt.date) -> None:
    """Record two extra hours at the provider for one org, so the reconciliation
    has an over-charge to find and a credit to propose."""
    from resources.db import raw_connection, read_frame

    with raw_connection(engine) as connection:
        target = read_frame(connection, "demo/duplicate_target.sql")
    if target.empty:
        return
    org_id, customer = target.iloc[0]
    sandbox.post(
        "/_sandbox/events",
        json=[
            {
                "provider": "stripe",
                "customer": customer,
                "tier": "small",
                "seconds": 7200,
                "date": day.isoformat(),
            }
        ],
    ).raise_for_status()
    print(f"simulated a duplicate charge at Stripe: {org_id}, small tier, 2.0 h on {day}")


def _subscribe_closed_period(engine: Engine, sandbox: DemoSandbox, days: list[dt.date]) -> None:
    """One Stripe customer on weekly billing periods, one of which ended (and its
    invoice finalized, after Stripe's default 1 h grace) in the middle of the demo's
    week: the demo pushes afterwards, as a late backfill would, so reconciliation shows
    `pushed_after_finalization` and the invoice check `invoice_mismatch`."""
    from resources.db import raw_connection, read_frame

    if len(days) < 5:
        return
    with raw_connection(engine) as connection:
        target = read_frame(connection, "demo/invoice_target.sql")
    if target.empty:
        return
    org_id, customer = target.iloc[0]
    start = days[0] - dt.timedelta(days=3)
    sandbox.post(
        "/_sandbox/subscriptions",
        json={
            "provider": "stripe",
            "customer": customer,
            "plan": "usage-only",
            "period_start": start.isoformat(),
            "interval": "week",
        },
    ).raise_for_status()
    ended = start + dt.timedelta(days=7)
    print(f"{org_id} is billed weekly at Stripe; its period {start} .. {ended} has closed")


def _run_last_day_while_stripe_processes(last: dt.date, sandbox: DemoSandbox) -> int:
    """The last day is pushed while Stripe still processes meter events (2 h, as it
    may): its differences are `provider_settling`, not money moved; any later run
    re-reads it until it converges."""
    sandbox.post("/_sandbox/faults", json={"processing_delay_s": 7200}).raise_for_status()
    os.environ["TALLY_SETTLE_WAIT_S"] = "0"  # show it settling rather than wait
    try:
        return run_days([last], report_only=False, echo=lambda line: print(line, flush=True))
    finally:
        sandbox.post("/_sandbox/faults", json={"processing_delay_s": 0}).raise_for_status()
        os.environ.pop("TALLY_SETTLE_WAIT_S", None)


def _create_customers(engine: Engine, sandbox: DemoSandbox) -> None:
    """Create every seeded org's customer at its provider, as onboarding would:
    Stripe counts usage only for customers that exist."""
    from resources.db import raw_connection, read_frame

    with raw_connection(engine) as connection:
        customers = read_frame(connection, "demo/customers.sql")
    rows = [
        {key: value for key, value in row.items() if isinstance(value, str) and value}
        for row in customers.to_dict("records")
    ]
    if rows:
        sandbox.post("/_sandbox/customers", json=rows).raise_for_status()


class DemoError(ValueError):
    """Demo flags that cannot work; the message names the flag and the fix."""


def _yesterday() -> dt.date:
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def check_demo_flags(*, days: int, orgs: int, instances: int, seed: int) -> None:
    """Refuse impossible flags before anything starts (the embedded PostgreSQL, the
    sandbox), so a mistake leaves nothing running."""
    from pipelines.partitions import first_partition_day

    for flag, value, minimum in (
        ("--days", days, 1),
        ("--orgs", orgs, 1),
        ("--instances", instances, 1),
        ("--seed", seed, 0),
    ):
        if value < minimum:
            kind = "a positive integer" if minimum else "an integer >= 0"
            raise DemoError(f"{flag} must be {kind}, got {value}; e.g. {flag} 7")
    if instances < orgs:
        raise DemoError(
            f"--instances ({instances}) must be at least --orgs ({orgs}), every org needs an "
            f"instance; raise --instances to {orgs} or lower --orgs"
        )
    first, end = first_partition_day(), _yesterday()
    if days > (end - first).days + 1:
        raise DemoError(
            f"--days {days} reaches before the first partition {first}; "
            f"use at most --days {(end - first).days + 1}, e.g. --days 7"
        )


def run_demo(*, days: int, orgs: int, instances: int, seed: int) -> int:
    check_demo_flags(days=days, orgs=orgs, instances=instances, seed=seed)
    print("tally demo: starting the embedded PostgreSQL under .tally/pg", flush=True)
    # The default embedded database, recreated: afterwards `tally ui`, `tally status`
    # and `tally org` see the demo's data without any settings.
    url = recreate_embedded_database()
    sandbox = _start_demo_sandbox()
    return _seed_and_run(url, sandbox, days=days, orgs=orgs, instances=instances, seed=seed)


def _start_demo_sandbox() -> DemoSandbox:
    """The sandbox as its own process that stays up after the demo (like the embedded
    PostgreSQL), so `tally ui` backfills and issues credits against what the demo
    pushed; `tally stop` ends both."""
    from pipelines import demo_sandbox

    sandbox = demo_sandbox.start()
    print(
        f"tally demo: provider sandbox (Stripe + Polar) on {sandbox.base_url} "
        "(stays up for `tally ui`; `tally stop` stops it)",
        flush=True,
    )
    os.environ.update(sandbox.provider_env())
    return sandbox


def _seed_and_run(
    url: str, sandbox: DemoSandbox, *, days: int, orgs: int, instances: int, seed: int
) -> int:
    from pipelines import seed as seeding
    from resources.db import create_control_plane

    os.environ["DATABASE_URL"] = url
    os.environ.pop("BILLING_DATABASE_URL", None)
    engine = control_engine()  # the recreated database, through DATABASE_URL
    create_control_plane(engine)
    end_date = _yesterday()
    spec = seeding.SeedSpec(orgs=orgs, instances=instances, days=days, end_date=end_date, seed=seed)
    counts = seeding.seed(engine, spec)
    print(
        "seeded " + ", ".join(f"{table}={count:,}" for table, count in counts.items()), flush=True
    )
    _create_customers(engine, sandbox)
    usage_days = [end_date - dt.timedelta(days=offset) for offset in range(days - 1, -1, -1)]
    _simulate_double_charge(engine, sandbox, usage_days[len(usage_days) // 2])
    _subscribe_closed_period(engine, sandbox, usage_days)
    failures = run_days(
        usage_days[:-1], report_only=False, echo=lambda line: print(line, flush=True)
    )
    failures += _run_last_day_while_stripe_processes(usage_days[-1], sandbox)
    print("\nDaily summary (hours; recorded = what the provider holds after the push)")
    print(SUMMARY_HEADER)
    for day in usage_days:
        print(day_summary_row(day))
    print(f"\nDiscrepancies {usage_days[0]} .. {usage_days[-1]} (billing.discrepancies)")
    print("\n".join(discrepancy_report(usage_days[0], usage_days[-1])))
    # The month holding most of the demo's days, not the day or two of the next one.
    as_of = report_month_day(usage_days)
    print(f"\nMonth to date as of {as_of} (billing.quota_usage; credits of that month)")
    print("\n".join(month_to_date_report(as_of)))
    print(f"\nCredit proposals by month of their usage day {usage_days[0]} .. {usage_days[-1]}")
    print("\n".join(credits_report(usage_days[0], usage_days[-1])))
    print(
        "\nNext: `.venv/bin/tally review` (the finance review), `.venv/bin/tally ui` to "
        "browse the runs, checks and finance metadata; `.venv/bin/tally status`; "
        "`.venv/bin/tally org ORG_ID`."
    )
    return 1 if failures else 0
