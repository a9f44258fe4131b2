"""Push benchmark: 10,000 orgs × 4 tiers for one day against the sandbox at the
providers' live write limits (Stripe 1,000 events/s; Polar 500 requests/min with
batches of events).

Prints, per provider, the achieved rate as a fraction of the limit (target ≥ 0.9)
and the share of requests answered 429 (target ≤ 1 %), and checks that the
sandbox holds exactly the billable seconds. The sandbox runs as its own process
(`tally sandbox`), like a real provider. Run by hand:

    .venv/bin/python benchmarks/push.py [--orgs 10000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_common import server_url  # noqa: E402

from assets.push import push_day  # noqa: E402
from resources import db  # noqa: E402
from resources.providers import ProvidersResource  # noqa: E402

STRIPE_LIMIT_PER_S = 1000.0
POLAR_LIMIT_PER_MIN = 500.0
TIERS = ("small", "medium", "large", "gpu")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_sandbox() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "sandbox", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/_sandbox/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            continue
    process.kill()
    raise SystemExit("the sandbox did not start within 30 s")


def build(server_url: str, orgs: int, day: dt.date) -> str:
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text("DROP DATABASE IF EXISTS tally_bench_push WITH (FORCE)"))
        connection.execute(sa.text("CREATE DATABASE tally_bench_push"))
    url = (
        sa.engine.make_url(server_url)
        .set(database="tally_bench_push")
        .render_as_string(hide_password=False)
    )
    engine = db.engine_for(url)
    db.create_control_plane(engine)
    db.migrate(engine)
    rng = random.Random(42)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO organizations (org_id, name, plan, provider, provider_customer_id) "
                "SELECT 'org-' || o, 'Org ' || o, 'usage-only', "
                "       CASE WHEN o % 2 = 0 THEN 'stripe' ELSE 'polar' END, "
                "       CASE WHEN o % 2 = 0 THEN 'cus_' || lpad(o::text, 10, '0') "
                "            ELSE 'ext_org-' || o END "
                "FROM generate_series(1, :orgs) o"
            ),
            {"orgs": orgs},
        )
        connection.execute(
            sa.text(
                "INSERT INTO billing.billed_usage VALUES "
                "(:org, :day, :tier, :s, 0, 0, 0, :s, now())"
            ),
            [
                {"org": f"org-{o}", "day": day, "tier": tier, "s": rng.randint(60, 86_400)}
                for o in range(1, orgs + 1)
                for tier in TIERS
            ],
        )
    return url


def create_customers(url: str, base: str) -> None:
    """Stripe counts usage only for customers that exist: create every org's."""
    with db.engine_for(url).connect() as connection:
        rows = connection.execute(
            sa.text("SELECT provider, provider_customer_id FROM organizations ORDER BY org_id")
        ).all()
    customers = [{"provider": provider, "customer": customer} for provider, customer in rows]
    for start in range(0, len(customers), 2000):
        batch = customers[start : start + 2000]
        httpx.post(f"{base}/_sandbox/customers", json=batch, timeout=120).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", type=int, default=10_000)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    args = parser.parse_args()
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    url = build(server_url(args.database_url), args.orgs, day)
    os.environ["DATABASE_URL"] = url
    sandbox, base = start_sandbox()
    try:
        httpx.post(
            f"{base}/_sandbox/faults",
            json={
                "stripe_rate_limit_per_s": STRIPE_LIMIT_PER_S,
                "polar_rate_limit_per_s": POLAR_LIMIT_PER_MIN / 60,
            },
        ).raise_for_status()
        create_customers(url, base)
        providers = ProvidersResource(
            stripe_api_key="sk_test_bench",
            stripe_api_base=base,
            polar_access_token="polar_oat_bench",
            polar_api_base=base,
            stripe_writes_per_second=STRIPE_LIMIT_PER_S,
            polar_requests_per_minute=POLAR_LIMIT_PER_MIN,
        )
        engine = db.engine_for(url)
        started = time.monotonic()
        with db.raw_connection(engine) as connection:
            orgs = db.read_frame(connection, "push/orgs.sql")
            stats = push_day(connection, providers, day, dt.datetime.now(dt.UTC), orgs)
        elapsed = time.monotonic() - started
        sandbox_stats = httpx.get(f"{base}/_sandbox/stats").json()
        held = httpx.get(f"{base}/_sandbox/usage", params={"date": day.isoformat()}).json()
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)

    with engine.connect() as connection:
        billable = connection.execute(
            sa.text("SELECT sum(billable_seconds) FROM billing.billed_usage")
        ).scalar()
    print(f"events sent {stats['sent']:,} in {elapsed:.1f} s; errors: {stats['errors'] or 'none'}")
    print(f"sandbox holds {sum(row['seconds'] for row in held):,} s of {billable:,} billable s")
    stripe_events = args.orgs // 2 * len(TIERS)
    polar_events = stats["sent"] - stripe_events
    stripe_seconds = stats["stripe_push_ms"] / 1000
    polar_seconds = stats["polar_push_ms"] / 1000
    stripe_rate = stripe_events / stripe_seconds
    polar_requests = stats.get("polar_requests", 0)
    polar_rate = polar_requests / (polar_seconds / 60)
    print(
        f"stripe: {stripe_events:,} events in {stripe_seconds:.1f} s = {stripe_rate:,.0f}/s "
        f"= {stripe_rate / STRIPE_LIMIT_PER_S:.2f} of the 1000/s limit (target ≥ 0.9)"
    )
    print(
        f"polar : {polar_events:,} events in {polar_requests} requests in {polar_seconds:.1f} s "
        f"= {polar_rate:.0f} requests/min = {polar_rate / POLAR_LIMIT_PER_MIN:.2f} of 500/min"
    )
    for provider in ("stripe", "polar"):
        requests = stats.get(f"{provider}_requests", 0)
        limited = stats.get(f"{provider}_rate_limited", 0)
        share = limited / requests if requests else 0
        print(
            f"{provider}: {limited} of {requests} requests answered 429 = {share:.2%} "
            "(target ≤ 1 %)"
        )
    print(f"sandbox counters: {sandbox_stats}")


if __name__ == "__main__":
    main()
