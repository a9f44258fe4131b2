"""What `tally status` adds beside freshness (which comes from the billing database):
the last failed `daily_billing` run and whether the daily schedule will fire — both
facts of the Dagster deployment, read from the local instance."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from pipelines.schedules import daily_billing_schedule

JOB = daily_billing_schedule.job_name
SCHEDULE = daily_billing_schedule.name
DAEMON_STALE_AFTER = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class FailedRun:
    run_id: str
    day: str | None
    ended_at: dt.datetime | None
    step: str | None
    message: str | None


@dataclass(frozen=True)
class DeploymentFacts:
    last_failure: FailedRun | None
    schedule_status: str  # "running" / "stopped", stored or the code's default
    schedule_source: str  # "set in this instance" / "code default"
    daemon_heartbeat_at: dt.datetime | None
    checked_at: dt.datetime

    @property
    def daemon_alive(self) -> bool:
        beat = self.daemon_heartbeat_at
        return beat is not None and self.checked_at - beat <= DAEMON_STALE_AFTER

    def failure_line(self) -> str:
        failure = self.last_failure
        if failure is None:
            return f"none recorded for {JOB}"
        when = failure.ended_at.isoformat().replace("+00:00", "Z") if failure.ended_at else "?"
        where = f", step {failure.step}: {failure.message}" if failure.step else ""
        return f"run {failure.run_id} (day {failure.day or '?'}) at {when}{where}"

    def schedule_line(self) -> str:
        if self.daemon_heartbeat_at is None:
            daemon = "no dagster-daemon has run on this instance: nothing fires on schedule"
        elif self.daemon_alive:
            daemon = "dagster-daemon alive"
        else:
            when = self.daemon_heartbeat_at.isoformat().replace("+00:00", "Z")
            daemon = f"dagster-daemon DOWN since {when}: nothing fires on schedule"
        return f"{SCHEDULE} {self.schedule_status.upper()} ({self.schedule_source}); {daemon}"

    def as_json(self) -> dict[str, Any]:
        failure = self.last_failure
        return {
            "last_failed_run": None
            if failure is None
            else {
                "run_id": failure.run_id,
                "day": failure.day,
                "ended_at": failure.ended_at.isoformat() if failure.ended_at else None,
                "step": failure.step,
                "message": failure.message,
            },
            "schedule": {
                "name": SCHEDULE,
                "status": self.schedule_status,
                "source": self.schedule_source,
                "daemon_heartbeat_at": self.daemon_heartbeat_at.isoformat()
                if self.daemon_heartbeat_at
                else None,
                "daemon_alive": self.daemon_alive,
            },
        }


def _last_failure(instance) -> FailedRun | None:
    from dagster import DagsterEventType, DagsterRunStatus, RunsFilter

    records = instance.get_run_records(
        RunsFilter(job_name=JOB, statuses=[DagsterRunStatus.FAILURE]), limit=1
    )
    if not records:
        return None
    record = records[0]
    run = record.dagster_run
    ended = dt.datetime.fromtimestamp(record.end_time, dt.UTC) if record.end_time else None
    step = message = None
    failures = instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.STEP_FAILURE
    ).records
    for failure in failures[:1]:
        event = failure.event_log_entry.dagster_event
        if event is None:
            continue
        step = event.step_key
        data = event.event_specific_data
        user = getattr(data, "user_failure_data", None)
        text = getattr(user, "description", None) or getattr(
            getattr(data, "error", None), "message", None
        )
        message = text.strip().splitlines()[0] if text and text.strip() else None
    return FailedRun(run.run_id, run.tags.get("dagster/partition"), ended, step, message)


def _schedule_status(instance) -> tuple[str, str]:
    from dagster._core.scheduler.instigation import InstigatorStatus, InstigatorType

    toggled = (InstigatorStatus.RUNNING, InstigatorStatus.STOPPED)
    if instance.schedule_storage is not None:
        for state in instance.all_instigator_state(instigator_type=InstigatorType.SCHEDULE):
            if state.name == SCHEDULE and state.status in toggled:
                return state.status.value.lower(), "set in this instance"
    return daily_billing_schedule.default_status.value.lower(), "code default"


def _daemon_heartbeat(instance) -> dt.datetime | None:
    beats = instance.get_daemon_heartbeats() or {}
    stamps = [beat.timestamp for beat in beats.values() if beat is not None]
    return dt.datetime.fromtimestamp(max(stamps), dt.UTC) if stamps else None


def deployment_facts(instance, now: dt.datetime | None = None) -> DeploymentFacts:
    status, source = _schedule_status(instance)
    return DeploymentFacts(
        last_failure=_last_failure(instance),
        schedule_status=status,
        schedule_source=source,
        daemon_heartbeat_at=_daemon_heartbeat(instance),
        checked_at=now or dt.datetime.now(dt.UTC),
    )
