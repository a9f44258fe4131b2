"""`tally_provider_errors_total` counts the failed requests of failed runs too: a
provider outage makes usage_push fail, and its errors reach the metric (issue 9,
item 9). Real sandbox outage, real Dagster runs, the metrics served over HTTP."""

from __future__ import annotations

import datetime as dt
import threading

import httpx
from builders import add_heartbeats, add_instance, add_org, at, every_minute
from conftest import free_port
from dagster import DagsterEventType, DagsterInstance
from prometheus_client.parser import text_string_to_metric_families

from pipelines.metrics import build_registry, metrics_server

DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
OTHER_DAY = DAY - dt.timedelta(days=1)
STRIPE = ("tally_provider_errors_total", (("provider", "stripe"),))
POLAR = ("tally_provider_errors_total", (("provider", "polar"),))


def faults(sandbox, **settings) -> None:
    sandbox.post("/_sandbox/faults", json=settings).raise_for_status()


def run_day(instance: DagsterInstance, day: dt.date = DAY):
    from pipelines.definitions import defs

    return defs.resolve_job_def("daily_billing").execute_in_process(
        partition_key=day.isoformat(), instance=instance, raise_on_error=False
    )


def failed_push_errors(instance: DagsterInstance, run_id: str) -> dict[str, int]:
    """The `<provider>_errors` of the run's failed usage_push step, as Dagster kept it."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE)
    for record in records.records:
        event = record.event_log_entry.dagster_event
        if event is not None and event.step_key == "usage_push":
            metadata = event.event_specific_data.user_failure_data.metadata
            # a provider with nothing to push that day reports no errors key
            return {
                p: int(metadata[f"{p}_errors"].value) if f"{p}_errors" in metadata else 0
                for p in ("stripe", "polar")
            }
    raise AssertionError(f"run {run_id} has no failed usage_push step")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert answer.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_provider_errors_of_a_failed_push_are_counted_once(engine, providers_env, dagster_home):
    add_org(engine, "org-s", provider="stripe", customer="cus_OUTAGE1")
    add_instance(engine, "i-s", "org-s", "small")
    add_heartbeats(engine, every_minute("i-s", at(DAY, 1), 60))
    add_heartbeats(engine, every_minute("i-s", at(OTHER_DAY, 1), 30))
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        server = metrics_server(build_registry(instance, lambda: engine), "127.0.0.1", free_port())
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.server_port
            before = scrape(port)
            assert before[STRIPE] == 0.0 and before[POLAR] == 0.0

            faults(providers_env, error_rate=1.0)  # Stripe and Polar answer 5xx
            outage = run_day(instance)
            assert not outage.success
            counted = failed_push_errors(instance, outage.run_id)
            assert counted["stripe"] > 0
            served = providers_env.get("/_sandbox/stats").json()
            during = scrape(port)
            assert during[STRIPE] == counted["stripe"]
            assert during[POLAR] == counted["polar"]
            # never more than the requests the sandbox actually failed
            assert during[STRIPE] <= served["providers"]["stripe"]["server_errors"]

            # Scraped again: nothing counted twice.
            assert scrape(port)[STRIPE] == during[STRIPE]

            # Recovery: the successful push adds its own (zero) errors only.
            faults(providers_env, error_rate=0)
            assert run_day(instance).success
            after = scrape(port)
            assert after[STRIPE] == during[STRIPE]

            # A second outage (another day, with usage to send) adds its errors on top.
            faults(providers_env, error_rate=1.0)
            again = run_day(instance, OTHER_DAY)
            assert not again.success
            more = failed_push_errors(instance, again.run_id)["stripe"]
            assert scrape(port)[STRIPE] == during[STRIPE] + more
        finally:
            faults(providers_env, error_rate=0)
            server.shutdown()
            server.server_close()
