"""What the providers recorded for a usage day (`billing.provider_usage`), read back
after the push: Stripe one event-summaries call per customer and meter, Polar
customers asked for in groups and narrowed down only where a total differs from
the ledger. Also the providers' subscription plans, for plan_mismatch."""

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    PartitionsDefinition,
    asset,
)

from assets.config import pricing_or_fail
from assets.discrepancy import INPUT_COLUMNS, with_columns
from assets.settlement import SettlementRules, activity_by_target, unsettled_targets
from assets.shards import ALL, Shard, shard_of, sibling_labels
from pipelines.partitions import daily_partitions, day_and_shard, partition_day
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

Pair = tuple[str, str]  # (customer_id, tier)


@dataclass
class ProviderDay:
    """Who one provider's customers are for the day: the orgs currently billed to
    each customer, and what the ledger sent there for each org (an org that moved
    provider or customer id is read at every customer it was sent to)."""

    current: dict[str, list[str]] = field(default_factory=dict)  # customer → orgs
    sent: dict[Pair, dict[str, int]] = field(default_factory=dict)  # pair → org → s

    @property
    def customers(self) -> list[str]:
        return sorted(set(self.current) | {customer for customer, _ in self.sent})

    def expected(self) -> dict[Pair, int]:
        """What the ledger says each (customer, tier) holds, all orgs together."""
        return {pair: sum(by_org.values()) for pair, by_org in self.sent.items()}

    def orgs_by_customer(self) -> dict[str, set[str]]:
        """Every org billed to each customer now or sent to it on the day."""
        orgs = {customer: set(current) for customer, current in self.current.items()}
        for (customer, _), by_org in self.sent.items():
            orgs.setdefault(customer, set()).update(by_org)
        return orgs

    def only(self, customers: set[str]) -> "ProviderDay":
        return ProviderDay(
            current={c: orgs for c, orgs in self.current.items() if c in customers},
            sent={pair: by_org for pair, by_org in self.sent.items() if pair[0] in customers},
        )


SHARED_PART = "shared"


@dataclass(frozen=True)
class ReadScope:
    """Which customers one read-back reads: all of them (unsharded); those whose
    orgs are all in one org shard (that shard's read-back, right after its push);
    or, `shared`, those with orgs in several shards — read once every shard has
    pushed (the day's `shared_provider_usage`), so a customer is never read while
    another shard may still be sending to it."""

    shard: Shard = ALL
    shared: bool = False

    @property
    def part(self) -> str:
        return SHARED_PART if self.shared else self.shard.label

    def params(self) -> dict[str, object]:
        """The part-scoped SQL's binds; the shared part is one of the layout's."""
        labels = sibling_labels(self.shard.count)
        return {
            "part": self.part,
            "parts": [*labels, SHARED_PART] if self.shard.sharded else labels,
        }

    def reads(self, orgs: set[str]) -> bool:
        if not self.shard.sharded:
            return True
        shards = {shard_of(org, self.shard.count) for org in orgs}
        if self.shared:
            return len(shards) > 1
        return shards == {self.shard.index}

    def restrict(self, day: ProviderDay) -> ProviderDay:
        if not self.shard.sharded:
            return day
        return day.only({c for c, orgs in day.orgs_by_customer().items() if self.reads(orgs)})


def provider_day(provider: str, orgs: pd.DataFrame, sent: pd.DataFrame) -> ProviderDay:
    day = ProviderDay()
    for row in orgs[orgs["provider"] == provider].itertuples(index=False):
        customer = usable_customer_id(row.provider_customer_id)
        if customer is not None:
            day.current.setdefault(customer, []).append(str(row.org_id))
    mine = sent[sent["provider"] == provider] if not sent.empty else sent
    for row in mine.itertuples(index=False):
        by_org = day.sent.setdefault((str(row.customer_id), str(row.tier)), {})
        by_org[str(row.org_id)] = by_org.get(str(row.org_id), 0) + int(row.seconds)
    return day


def attribute_to_orgs(recorded: dict[Pair, int], day: ProviderDay) -> list[tuple[str, Pair, int]]:
    """(org, (customer, tier), seconds) for what a provider holds, split between the
    orgs of a customer by the ledger: each org is taken to hold what tally sent for
    it there, and only the customer-level difference is anybody's discrepancy. An
    excess goes to the org the ledger sent most to (else the customer's first
    current org); a shortfall is taken from the orgs in that order. Pairs nobody was
    sent to and nobody is billed to are left out (unattributed)."""
    rows: list[tuple[str, Pair, int]] = []
    for pair in sorted(set(recorded) | set(day.sent)):
        by_org = dict(day.sent.get(pair, {}))
        order = sorted(by_org, key=lambda org: (-by_org[org], org))
        order += [org for org in day.current.get(pair[0], []) if org not in by_org]
        if not order:
            continue
        difference = recorded.get(pair, 0) - sum(by_org.values())
        if difference > 0:
            by_org[order[0]] = by_org.get(order[0], 0) + difference
        for org in order:
            if difference >= 0:
                break
            taken = min(by_org.get(org, 0), -difference)
            by_org[org] = by_org.get(org, 0) - taken
            difference += taken
        rows += [(org, pair, by_org[org]) for org in order if by_org.get(org, 0)]
    return rows


@dataclass(frozen=True)
class DayToRead:
    """What read-back needs for one day: the orgs' current accounts (control plane),
    what the ledger sent where, the tiers to read, and whether the run is
    report-only (nothing leaves the machine, reads included)."""

    usage_date: dt.date
    orgs: pd.DataFrame
    sent: pd.DataFrame
    tiers: list[str]
    report_only: bool
    scope: ReadScope = ReadScope()


def _read_provider(
    provider: str, request: DayToRead, providers: ProvidersResource
) -> tuple[dict, list[tuple], list[dict], dict[str, int], dict[str, list[tuple]]]:
    """One provider's day → (read record, usage rows, plan rows, stats, facts: the
    customers it has and its finalized invoices)."""
    usage_date, tiers = request.usage_date, request.tiers
    day = request.scope.restrict(provider_day(provider, request.orgs, request.sent))
    customers = day.customers
    record = {
        "provider": provider,
        "status": "read",
        "customers": len(customers),
        "calls": 0,
        "unread_tiers": [],
        "unattributed_seconds": 0,
        "note": None,
        "read_customers": customers,
    }
    if not customers:
        record["status"] = "no_customers"
        return record, [], [], {}, {}
    if request.report_only:
        # `--report-only`: nothing leaves the machine, reads included.
        record["status"] = "skipped"
        record["note"] = "report-only run: provider not contacted"
        return record, [], [], {}, {}
    client = providers.client(provider)
    recorded: RecordedUsage = client.recorded_usage(
        usage_date, customers, tiers, day.expected(), create_meters=True
    )
    plans = client.plans(day.current)
    # Who the provider has (bulk list) and what its finalized invoices bill.
    known = client.existing_customers(customers)
    facts: dict[str, list[tuple]] = {
        "customers": [(provider, customer, customer in known) for customer in customers],
        "invoices": [
            (
                provider,
                invoice.customer_id,
                invoice.invoice_id,
                invoice.period_start,
                invoice.period_end,
                invoice.finalized_at,
                tier,
                seconds,
            )
            for invoice in client.finalized_invoices(customers, tiers)
            for tier, seconds in sorted((invoice.seconds_by_tier or {"": 0}).items())
        ],
    }
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
        f"{provider}_customers": len(customers),
        f"{provider}_recorded_seconds": sum(recorded.seconds.values()),
        f"{provider}_exact_reads": len(recorded.exact),
    }
    usage_rows = [
        (usage_date, org_id, tier, provider, customer, int(seconds), pair in recorded.exact)
        for org_id, pair, seconds in attribute_to_orgs(recorded.seconds, day)
        for customer, tier in [pair]
    ]
    plan_rows = [
        {
            "org_id": org_id,
            "provider": provider,
            "customer_id": customer,
            "plan": plan.plan,
            "status": plan.status,
        }
        for customer, plan in sorted(plans.items())
        for org_id in day.current.get(customer, [])
    ]
    return record, usage_rows, plan_rows, stats, facts


# What reconciliation reads back from these tables (assets/discrepancy.py owns them).
CUSTOMER_COLUMNS = INPUT_COLUMNS["customers"]
INVOICE_COLUMNS = INPUT_COLUMNS["invoices"]


@dataclass
class DayRead:
    """What read-back found for the day at every provider."""

    usage: pd.DataFrame
    reads: list[dict]
    plans: pd.DataFrame
    stats: dict[str, int]
    customers: pd.DataFrame
    invoices: pd.DataFrame


def read_providers(request: DayToRead, providers: ProvidersResource) -> DayRead:
    """Read every provider for the day, the providers side by side (their rate limits
    are independent)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(Provider)) as pool:
        futures = [
            pool.submit(_read_provider, provider, request, providers) for provider in Provider
        ]
        results = [future.result() for future in futures]
    stats = {"stripe_calls": 0, "polar_calls": 0, "customers": 0}
    reads, usage_rows, plan_rows, customer_rows, invoice_rows = [], [], [], [], []
    for record, usage_part, plan_part, stats_part, facts in results:
        reads.append(record)
        usage_rows += usage_part
        plan_rows += plan_part
        customer_rows += facts.get("customers", [])
        invoice_rows += facts.get("invoices", [])
        stats.update(stats_part)
        stats["customers"] += stats_part.get(f"{record['provider']}_customers", 0)
    usage = pd.DataFrame(
        usage_rows,
        columns=["usage_date", "org_id", "tier", "provider", "customer_id", "seconds", "exact"],
    )
    return DayRead(
        usage,
        reads,
        pd.DataFrame(plan_rows, columns=INPUT_COLUMNS["plans"]),
        stats,
        pd.DataFrame(customer_rows, columns=CUSTOMER_COLUMNS),
        pd.DataFrame(invoice_rows, columns=INVOICE_COLUMNS),
    )


def write_provider_usage(
    connection, usage_date: dt.date, read: DayRead, scope: ReadScope = ReadScope()
) -> None:
    """Replace what `scope` read for the day (its part's rows, and any row of the
    customers it read), one transaction."""
    pairs = [(r["provider"], c) for r in read.reads for c in r.get("read_customers", [])]
    params = {
        "usage_date": usage_date,
        **scope.params(),
        "read_providers": [provider for provider, _ in pairs],
        "read_customers": [customer for _, customer in pairs],
    }
    part = scope.part
    with connection.cursor() as cursor:
        replace_day_rows(
            cursor,
            "provider_usage",
            usage_date,
            deletes=[
                "provider_usage/delete.sql",
                "provider_usage/delete_reads.sql",
                "provider_usage/delete_plans.sql",
                "provider_usage/delete_customers.sql",
                "provider_usage/delete_invoices.sql",
            ],
            copies=[
                (
                    "provider_usage/copy.sql",
                    ((*row, part) for row in read.usage.itertuples(index=False, name=None)),
                ),
                (
                    "provider_usage/copy_customers.sql",
                    ((usage_date, *row, part) for row in read.customers.itertuples(index=False)),
                ),
                (
                    "provider_usage/copy_invoices.sql",
                    ((usage_date, *row, part) for row in read.invoices.itertuples(index=False)),
                ),
            ],
            params=params,
        )
        cursor.executemany(
            load_sql("provider_usage/insert_read.sql"), [{**params, **read} for read in read.reads]
        )
        cursor.executemany(
            load_sql("provider_usage/insert_plan.sql"),
            [{**params, **plan} for plan in read.plans.to_dict("records")],
        )


def scoped_sent(request: DayToRead) -> pd.DataFrame:
    """The ledger's sends to the customers the request's scope reads."""
    if not request.scope.shard.sharded or request.sent.empty:
        return request.sent
    read = {
        (provider, customer)
        for provider in Provider
        for customer in request.scope.restrict(
            provider_day(provider, request.orgs, request.sent)
        ).customers
    }
    providers = request.sent["provider"].astype(str)
    customers = request.sent["customer_id"].astype(str)
    return request.sent[[key in read for key in zip(providers, customers, strict=True)]]


def _ledger_totals(sent: pd.DataFrame) -> dict[tuple[str, str, str], int]:
    """What the ledger sent per (provider, customer, tier), all orgs together."""
    totals: dict[tuple[str, str, str], int] = {}
    for row in sent.itertuples(index=False):
        key = (str(row.provider), str(row.customer_id), str(row.tier))
        totals[key] = totals.get(key, 0) + int(row.seconds)
    return totals


def _recorded_totals(usage: pd.DataFrame) -> dict[tuple[str, str, str], int]:
    """What the providers hold per (provider, customer, tier) (attributed rows summed)."""
    totals: dict[tuple[str, str, str], int] = {}
    for row in usage.itertuples(index=False):
        key = (str(row.provider), str(row.customer_id), str(row.tier))
        totals[key] = totals.get(key, 0) + int(row.seconds)
    return totals


def read_back(
    context: AssetExecutionContext,
    postgres: PostgresResource,
    providers: ProvidersResource,
    run_mode: RunMode,
    usage_date: dt.date,
    scope: ReadScope,
) -> MaterializeResult:
    """Read back the customers of `scope` for the day and store what they hold."""
    params = {"usage_date": usage_date, **scope.params()}
    with raw_connection(postgres.control_engine()) as connection:
        orgs = with_columns(read_frame(connection, "provider_usage/orgs.sql"), "orgs")
    billing_engine = postgres.billing_engine()
    with raw_connection(billing_engine) as connection:
        sent = read_frame(connection, "provider_usage/sent.sql", params)
    if sent.empty:
        sent = pd.DataFrame(columns=["org_id", "provider", "customer_id", "tier", "seconds"])
    tiers = pricing_or_fail().tiers_by_price()
    request = DayToRead(usage_date, orgs, sent, tiers, run_mode.report_only, scope)
    settlement = SettlementRules.from_env()
    with raw_connection(billing_engine) as connection:
        activity = activity_by_target(read_frame(connection, "settlement/activity.sql", params))
    try:
        read = read_providers(request, providers)
        # While what the provider shows differs in a shape its processing lag
        # explains, read again (at most `settlement.wait`): the day converges here
        # instead of reporting usage that is on its way.
        started = time.monotonic()
        polls = 0
        waiting: set[tuple[str, str]] = set()
        ledger = _ledger_totals(scoped_sent(request))
        while not run_mode.report_only:
            waiting = unsettled_targets(
                ledger,
                _recorded_totals(read.usage),
                activity,
                dt.datetime.now(dt.UTC),
                settlement,
            )
            left = settlement.wait.total_seconds() - (time.monotonic() - started)
            if not waiting or left <= 0:
                break
            time.sleep(min(settlement.poll.total_seconds(), left))
            polls += 1
            read = read_providers(request, providers)
    except ProviderConfigError as error:  # a missing key: retrying cannot help
        raise Failure(description=str(error), allow_retries=False) from None
    except ProviderError as error:
        raise Failure(description=str(error)) from None
    with raw_connection(billing_engine) as connection:
        # Report-only never replaces what a real run read from the providers.
        kept = run_mode.report_only and bool(
            read_frame(connection, "provider_usage/real_reads_exist.sql", params)["real"].iloc[0]
        )
        if not kept:
            write_provider_usage(connection, usage_date, read, scope)

    stats, usage = read.stats, read.usage
    polar_customers = stats.get("polar_customers", 0)
    unknown = read.customers[~read.customers["known"].astype(bool)]
    metadata: dict[str, Any] = {
        "usage_date": usage_date.isoformat(),
        "part": scope.part,
        "rows": len(usage),
        "customers": stats["customers"],
        "unknown_customers": len(unknown),
        "finalized_invoices": int(read.invoices["invoice_id"].nunique()),
        "stripe_calls": stats["stripe_calls"],
        "polar_calls": stats["polar_calls"],
        "polar_one_call_per_customer_would_be": polar_customers * len(tiers),
        "recorded_hours": MetadataValue.float(round(int(usage["seconds"].sum()) / 3600, 3)),
        "plans_read": len(read.plans),
        "report_only": run_mode.report_only,
        "kept_real_reads": kept,
        "settle_polls": polls,
        "settle_waited_s": MetadataValue.float(round(time.monotonic() - started, 1)),
        "still_settling": ", ".join(f"{p}:{c}" for p, c in sorted(waiting)) or "none",
    }
    for record in read.reads:
        metadata[f"{record['provider']}_status"] = record["status"]
        if record["unread_tiers"]:
            metadata[f"{record['provider']}_unread_tiers"] = ", ".join(record["unread_tiers"])
        if record["unattributed_seconds"]:
            metadata[f"{record['provider']}_unattributed_seconds"] = record["unattributed_seconds"]
    return MaterializeResult(metadata=metadata)


READ_BACK_DESCRIPTION = (
    "What Stripe and Polar recorded for the day per (org, tier): one event-summaries "
    "call per Stripe customer and meter; Polar customers asked for in groups, split "
    "only where a total differs from the ledger."
)


def build_provider_usage(
    partitions_def: PartitionsDefinition = daily_partitions,
) -> AssetsDefinition:
    """The provider_usage asset over `partitions_def` (the days, or day × shard:
    then each shard reads the customers whose orgs are all its own)."""

    @asset(
        name="provider_usage",
        partitions_def=partitions_def,
        group_name="reconcile",
        deps=["usage_push"],
        retry_policy=STEP_RETRY,
        description=READ_BACK_DESCRIPTION,
    )
    def provider_usage(
        context: AssetExecutionContext,
        postgres: PostgresResource,
        providers: ProvidersResource,
        run_mode: RunMode,
    ) -> MaterializeResult:
        usage_date, shard = day_and_shard(context.partition_key, context.assets_def.partitions_def)
        return read_back(context, postgres, providers, run_mode, usage_date, ReadScope(shard))

    return provider_usage


def build_shared_provider_usage(shard_count: int) -> AssetsDefinition:
    """Sharded days only: the customers with orgs in several shards, read once every
    shard of the day has pushed (a daily asset after all of them)."""

    @asset(
        name="shared_provider_usage",
        partitions_def=daily_partitions,
        group_name="reconcile",
        deps=["provider_usage"],
        retry_policy=STEP_RETRY,
        description=(
            "Read-back of the customers shared by orgs of several shards, after every "
            "shard of the day pushed. " + READ_BACK_DESCRIPTION
        ),
    )
    def shared_provider_usage(
        context: AssetExecutionContext,
        postgres: PostgresResource,
        providers: ProvidersResource,
        run_mode: RunMode,
    ) -> MaterializeResult:
        usage_date = partition_day(context.partition_key)
        scope = ReadScope(Shard(0, shard_count), shared=True)
        return read_back(context, postgres, providers, run_mode, usage_date, scope)

    return shared_provider_usage


provider_usage = build_provider_usage()
