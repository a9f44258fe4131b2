"""The production instance, proven (issue 11, item 3).

What is real here: `dagster-daemon run` and `dagster-webserver` are processes from
.venv/bin on workspace.yaml, with DAGSTER_HOME holding an unchanged copy of this
repo's dagster.yaml (PostgreSQL storage, the queued run coordinator with one run
per `dagster/partition`, run monitoring) and its storage on a fresh PostgreSQL
database; the providers are the sandbox over HTTP; billing runs on the test's
PostgreSQL database.

The schedule's tick at a chosen time: the webserver's code server evaluates
`daily_billing_schedule` for that time (GraphQL `scheduleDryRun`, the UI's "Test
schedule"), and its run request is submitted through GraphQL `launchRun` (what the
UI's "Launch run" of that dialog does) — only this step stands in for the daemon's
own cron tick, which cannot be moved to a chosen time. The run config adds one
thing to the schedule's: the in-process executor (steps in the run's process; the
default starts one process per step, each importing the code location), and the
run carries the schedule's name as a tag. The webserver enqueues the
run (QUEUED); the daemon's queued run coordinator dequeues it and the
DefaultRunLauncher starts it in a process of its own under the daemon's code
server. A second run of the same day waits in the queue while the first is in
progress (the sandbox slows every provider call by 1.5 s) and runs after it. The
freshness and run-failure sensors tick in the daemon on their own."""

from __future__ import annotations

import datetime as dt
import filecmp
import os
import re
import shutil
import uuid

import psutil
import pytest
import sqlalchemy as sa
import yaml
from builders import add_counter, add_heartbeats, add_instance, add_org, at, every_minute
from conftest import free_port
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.storage.tags import GRPC_INFO_TAG
from dagster_processes import REPOSITORY, ROOT, GraphQL, dagster_processes, wait_for

from pipelines.definitions import defs

pytestmark = pytest.mark.xdist_group("dagster_processes")

START_S = 120.0  # both processes loading the code location on a shared 2-core machine
RUN_S = 120.0
JOB = "daily_billing"
SCHEDULE = "daily_billing_schedule"
DEQUEUE_LINE = "Priority sorting and checking tag concurrency limits for queued runs."
FINISHED = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
# Each org: (provider, instance, tier, minutes of heartbeats from 01:00).
WORLD = {
    "org-s1": ("stripe", "i-s1", "small", 90),
    "org-s2": ("stripe", "i-s2", "gpu", 45),
    "org-p1": ("polar", "i-p1", "small", 60),
}


@pytest.fixture()
def dagster_storage_url(database_url: str):
    """A fresh PostgreSQL database for the Dagster instance (run, event and schedule
    storage), on the server the billing database lives on; dropped afterwards."""
    server = sa.engine.make_url(database_url)
    name = f"dagster_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    # psycopg2, as dagster.yaml asks: with psycopg 3 the webserver closes each connection.
    url = server.set(drivername="postgresql+psycopg2", database=name)
    yield url.render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _world(engine, day: dt.date) -> dict[str, int]:
    """Three orgs on both providers, each instance stopped after its heartbeats and
    counted by the control plane as metered: a day with nothing to reconcile."""
    seconds = {}
    for org, (provider, instance, tier, minutes) in WORLD.items():
        add_org(engine, org, provider=provider)
        end = at(day, 1, minutes)
        add_instance(
            engine, instance, org, tier, status="stopped", stopped_at=end, last_heartbeat=end
        )
        add_heartbeats(engine, every_minute(instance, at(day, 1), minutes))
        add_counter(engine, org, day, tier, minutes * 60)
        seconds[org] = minutes * 60
    return seconds


def _run_pid(instance: DagsterInstance, run_id: str) -> int | None:
    """The pid of the run's own process, from the launcher's engine event."""
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        match = re.match(r"Started process for run \(pid: (\d+)\)", entry.message or "")
        if match:
            return int(match.group(1))
    return None


def _status(instance: DagsterInstance, run_id: str) -> DagsterRunStatus:
    record = instance.get_run_record_by_id(run_id)
    assert record is not None, run_id
    return record.dagster_run.status


def test_daemon_and_webserver_run_the_schedule_queue_and_sensors(
    engine, providers_env, dagster_storage_url, tmp_path, monkeypatch
) -> None:
    evaluation = dt.datetime.combine(
        dt.datetime.now(dt.UTC).date() - dt.timedelta(days=2), dt.time(2), tzinfo=dt.UTC
    )
    day = (evaluation - dt.timedelta(days=1)).date()
    billed = _world(engine, day)

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    assert filecmp.cmp(ROOT / "dagster.yaml", home / "dagster.yaml", shallow=False)
    # The variable dagster.yaml's storage reads (storage.postgres.postgres_url.env).
    variable = yaml.safe_load((ROOT / "dagster.yaml").read_text())["storage"]["postgres"][
        "postgres_url"
    ]["env"]
    monkeypatch.setenv(variable, dagster_storage_url)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = dict(os.environ)

    port = free_port()
    graphql = GraphQL(port)
    # The test's own view of the same instance; creating the storage here first keeps
    # the two processes from racing to create its tables.
    with (
        DagsterInstance.get() as instance,
        dagster_processes(env, tmp_path, webserver_port=port) as processes,
    ):
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        assert instance.run_monitoring_enabled
        daemon = processes["daemon"]

        def context() -> str:
            return "\n".join(process.tail() for process in processes.values())

        location = wait_for(graphql.location_loaded, START_S, "the code location", context=context)
        repository = {"repositoryLocationName": location, "repositoryName": REPOSITORY}

        # -- the schedule's tick at the chosen time, evaluated by the code server
        tick = graphql(
            DRY_RUN,
            {
                "selector": {**repository, "scheduleName": SCHEDULE},
                "timestamp": evaluation.timestamp(),
            },
        )["scheduleDryRun"]
        assert tick["__typename"] == "DryRunInstigationTick", tick
        (request,) = tick["evaluationResult"]["runRequests"]
        assert request["runKey"] == f"daily_billing:{day}"
        tags = {tag["key"]: tag["value"] for tag in request["tags"]}
        assert tags["dagster/partition"] == day.isoformat()
        params = {
            "selector": {**repository, "jobName": request["jobName"] or JOB},
            # Steps in the run's own process: the default multiprocess executor starts a
            # process per step, each importing the code location (~1.5 min a run here).
            "runConfigData": {
                **(yaml.safe_load(request["runConfigYaml"]) or {}),
                "execution": {"config": {"in_process": {}}},
            },
            "executionMetadata": {
                "tags": [
                    {"key": key, "value": value}
                    for key, value in {**tags, "dagster/schedule_name": SCHEDULE}.items()
                ]
            },
        }

        def launch() -> str:
            launched = graphql(LAUNCH_RUN, {"params": params})["launchRun"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            assert launched["run"]["status"] == "QUEUED"  # the coordinator queues it
            return launched["run"]["runId"]

        # -- the first run, slowed at the providers, launched by the daemon
        providers_env.post("/_sandbox/faults", json={"latency_ms": 1500}).raise_for_status()
        first = launch()
        wait_for(
            lambda: _status(instance, first) in (DagsterRunStatus.STARTED, *FINISHED),
            START_S,
            "the daemon to dequeue and start the first run",
            context=context,
        )
        assert _status(instance, first) == DagsterRunStatus.STARTED, context()
        pid = wait_for(lambda: _run_pid(instance, first), RUN_S, "the run's pid", context=context)
        assert pid not in (os.getpid(), daemon.pid)
        ancestors = {parent.pid for parent in psutil.Process(pid).parents()}
        assert daemon.pid in ancestors  # under the daemon's code server
        assert processes["webserver"].pid not in ancestors

        # -- a second run of the same day waits in the queue
        second = launch()
        offset = len(daemon.output())
        # Two dequeue passes after it was queued: the first pass has decided about it.
        wait_for(
            lambda: (
                daemon.output()[offset:].count(DEQUEUE_LINE) >= 2
                or _status(instance, first) in FINISHED
            ),
            RUN_S,
            "two passes of the daemon's run queue",
            context=context,
        )
        assert _status(instance, first) == DagsterRunStatus.STARTED, (
            "the first run ended before the queue was seen holding the second: slow it more"
        )
        assert _status(instance, second) == DagsterRunStatus.QUEUED
        providers_env.post("/_sandbox/faults", json={"latency_ms": 0}).raise_for_status()

        wait_for(
            lambda: all(_status(instance, run) in FINISHED for run in (first, second)),
            RUN_S,
            "both runs to finish",
            context=context,
        )
        one, two = (instance.get_run_record_by_id(run) for run in (first, second))
        assert one is not None and two is not None
        for record in (one, two):
            assert record.dagster_run.status == DagsterRunStatus.SUCCESS, context()
            assert record.dagster_run.tags["dagster/partition"] == day.isoformat()
            assert GRPC_INFO_TAG in record.dagster_run.tags  # launched from a code server
            # Queued by the webserver's coordinator, then started by the daemon's dequeue.
            lifecycle = [
                entry.dagster_event_type
                for entry in instance.all_logs(
                    record.dagster_run.run_id,
                    of_type={DagsterEventType.RUN_ENQUEUED, DagsterEventType.RUN_STARTING},
                )
            ]
            assert lifecycle == [DagsterEventType.RUN_ENQUEUED, DagsterEventType.RUN_STARTING]
        assert two.start_time is not None and one.end_time is not None
        assert two.start_time >= one.end_time  # never beside the first

        # -- every asset of the day materialized with its checks, through GraphQL
        job_selector = {**repository, "pipelineName": JOB}
        nodes = graphql(ASSETS, {"pipeline": job_selector, "day": day.isoformat()})["assetNodes"]
        expected_assets = {
            key.to_user_string()
            for key in defs.resolve_job_def(JOB).asset_layer.executable_asset_keys
        }
        assert {"/".join(node["assetKey"]["path"]) for node in nodes} == expected_assets
        for node in nodes:
            name = "/".join(node["assetKey"]["path"])
            runs = [event["runId"] for event in node["assetMaterializations"]]
            assert sorted(runs) == sorted([first, second]), name
            checks = node["assetChecksOrError"]["checks"]
            for check in checks:
                assert check["description"], f"{name}.{check['name']}"
                executions = graphql(
                    CHECK_EXECUTIONS,
                    {"asset": {"path": node["assetKey"]["path"]}, "check": check["name"]},
                )["assetCheckExecutions"]
                # One result per run, under the day: no "Skipped" twin (issue 12, item 3).
                assert sorted(e["runId"] for e in executions) == sorted([first, second])
                assert {e["partition"] for e in executions} == {day.isoformat()}
                assert {e["status"] for e in executions} <= {"SUCCEEDED", "FAILED"}
                ranges = check["partitionStatuses"]["ranges"]
                assert [(r["startKey"], r["endKey"]) for r in ranges] == [(day.isoformat(),) * 2]
                assert ranges[0]["status"] in ("SUCCEEDED", "FAILED"), f"{name}.{check['name']}"

        # -- the reconciliation's metadata after the run
        (reconciliation,) = [n for n in nodes if n["assetKey"]["path"] == ["reconciliation"]]
        latest = max(reconciliation["assetMaterializations"], key=lambda e: int(e["timestamp"]))
        metadata = {entry["label"]: _value(entry) for entry in latest["metadataEntries"]}
        hours = round(sum(billed.values()) / 3600, 3)
        assert metadata["usage_date"] == day.isoformat()
        assert metadata["billed_hours"] == pytest.approx(hours)
        assert metadata["sent_hours"] == pytest.approx(hours)
        assert metadata["recorded_hours"] == pytest.approx(hours)
        assert metadata["unexplained_money_moving"] == 0

        # -- the schedule RUNNING and the sensors ticking in the daemon
        schedule = graphql(SCHEDULE_QUERY, {"selector": {**repository, "scheduleName": SCHEDULE}})
        assert schedule["scheduleOrError"]["scheduleState"]["status"] == "RUNNING"
        sensors = ("reconciliation_freshness", "run_failure_alerts")

        def ticked() -> bool:
            stored = {state.instigator_name: state for state in instance.all_instigator_state()}
            return all(
                name in stored
                and instance.get_ticks(stored[name].instigator_origin_id, stored[name].selector_id)
                for name in sensors
            )

        wait_for(ticked, START_S, "both sensors to tick in the daemon", context=context)
        listed = graphql(SENSORS_QUERY, {"repository": repository})["sensorsOrError"]["results"]
        states = {sensor["name"]: sensor["sensorState"] for sensor in listed}
        for name in sensors:
            assert states[name]["status"] == "RUNNING", name
            assert states[name]["ticks"], name


def _value(entry: dict):
    for field in ("floatValue", "intValue", "text", "boolValue"):
        if field in entry:
            return entry[field]
    return None


DRY_RUN = """
mutation ($selector: ScheduleSelector!, $timestamp: Float) {
  scheduleDryRun(selectorData: $selector, timestamp: $timestamp) {
    __typename
    ... on DryRunInstigationTick {
      evaluationResult {
        runRequests { runKey jobName runConfigYaml tags { key value } }
        skipReason
        error { message }
      }
    }
    ... on PythonError { message }
  }
}"""

LAUNCH_RUN = """
mutation ($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
  }
}"""

ASSETS = """
query ($pipeline: PipelineSelector!, $day: String!) {
  assetNodes(pipeline: $pipeline) {
    assetKey { path }
    assetMaterializations(partitions: [$day]) {
      runId
      partition
      timestamp
      metadataEntries {
        label
        ... on FloatMetadataEntry { floatValue }
        ... on IntMetadataEntry { intValue }
        ... on TextMetadataEntry { text }
        ... on BoolMetadataEntry { boolValue }
      }
    }
    assetChecksOrError {
      ... on AssetChecks {
        checks {
          name
          description
          partitionStatuses {
            ... on AssetCheckTimePartitionStatuses { ranges { startKey endKey status } }
          }
        }
      }
    }
  }
}"""

CHECK_EXECUTIONS = """
query ($asset: AssetKeyInput!, $check: String!) {
  assetCheckExecutions(assetKey: $asset, checkName: $check, limit: 10) {
    runId status partition
  }
}"""

SCHEDULE_QUERY = """
query ($selector: ScheduleSelector!) {
  scheduleOrError(scheduleSelector: $selector) {
    ... on Schedule { name scheduleState { status } }
  }
}"""

SENSORS_QUERY = """
query ($repository: RepositorySelector!) {
  sensorsOrError(repositorySelector: $repository) {
    ... on Sensors { results { name sensorState { status ticks(limit: 5) { status timestamp } } } }
  }
}"""
