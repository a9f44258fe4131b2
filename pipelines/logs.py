"""Log format: `TALLY_LOG_FORMAT=json` makes every log event one JSON object on stderr
(time, level, message and, when known, day, stage, job, run_id, counts, provider);
`text` (the default) keeps Dagster's console format. Secrets never reach a line:
the values of the secret settings and anything shaped like a Stripe or Polar key
are replaced by `[redacted]`.

Applied by the CLI (`configure_logging`, tally's own python loggers) and by the
Dagster runs (`tally_console`, the `console` logger of the code location)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from dagster import (
    DagsterEventType,
    Field,
    InitLoggerContext,
    colored_console_logger,
    logger,
)

from resources.providers.base import redact_secrets

SECRET_SETTINGS = (
    "STRIPE_API_KEY",
    "POLAR_ACCESS_TOKEN",
    "SMTP_PASSWORD",
    "SMTP_USERNAME",
    "PAGERDUTY_ROUTING_KEY",
)
PARTITION_TAG = "dagster/partition"
JSON_LEVEL = logging.INFO
# What a log call may pass in `extra=` to fill the structured fields.
EXTRA_FIELDS = ("day", "stage", "counts", "provider", "run_id")


class LogFormat(StrEnum):
    """TALLY_LOG_FORMAT."""

    TEXT = "text"
    JSON = "json"


class LogFormatError(ValueError):
    """TALLY_LOG_FORMAT has a value tally does not know; the message says the fix."""


def log_format() -> LogFormat:
    value = os.environ.get("TALLY_LOG_FORMAT", "").strip().lower() or LogFormat.TEXT
    try:
        return LogFormat(value)
    except ValueError:
        raise LogFormatError(
            f"TALLY_LOG_FORMAT={value!r} is not a log format; use "
            f"{' or '.join(LogFormat)} (or unset it)"
        ) from None


def scrub(text: str) -> str:
    """`text` without the secret settings' values or key-shaped tokens (sk_…, polar_…)."""
    # Very short values would redact ordinary words; real keys are long.
    secrets = [os.environ.get(name, "") for name in SECRET_SETTINGS]
    return redact_secrets(text, *(secret for secret in secrets if len(secret) >= 4))


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {str(key): _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(item) for item in value]
    if isinstance(value, bool | int | float) or value is None:
        return value
    return scrub(str(value))


def _materialized_counts(event: Any) -> dict[str, int]:
    """The integer metadata of an asset materialization (rows, sends, refusals …)."""
    data = getattr(event, "event_specific_data", None)
    materialization = getattr(data, "materialization", None)
    metadata = getattr(materialization, "metadata", None) or {}
    counts = {}
    for key, entry in metadata.items():
        value = getattr(entry, "value", entry)
        if isinstance(value, int) and not isinstance(value, bool):
            counts[key] = value
    return counts


def log_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The JSON object of one log record: Dagster's run facts when it came from a run,
    the `extra=` fields a log call passed, all scrubbed."""
    fields: dict[str, Any] = {
        "time": dt.datetime.fromtimestamp(record.created, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": record.levelname,
        "message": record.getMessage(),
        "logger": record.name,
    }
    meta = getattr(record, "dagster_meta", None)
    if isinstance(meta, Mapping):
        fields["message"] = meta.get("orig_message") or fields["message"]
        tags = meta.get("job_tags") or {}
        event = meta.get("dagster_event")
        found = {
            "job": meta.get("job_name"),
            "run_id": meta.get("run_id"),
            "stage": meta.get("step_key"),
            "day": tags.get(PARTITION_TAG),
            "event": getattr(event, "event_type_value", None),
            "counts": _materialized_counts(event) or None,
        }
        fields.update({key: value for key, value in found.items() if value})
    for name in EXTRA_FIELDS:
        value = getattr(record, name, None)
        if value not in (None, "", {}):
            fields[name] = value
    if record.exc_info and record.exc_info[0] is not None:
        # The exception's one line, not its traceback (which can quote secrets).
        fields["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}".splitlines()[0]
    return _scrubbed(fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(log_fields(record), default=str, ensure_ascii=False)


def json_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    return handler


# tally's own loggers log at INFO; libraries (the Stripe SDK logs every request at
# INFO) only from WARNING on.
OWN_LOGGERS = ("assets", "pipelines", "resources", "tally", "dagster", "__main__")


def _ours_or_a_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN_LOGGERS


def configure_logging() -> LogFormat:
    """Apply TALLY_LOG_FORMAT to python logging (the CLI's entry calls this first).
    text: nothing changes. json: one JSON handler on stderr for every logger.
    Raises LogFormatError for an unknown format."""
    chosen = log_format()
    if chosen == LogFormat.JSON:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        handler = json_handler()
        handler.addFilter(_ours_or_a_warning)
        root.addHandler(handler)
        root.setLevel(JSON_LEVEL)
        logging.captureWarnings(True)
    return chosen


@logger(
    Field(
        {
            "log_level": Field(str, is_required=False, default_value="INFO"),
            "name": Field(str, is_required=False, default_value="dagster"),
        }
    ),
    description=(
        "Dagster's colored console logger, or with TALLY_LOG_FORMAT=json one JSON "
        "object per event on stderr: INFO and above plus each materialization, step "
        "and run success, whatever the configured log_level (a log collector wants the "
        "events the CLI's one-line-per-day console hides)."
    ),
)
def tally_console(init_context: InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    if log_format() != LogFormat.JSON:
        return colored_console_logger.logger_fn(init_context)
    json_logger = logging.Logger(config["name"], level=logging.DEBUG)
    handler = json_handler()
    handler.addFilter(_worth_a_line)
    json_logger.addHandler(handler)
    return json_logger


# Dagster logs these at DEBUG; in JSON they are the events with the facts (counts of
# each materialization, each step's and run's end).
_KEPT_EVENTS = frozenset(
    {
        DagsterEventType.ASSET_MATERIALIZATION.value,
        DagsterEventType.STEP_SUCCESS.value,
        DagsterEventType.RUN_SUCCESS.value,
    }
)


def _worth_a_line(record: logging.LogRecord) -> bool:
    if record.levelno >= JSON_LEVEL:
        return True
    meta = getattr(record, "dagster_meta", None)
    event = meta.get("dagster_event") if isinstance(meta, Mapping) else None
    return getattr(event, "event_type_value", None) in _KEPT_EVENTS
