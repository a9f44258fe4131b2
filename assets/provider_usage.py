"""What the providers recorded for a usage day (`billing.provider_usage`), read back
after the push: Stripe one event-summaries call per customer and meter, Polar
customers asked for in groups and narrowed down only where a total differs from
the ledger. Also the providers' subscription plans, for plan_mismatch."""

import datetime as dt
from typing import Any

import pandas as pd
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from assets.config import pricing_or_fail
from assets.discrepancy import INPUT_COLUMNS, with_columns
from pipelines.partitions import daily_partitions, partition_day
from pipelines.retry import STEP_RETRY
from resources.db import (
    PostgresResource,
    load_sql,
    raw_connection,
    read_frame,
    replace_day_rows,
)
from resources.providers import (
    Provider,
    ProviderConfigError,
    ProviderError,
    ProvidersResource,
    RecordedUsage,
    usable_customer_id,
)
from resources.settings import RunMode


def _expected_by_customer(sent: pd.DataFrame, provider: str) -> dict[tuple[str, str], int]:
    mine = sent[sent["provider"] == provider] if not sent.empty else sent
    return {(row.customer_id, row.tier): int(row.seconds) for row in mine.itertuples(index=False)}


def _read_provider(
    provider: str,
    orgs: pd.DataFrame,
    sent: pd.DataFrame,
    providers: ProvidersResource,
    usage_date: dt.date,
    tiers: list[str],
    report_only: bool,
) -> tuple[dict, list[tuple], list[dict], dict[str, int]]:
    """One provider's day → (read record, usage rows, plan rows, stats)."""
    customer_to_org: dict[str, str] = {}
    for row in orgs[orgs["provider"] == provider].itertuples(index=False):
        customer = usable_customer_id(row.provider_customer_id)
        if customer is not None:
            customer_to_org.setdefault(customer, row.org_id)
    record = {
        "provider": provider,
        "status": "read",
        "customers": len(customer_to_org),
        "calls": 0,
        "unread_tiers": [],
        "unattributed_seconds": 0,
        "note": None,
    }
    if not customer_to_org:
        record["status"] = "no_customers"
        return record, [], [], {}
    if report_only:
        # `--report-only`: nothing leaves the machine, reads included.
        record["status"] = "skipped"
        record["note"] = "report-only run: provider not contacted"
        return record, [], [], {}
    client = providers.client(provider)
    recorded: RecordedUsage = client.recorded_usage(
        usage_date,
        list(customer_to_org),
        tiers,
        _expected_by_customer(sent, provider),
        create_meters=True,
    )
    plans = client.plans(customer_to_org)
    calls = int(client.read_stats()["requests"])
    record.update(
        calls=calls,
        unread_tiers=list(recorded.unread_tiers),
        unattributed_seconds=int(recorded.unattributed),
    )
    if recorded.unread_tiers:
        record["note"] = (
            f"no Polar meter for {', '.join(recorded.unread_tiers)}: those tiers were not compared"
        )
    stats = {
        f"{provider}_calls": calls,
        f"{provider}_customers": len(customer_to_org),
        f"{provider}_recorded_seconds": sum(recorded.seconds.values()),
        f"{provider}_exact_reads": len(recorded.exact),
    }
    usage_rows = [
        (
            usage_date,
            customer_to_org[customer],
            tier,
            provider,
            customer,
            int(seconds),
            (customer, tier) in recorded.exact,
        )
        for (customer, tier), seconds in sorted(recorded.seconds.items())
        if customer in customer_to_org
    ]
    plan_rows = [
        {
            "org_id": customer_to_org[customer],
            "provider": provider,
            "customer_id": customer,
            "plan": plan.plan,
            "status": plan.status,
        }
        for customer, plan in sorted(plans.items())
    ]
    return record, usage_rows, plan_rows, stats


def read_providers(
    orgs: pd.DataFrame,
    sent: pd.DataFrame,
    providers: ProvidersResource,
    usage_date: dt.date,
    tiers: list[str],
    *,
    report_only: bool,
) -> tuple[pd.DataFrame, list[dict], pd.DataFrame, dict[str, int]]:
    """Read every provider for the day, the providers side by side (their rate limits
    are independent) → (usage rows, read records, plan rows, stats)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(Provider)) as pool:
        futures = [
            pool.submit(
                _read_provider,
                provider,
                orgs,
                sent,
                providers,
                usage_date,
                tiers,
                report_only,
            )
            for provider in Provider
        ]
        results = [future.result() for future in futures]
    stats = {"stripe_calls": 0, "polar_calls": 0, "customers": 0}
    reads, usage_rows, plan_rows = [], [], []
    for record, usage_part, plan_part, stats_part in results:
        reads.append(record)
        usage_rows += usage_part
        plan_rows += plan_part
        stats.update(stats_part)
        stats["customers"] += stats_part.get(f"{record['provider']}_customers", 0)
    usage = pd.DataFrame(
        usage_rows,
        columns=["usage_date", "org_id", "tier", "provider", "customer_id", "seconds", "exact"],
    )
    return usage, reads, pd.DataFrame(plan_rows, columns=INPUT_COLUMNS["plans"]), stats


def write_provider_usage(
    connection, usage_date: dt.date, usage: pd.DataFrame, reads: list[dict], plans: pd.DataFrame
) -> None:
    params = {"usage_date": usage_date}
    with connection.cursor() as cursor:
        replace_day_rows(
            cursor,
            "provider_usage",
            usage_date,
            deletes=[
                "provider_usage/delete.sql",
                "provider_usage/delete_reads.sql",
                "provider_usage/delete_plans.sql",
            ],
            copies=[("provider_usage/copy.sql", usage.itertuples(index=False, name=None))],
        )
        cursor.executemany(
            load_sql("provider_usage/insert_read.sql"), [{**params, **read} for read in reads]
        )
        cursor.executemany(
            load_sql("provider_usage/insert_plan.sql"),
            [{**params, **plan} for plan in plans.to_dict("records")],
        )


@asset(
    partitions_def=daily_partitions,
    group_name="reconcile",
    deps=["usage_push"],
    retry_policy=STEP_RETRY,
    description=(
        "What Stripe and Polar recorded for the day per (org, tier): one event-summaries "
        "call per Stripe customer and meter; Polar customers asked for in groups, split "
        "only where a total differs from the ledger."
    ),
)
def provider_usage(
    context: AssetExecutionContext,
    postgres: PostgresResource,
    providers: ProvidersResource,
    run_mode: RunMode,
) -> MaterializeResult:
    usage_date = partition_day(context.partition_key)
    params = {"usage_date": usage_date}
    with raw_connection(postgres.control_engine()) as connection:
        orgs = with_columns(read_frame(connection, "provider_usage/orgs.sql"), "orgs")
    billing_engine = postgres.billing_engine()
    with raw_connection(billing_engine) as connection:
        sent = read_frame(connection, "provider_usage/sent.sql", params)
    if sent.empty:
        sent = pd.DataFrame(columns=["provider", "customer_id", "tier", "seconds"])
    tiers = pricing_or_fail().tiers_by_price()
    try:
        usage, reads, plans, stats = read_providers(
            orgs,
            sent,
            providers,
            usage_date,
            tiers,
            report_only=run_mode.report_only,
        )
    except ProviderConfigError as error:  # a missing key: retrying cannot help
        raise Failure(description=str(error), allow_retries=False) from None
    except ProviderError as error:
        raise Failure(description=str(error)) from None
    with raw_connection(billing_engine) as connection:
        write_provider_usage(connection, usage_date, usage, reads, plans)

    polar_customers = stats.get("polar_customers", 0)
    metadata: dict[str, Any] = {
        "usage_date": usage_date.isoformat(),
        "rows": len(usage),
        "customers": stats["customers"],
        "stripe_calls": stats["stripe_calls"],
        "polar_calls": stats["polar_calls"],
        "polar_one_call_per_customer_would_be": polar_customers * len(tiers),
        "recorded_hours": MetadataValue.float(round(int(usage["seconds"].sum()) / 3600, 3)),
        "plans_read": len(plans),
    }
    for read in reads:
        metadata[f"{read['provider']}_status"] = read["status"]
        if read["unread_tiers"]:
            metadata[f"{read['provider']}_unread_tiers"] = ", ".join(read["unread_tiers"])
        if read["unattributed_seconds"]:
            metadata[f"{read['provider']}_unattributed_seconds"] = read["unattributed_seconds"]
    return MaterializeResult(metadata=metadata)
