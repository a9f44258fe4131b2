"""Run `daily_billing` day by day in the local Dagster instance, and read a failed
run's own error messages: what `tally run` and `tally demo` share."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager


def _run_config(report_only: bool) -> dict:
    return {
        "resources": {"run_mode": {"config": {"report_only": report_only}}},
        # Progress is one line per day here; the full event log is in the UI.
        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
    }


def _execute(job, partition_key: str, instance, report_only: bool):
    """One CLI run of `job` for a partition, recorded in `instance`."""
    return job.execute_in_process(
        partition_key=partition_key,
        instance=instance,
        run_config=_run_config(report_only),
        raise_on_error=False,
        tags={"tally/source": "cli"},
    )


def _echo_failures(result, echo: Callable[[str], None]) -> None:
    for step, message in failure_messages(result):
        echo(f"    {step}: {message}")


def run_days(
    days: Sequence[dt.date],
    *,
    report_only: bool,
    echo: Callable[[str], None],
    shard: int | None = None,
) -> int:
    """Materialize `daily_billing` for each day in order, recorded in the Dagster
    instance (visible in the UI). With org shards (`TALLY_SHARDS`), each day's
    shards (or only `shard`) and then the combine. Returns the number of failed days."""
    from assets.shards import shard_count

    count = shard_count()
    if count > 1:
        return _run_sharded_days(days, count, report_only=report_only, echo=echo, only=shard)
    from pipelines.day_lock import day_run_lock
    from pipelines.definitions import defs
    from pipelines.local import open_local_instance
    from pipelines.summary import day_summary_line

    job = defs.resolve_job_def("daily_billing")
    failures = 0
    with open_local_instance() as instance, runs_of_the_workspace(instance):
        for position, day in enumerate(days, start=1):
            started = time.monotonic()
            with day_run_lock(day) as held:
                if not held:
                    failures += 1
                    echo(
                        f"[{position}/{len(days)}] {day}  BUSY   another tally run of this day "
                        "is in progress; nothing done for it here: run it again when that "
                        "one ends"
                    )
                    continue
                result = _execute(job, day.isoformat(), instance, report_only)
            elapsed = time.monotonic() - started
            status = "ok" if result.success else "FAILED"
            echo(
                f"[{position}/{len(days)}] {day}  {status:<6} {elapsed:6.1f}s  "
                f"{day_summary_line(day)}  run {result.run_id}"
            )
            if not result.success:
                failures += 1
                _echo_failures(result, echo)
        if not report_only:
            failures += _resettle_earlier_days(instance, job, days, echo)
        if failures < len(days):
            refresh_review(instance, echo)
    return failures


def _run_sharded_days(
    days: Sequence[dt.date],
    count: int,
    *,
    report_only: bool,
    echo: Callable[[str], None],
    only: int | None,
) -> int:
    """Each day: its shards' `meter_shard` runs (all, or `only`), then — once every
    shard's latest run succeeded, here or earlier — the combining `daily_billing`.
    A failed shard is reported with the command that re-runs it alone."""
    from assets.shards import Shard
    from pipelines.day_lock import day_run_lock
    from pipelines.definitions import definitions_for
    from pipelines.local import open_local_instance
    from pipelines.partitions import shard_partition_key
    from pipelines.shard_runs import shard_runs, shards_ready
    from pipelines.summary import day_summary_line

    defs = definitions_for(count)
    meter = defs.resolve_job_def("meter_shard")
    combine = defs.resolve_job_def("daily_billing")
    shards = [Shard(index, count) for index in range(count) if only in (None, index)]
    failures = 0
    with open_local_instance() as instance, runs_of_the_workspace(instance):
        for position, day in enumerate(days, start=1):
            head = f"[{position}/{len(days)}] {day}"
            failed = False
            for shard in shards:
                started = time.monotonic()
                with day_run_lock(day, shard.label) as held:
                    if not held:
                        failed = True
                        echo(f"{head}  shard {shard.label}  BUSY   another tally run holds it")
                        continue
                    result = _execute(meter, shard_partition_key(day, shard), instance, report_only)
                status = "ok" if result.success else "FAILED"
                echo(
                    f"{head}  shard {shard.label}  {status:<6} "
                    f"{time.monotonic() - started:6.1f}s  run {result.run_id}"
                )
                if not result.success:
                    failed = True
                    _echo_failures(result, echo)
                    echo(
                        f"    re-run this shard alone: tally run --start-date {day} "
                        f"--end-date {day} --shard {shard.index}"
                    )
            state = shards_ready(day, count, shard_runs(instance, [day]))
            if not state.ready:
                failures += failed
                echo(f"{head}  not combined yet: {'; '.join(state.waiting_for)}")
                continue
            started = time.monotonic()
            with day_run_lock(day) as held:
                if not held:
                    # With --shard, another shard's process got there first.
                    failures += only is None or failed
                    echo(f"{head}  BUSY   another tally run is combining this day")
                    continue
                result = _execute(combine, day.isoformat(), instance, report_only)
            status = "ok" if result.success else "FAILED"
            echo(
                f"{head}  {status:<6} {time.monotonic() - started:6.1f}s  combined {count} "
                f"shards  {day_summary_line(day)}  run {result.run_id}"
            )
            if not result.success:
                failed = True
                _echo_failures(result, echo)
            failures += failed
        if not report_only and only is None:
            from pipelines.settling import resettle_sharded, settling_days
            from resources.db import billing_engine

            today = dt.datetime.now(dt.UTC).date()
            earlier = settling_days(billing_engine(), today, skip=set(days))
            if earlier:
                failures += resettle_sharded(instance, meter, combine, earlier, count, echo)
        if failures < len(days):
            refresh_review(instance, echo)
    return failures


def _resettle_earlier_days(instance, job, days: Sequence[dt.date], echo) -> int:
    """Earlier days still settling are re-read and re-reconciled after the run's own
    days (pipelines/settling.py); their failures count with the run's."""
    from pipelines.settling import resettle, settling_days
    from resources.db import billing_engine

    today = dt.datetime.now(dt.UTC).date()
    earlier = settling_days(billing_engine(), today, skip=set(days))
    return resettle(instance, job, earlier, echo) if earlier else 0


@contextmanager
def runs_of_the_workspace(instance) -> Iterator[None]:
    """Runs created here carry the origin `tally ui` gives their job (workspace.yaml's
    code location): `execute_in_process` alone records none, and the UI's timeline
    skips a run without one. Scoped to this instance object, for these runs only."""
    from dagster._core.definitions.repository_definition import SINGLETON_REPOSITORY_NAME
    from dagster._core.remote_origin import RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.workspace.load import location_origins_from_yaml_paths

    from resources.db import PROJECT_ROOT

    (location,) = location_origins_from_yaml_paths([str(PROJECT_ROOT / "workspace.yaml")])
    repository = RemoteRepositoryOrigin(location, SINGLETON_REPOSITORY_NAME)
    create = instance.create_run_for_job

    def create_with_origin(*args, **kwargs):
        job_def = kwargs.get("job_def", args[0] if args else None)
        kwargs.setdefault("remote_job_origin", RemoteJobOrigin(repository, job_def.name))
        return create(*args, **kwargs)

    instance.create_run_for_job = create_with_origin
    try:
        yield
    finally:
        del instance.create_run_for_job


def refresh_review(instance, echo: Callable[[str], None]) -> None:
    """Materialize the finance review after the days, as the daemon's sensor does
    after each run (pipelines/review_refresh.py): no daemon runs here."""
    from pipelines.definitions import defs

    result = defs.resolve_job_def("refresh_finance_review").execute_in_process(
        instance=instance,
        run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        raise_on_error=False,
        tags={"tally/source": "cli"},
    )
    if result.success:
        echo(f"finance review refreshed  run {result.run_id}  (`tally review` prints it)")
    else:
        for step, message in failure_messages(result):
            echo(f"    finance review {step}: {message}")


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


def _framework_message(error) -> str | None:
    """A failure Dagster raised itself (a blocking check failed): its own text on
    one line, without the `dagster._core.errors.SomeError: ` prefix."""
    text = (getattr(error, "message", None) or "").strip()
    if not text:
        return None
    head, separator, rest = text.partition(": ")
    if separator and head.startswith("dagster.") and " " not in head:
        text = rest
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _metadata_text(metadata: dict) -> str:
    return ", ".join(
        f"{key}: {getattr(value, 'value', value)}"
        for key, value in metadata.items()
        if getattr(value, "value", value) not in ("", None)
    )


def _failed_checks(result) -> dict[str, str]:
    """Per step, what its failed blocking checks found (check name and metadata)."""
    found: dict[str, list[str]] = {}
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.passed or not evaluation.blocking:
            continue
        step = evaluation.asset_key.to_user_string()
        details = _metadata_text(evaluation.metadata)
        found.setdefault(step, []).append(
            f"{evaluation.check_name} ({details})" if details else evaluation.check_name
        )
    return {step: "; ".join(checks) for step, checks in found.items()}


def _own_message(data) -> str | None:
    """The step's own error: a Failure's description or the user's exception."""
    user_failure = getattr(data, "user_failure_data", None)
    message = getattr(user_failure, "description", None) or _user_message(
        getattr(data, "error", None)
    )
    return message.splitlines()[0] if message else None


def failure_messages(result) -> list[tuple[str, str]]:
    """One line per failed step: its own error (not Dagster's retry wrapper), or,
    when Dagster failed it (a blocking check), Dagster's reason on one line with
    what the failed checks found."""
    failed_checks = _failed_checks(result)
    messages: dict[str, str] = {}
    for event in result.all_events:
        data = event.event_specific_data
        if not event.step_key or data is None:
            continue
        message = _own_message(data)
        if message:
            messages[event.step_key] = message
        elif event.is_step_failure and event.step_key not in messages:
            framework = _framework_message(getattr(data, "error", None))
            checks = failed_checks.get(event.step_key)
            if framework:
                messages[event.step_key] = f"{framework} — {checks}" if checks else framework
    return list(messages.items())
