"""Prometheus metrics of DESIGN §9, computed at scrape time (no push, no state to lose).

- billing_reconciliation_last_success_timestamp: epoch seconds of the newest
  `reconciliation` materialization; 0 when it never succeeded (so
  `time() - metric > 86400` fires for "never" too).
- billing_reconciliation_duration_seconds: wall time of the run that produced it.
- billing_reconciliation_stale: 1 when `tally status` would say stale.
- billing_reconciliation_discrepancies_total{kind}: rows of billing.discrepancies by
  kind (a gauge: re-reconciling a day can lower it).
- tally_usage_push_pending: ledger rows still `pending` (sent, answer unknown).
- tally_provider_errors_total{provider}: failed provider requests, summed over the
  `<provider>_errors` metadata of every usage_push materialization and of every
  failed usage_push step (the metadata of its `Failure`, read from the STEP_FAILURE
  event of each failed or cancelled run), so an outage counts. Dagster keeps one
  STEP_FAILURE per step and run (its last attempt): a failed run is counted once.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipelines.freshness import LastReconciliation, evaluate_freshness, last_reconciliation
from resources.db import load_sql, raw_connection
from resources.providers.base import Provider, provider_error_metric_key

if TYPE_CHECKING:
    from dagster import DagsterInstance
    from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

USAGE_PUSH_ASSET = "usage_push"
_PAGE = 1000


class TallyCollector(Collector):
    """Queries the Dagster instance and the billing database on every scrape.

    Provider errors are summed incrementally: only materializations newer than the
    last scrape are read (the running sums live in this object)."""

    def __init__(
        self,
        instance: DagsterInstance,
        billing_engine: Callable[[], Engine] | None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.instance = instance
        self.billing_engine = billing_engine
        self.clock = clock
        self._errors: dict[str, int] = {provider: 0 for provider in Provider}
        self._errors_cursor: str | None = None
        # One cursor per run-ending event type whose runs may hold a failed push.
        self._failed_runs_cursors: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        yield from self._reconciliation()
        yield from self._provider_errors()
        yield from self._billing_database()

    # -- reconciliation (billing database) and provider errors (Dagster) ---------

    def _reconciliation(self) -> Iterator[Metric]:
        facts = self._last_reconciliation()
        freshness = evaluate_freshness(facts.success_at, facts.reconciled_days, self.clock())
        last = GaugeMetricFamily(
            "billing_reconciliation_last_success_timestamp",
            "Unix time of the last successful reconciliation (0: never).",
        )
        last.add_metric([], facts.success_at.timestamp() if facts.success_at else 0.0)
        yield last
        duration = GaugeMetricFamily(
            "billing_reconciliation_duration_seconds",
            "Wall time of the run that produced the last successful reconciliation.",
        )
        if facts.duration_seconds is not None:
            duration.add_metric([], facts.duration_seconds)
        yield duration
        stale = GaugeMetricFamily(
            "billing_reconciliation_stale",
            "1 when no reconciliation succeeded in 24 h or yesterday is not reconciled "
            "by 06:00 UTC.",
        )
        stale.add_metric([], 1.0 if freshness.stale else 0.0)
        yield stale

    def _last_reconciliation(self) -> LastReconciliation:
        """From the billing database's own record; unreadable: as never reconciled."""
        try:
            engine = self.billing_engine() if self.billing_engine else None
            if engine is not None:
                return last_reconciliation(engine)
        except Exception as error:  # noqa: BLE001 - a scrape must still answer
            log.error(
                "billing.reconciliations unavailable: %s",
                str(error).splitlines()[0] if str(error) else type(error).__name__,
            )
        return LastReconciliation(None, None, None, frozenset())

    def _provider_errors(self) -> Iterator[Metric]:
        from dagster import AssetKey

        with self._lock:
            while True:
                page = self.instance.fetch_materializations(
                    AssetKey(USAGE_PUSH_ASSET),
                    limit=_PAGE,
                    cursor=self._errors_cursor,
                    ascending=True,
                )
                for record in page.records:
                    materialization = record.asset_materialization
                    self._add_metadata(materialization.metadata if materialization else {})
                if page.records:
                    self._errors_cursor = page.cursor
                if not page.has_more:
                    break
            self._add_failed_push_errors()
            errors = dict(self._errors)
        family = CounterMetricFamily(
            "tally_provider_errors",
            "Failed provider requests (5xx, timeouts, 429) during usage push.",
            labels=["provider"],
        )
        for name, count in errors.items():
            family.add_metric([name], count)
        yield family

    def _add_metadata(self, metadata: Mapping[str, Any]) -> None:
        for provider in Provider:
            value = metadata.get(provider_error_metric_key(provider))
            if value is not None:
                raw: Any = getattr(value, "value", value)
                self._errors[provider] += int(raw or 0)

    def _add_failed_push_errors(self) -> None:
        """Errors of usage_push steps that failed, from runs that ended (failed or
        cancelled) since the last scrape: each run is read once, its step once."""
        from dagster import DagsterEventType

        for ended in (DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_CANCELED):
            while True:
                page = self.instance.fetch_run_status_changes(
                    ended,
                    limit=_PAGE,
                    cursor=self._failed_runs_cursors.get(ended.value),
                    ascending=True,
                )
                for record in page.records:
                    self._add_failed_steps(record.event_log_entry.run_id)
                if page.records:
                    self._failed_runs_cursors[ended.value] = page.cursor
                if not page.has_more:
                    break

    def _add_failed_steps(self, run_id: str) -> None:
        from dagster import DagsterEventType

        failures = self.instance.get_records_for_run(
            run_id, of_type=DagsterEventType.STEP_FAILURE
        ).records
        for record in failures:
            event = record.event_log_entry.dagster_event
            if event is None or event.step_key != USAGE_PUSH_ASSET:
                continue
            user_failure = getattr(event.event_specific_data, "user_failure_data", None)
            self._add_metadata(getattr(user_failure, "metadata", None) or {})

    # -- billing database --------------------------------------------------------

    def _billing_database(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "tally_usage_push_pending",
            "Usage push ledger rows still pending (sent, outcome unknown; re-sent next run).",
        )
        discrepancies = GaugeMetricFamily(
            "billing_reconciliation_discrepancies_total",
            "Discrepancies in billing.discrepancies, by kind.",
            labels=["kind"],
        )
        try:
            engine = self.billing_engine() if self.billing_engine else None
            if engine is not None:
                with raw_connection(engine) as connection, connection.cursor() as cursor:

                    def exists(table: str) -> bool:
                        cursor.execute(load_sql("metrics/table_exists.sql"), {"table": table})
                        row = cursor.fetchone()
                        return bool(row and row[0])

                    count = 0.0
                    if exists("billing.usage_push_ledger"):  # absent until the first migrate
                        cursor.execute(load_sql("metrics/push_pending.sql"))
                        count = float((cursor.fetchone() or (0,))[0])
                    pending.add_metric([], count)
                    if exists("billing.discrepancies"):
                        cursor.execute(load_sql("metrics/discrepancies.sql"))
                        for kind, count in cursor.fetchall():
                            discrepancies.add_metric([kind], float(count))
        except Exception as error:  # noqa: BLE001 - a scrape must still answer
            log.error(
                "billing database metrics unavailable: %s",
                str(error).splitlines()[0] if str(error) else type(error).__name__,
            )
        yield pending
        yield discrepancies


def build_registry(
    instance: DagsterInstance, billing_engine: Callable[[], Engine] | None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TallyCollector(instance, billing_engine))
    return registry


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass


def metrics_server(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """A WSGI server answering /metrics (and /) from the registry; call serve_forever()."""
    return make_server(host, port, make_wsgi_app(registry), handler_class=_QuietHandler)
