"""Run `daily_billing` day by day in the local Dagster instance, and read a failed
run's own error messages: what `tally run` and `tally demo` share."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence


def run_days(days: Sequence[dt.date], *, report_only: bool, echo: Callable[[str], None]) -> int:
    """Materialize `daily_billing` for each day in order, recorded in the Dagster
    instance (visible in the UI). Returns the number of failed days."""
    from pipelines.definitions import defs
    from pipelines.local import open_local_instance
    from pipelines.summary import day_summary_line

    job = defs.resolve_job_def("daily_billing")
    failures = 0
    with open_local_instance() as instance:
        for position, day in enumerate(days, start=1):
            started = time.monotonic()
            result = job.execute_in_process(
                partition_key=day.isoformat(),
                instance=instance,
                run_config={
                    "resources": {"run_mode": {"config": {"report_only": report_only}}},
                    # Progress is one line per day here; the full event log is in the UI.
                    "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
                },
                raise_on_error=False,
                tags={"tally/source": "cli"},
            )
            elapsed = time.monotonic() - started
            status = "ok" if result.success else "FAILED"
            echo(
                f"[{position}/{len(days)}] {day}  {status:<6} {elapsed:6.1f}s  "
                f"{day_summary_line(day)}  run {result.run_id[:8]}"
            )
            if not result.success:
                failures += 1
                for step, message in failure_messages(result):
                    echo(f"    {step}: {message}")
    return failures


def _user_message(error) -> str | None:
    """Walk Dagster's error chain to the user's own exception message."""
    while error is not None:
        text = (error.message or "").strip()
        if (
            text
            and not text.startswith(("dagster.", "Exceeded max_retries"))
            and ("RetryRequestedFromPolicy" not in text)
        ):
            return text.splitlines()[0]
        error = error.cause or error.context
    return None


def failure_messages(result) -> list[tuple[str, str]]:
    """The first line of each failed step's own error (not Dagster's retry wrapper)."""
    messages: dict[str, str] = {}
    for event in result.all_events:
        data = event.event_specific_data
        if not event.step_key or data is None:
            continue
        user_failure = getattr(data, "user_failure_data", None)
        message = getattr(user_failure, "description", None) or _user_message(
            getattr(data, "error", None)
        )
        if message:
            messages[event.step_key] = message.splitlines()[0]
    return list(messages.items())
