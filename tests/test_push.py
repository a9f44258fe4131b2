"""usage_push against the sandbox over HTTP with the real SDKs: exactly once."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, every_minute
from dagster import materialize

from assets.metering import billed_usage
from assets.push import usage_push
from resources.db import PostgresResource
from resources.providers import ProvidersResource
from resources.settings import RunMode

DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def resources(report_only: bool = False, **provider_settings):
    return {
        "postgres": PostgresResource(),
        "run_mode": RunMode(report_only=report_only),
        "providers": ProvidersResource(**provider_settings),
    }


def run_day(day=DAY, assets=None, raise_on_error=True, **kwargs):
    return materialize(
        assets or [billed_usage, usage_push],
        partition_key=day.isoformat(),
        resources=resources(**kwargs),
        raise_on_error=raise_on_error,
    )


def sandbox_usage(sandbox, day=DAY) -> dict[tuple[str, str, str], int]:
    answer = sandbox.get(f"/_sandbox/usage?date={day.isoformat()}").json()
    return {(row["provider"], row["customer"], row["tier"]): row["seconds"] for row in answer}


def world(engine):
    add_org(engine, "org-s", provider="stripe", customer="cus_S0001")
    add_org(engine, "org-p", provider="polar", customer="ext_org-p")
    add_org(engine, "org-none", provider="stripe", customer="")
    add_instance(engine, "i-s1", "org-s", "small")
    add_instance(engine, "i-s2", "org-s", "gpu")
    add_instance(engine, "i-p1", "org-p", "large")
    add_instance(engine, "i-n1", "org-none", "small")
    add_heartbeats(engine, every_minute("i-s1", at(DAY, 1), 60))
    add_heartbeats(engine, every_minute("i-s2", at(DAY, 2), 30))
    add_heartbeats(engine, every_minute("i-p1", at(DAY, 3), 90))
    add_heartbeats(engine, every_minute("i-n1", at(DAY, 3), 10))


EXPECTED = {
    ("stripe", "cus_S0001", "small"): 3600,
    ("stripe", "cus_S0001", "gpu"): 1800,
    ("polar", "ext_org-p", "large"): 5400,
}


def test_push_is_exact_and_rerun_sends_nothing(engine, providers_env):
    world(engine)
    result = run_day()
    assert sandbox_usage(providers_env) == EXPECTED
    metadata = result.asset_materializations_for_node("usage_push")[0].metadata
    assert metadata["sent"].value == 3 and metadata["refused"].value == 1
    again = run_day()
    assert sandbox_usage(providers_env) == EXPECTED
    assert again.asset_materializations_for_node("usage_push")[0].metadata["sent"].value == 0
    with engine.connect() as connection:
        refusal = connection.execute(
            sa.text("SELECT org_id, reason FROM billing.push_refusals")
        ).one()
    assert refusal.org_id == "org-none" and "provider_customer_id" in refusal.reason


def test_report_only_sends_nothing(engine, providers_env):
    world(engine)
    run_day(report_only=True)
    assert sandbox_usage(providers_env) == {}
