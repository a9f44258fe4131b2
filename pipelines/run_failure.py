"""Run-failure alerts (DESIGN §9): what to announce, given the finished runs and what
on-call was already told. No Dagster, no I/O; the sensor in
`pipelines/run_failure_sensor.py` reads the facts, claims each alert in
billing.run_failure_alerts and sends it.

The rules (`plan_alerts`, tested as a decision table):
- each failed run of a monitored job is announced once;
- a successful run announces one recovery when the last announcement for its job and
  day was a failure that ended before it;
- a run that ended before the last announcement for its job and day is old news
  and announces nothing (a sensor catching up after downtime never re-opens a
  recovered day).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

MONITORED_JOBS = ("daily_billing", "meter_shard", "issue_credits")
ERROR_LINE_LIMIT = 300
NO_PARTITION = ""  # billing.run_failure_alerts.partition_key of unpartitioned jobs


class RunOutcome(StrEnum):
    FAILURE = "failure"
    SUCCESS = "success"


class AlertKind(StrEnum):
    """billing.run_failure_alerts.kind."""

    FAILURE = "failure"
    RECOVERY = "recovery"


class AlertStatus(StrEnum):
    """billing.run_failure_alerts.status: how far the alert got."""

    PENDING = "pending"  # claimed, being sent (a crash here never re-sends: once wins)
    SENT = "sent"  # every configured channel took it
    LOGGED = "logged"  # no channel configured: recorded and logged only
    FAILED = "failed"  # a channel failed; retried on the next ticks (up to MAX_ATTEMPTS)


MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class FinishedRun:
    run_id: str
    job_name: str
    partition_key: str  # NO_PARTITION when the job is not partitioned
    outcome: RunOutcome
    ended_at: dt.datetime
    step: str | None = None  # the failed step (failures)
    error: str | None = None  # its one-line error (failures)

    @property
    def key(self) -> tuple[str, str]:
        return (self.job_name, self.partition_key)


@dataclass(frozen=True)
class Announced:
    """The last announcement for one (job, day): a failure or a recovery."""

    kind: AlertKind
    run_id: str
    ended_at: dt.datetime


@dataclass(frozen=True)
class AlertAction:
    kind: AlertKind
    run: FinishedRun
    resolves: str | None = None  # recovery: the failed run it announces the end of

    @property
    def dedup_key(self) -> str:
        return dedup_key(self.run.job_name, self.run.partition_key)


def dedup_key(job_name: str, partition_key: str) -> str:
    """One incident per job and day: repeated failures of a night merge into it, the
    recovery resolves it (PagerDuty's dedup_key)."""
    return f"tally/{job_name}/{partition_key or 'unpartitioned'}"


def plan_alerts(
    runs: Iterable[FinishedRun], announced: Mapping[tuple[str, str], Announced]
) -> list[AlertAction]:
    """The alerts owed for `runs`, in the order the runs ended, given the last
    announcement per (job, day) in `announced`."""
    latest = dict(announced)
    actions: list[AlertAction] = []
    for run in sorted(runs, key=lambda run: (run.ended_at, run.run_id)):
        if run.job_name not in MONITORED_JOBS:
            continue
        last = latest.get(run.key)
        if last is not None and run.ended_at <= last.ended_at:
            continue  # announced already, or older than what on-call knows
        if run.outcome == RunOutcome.FAILURE:
            action = AlertAction(AlertKind.FAILURE, run)
        elif last is not None and last.kind == AlertKind.FAILURE:
            action = AlertAction(AlertKind.RECOVERY, run, resolves=last.run_id)
        else:
            continue  # a success nobody was alarmed about
        actions.append(action)
        latest[run.key] = Announced(action.kind, run.run_id, run.ended_at)
    return actions


def channels_to_try(configured: Iterable[str], delivered: Iterable[str]) -> list[str]:
    """A retry goes only to the channels that have not taken the alert yet."""
    done = set(delivered)
    return [channel for channel in configured if channel not in done]


def delivery_status(delivered: Iterable[str], failed: bool) -> AlertStatus:
    """`delivered`: every channel that has taken the alert so far."""
    if failed:
        return AlertStatus.FAILED
    return AlertStatus.SENT if list(delivered) else AlertStatus.LOGGED


def one_line(text: str | None, limit: int = ERROR_LINE_LIMIT) -> str:
    """The first non-empty line of an error, at most `limit` characters."""
    for line in (text or "").splitlines():
        line = " ".join(line.split())
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return "no error message"


# --------------------------------------------------------------------------- messages


def _day(run: FinishedRun) -> str:
    return run.partition_key or "no partition"


def alert_text(action: AlertAction) -> tuple[str, str]:
    """(subject, body) of the e-mail; the webhook carries the same facts."""
    run = action.run
    day = _day(run)
    if action.kind == AlertKind.FAILURE:
        step = run.step or "the run"
        subject = f"[tally] FAILED: {run.job_name} for {day} at {step}"
        lines = [
            f"A {run.job_name} run failed.",
            "",
            f"Job:    {run.job_name}",
            f"Day:    {day}",
            f"Step:   {step}",
            f"Error:  {run.error or 'no error message'}",
            f"Run:    {run.run_id}",
            "",
            "Next steps: open the run in `tally ui` (Runs, search the run id) for the",
            "step's log; fix the cause, then re-execute the run in the UI or, for a",
            "daily_billing day, `tally run --start-date DAY --end-date DAY`. One recovery",
            "message follows when a later run of this job and day succeeds. See docs/alerts.md.",
        ]
    else:
        subject = f"[tally] RECOVERED: {run.job_name} for {day}"
        lines = [
            f"A later {run.job_name} run for {day} succeeded: the failure is over.",
            "",
            f"Job:         {run.job_name}",
            f"Day:         {day}",
            f"Run:         {run.run_id}",
            f"Failed run:  {action.resolves}",
        ]
    ended = run.ended_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    lines += ["", f"Run ended at {ended} UTC."]
    return subject, "\n".join(lines) + "\n"


def webhook_payload(action: AlertAction) -> dict[str, Any]:
    """tally's webhook JSON (resources/notify.py translates it for PagerDuty)."""
    subject, _ = alert_text(action)
    run = action.run
    payload: dict[str, Any] = {
        "alert": "TallyRunFailed",
        "status": "firing" if action.kind == AlertKind.FAILURE else "resolved",
        "summary": subject,
        "dedup_key": action.dedup_key,
        "severity": "error",
        "source": f"tally/{run.job_name}",
        "job": run.job_name,
        "day": run.partition_key or None,
        "run_id": run.run_id,
        "ended_at": run.ended_at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
    }
    if action.kind == AlertKind.FAILURE:
        payload.update(step=run.step, error=run.error)
    else:
        payload["resolves_run_id"] = action.resolves
    return payload


def with_failure(run: FinishedRun, step: str | None, error: str | None) -> FinishedRun:
    return replace(run, step=step, error=one_line(error) if error else None)
