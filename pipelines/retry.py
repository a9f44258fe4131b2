"""The step retry policy every stage uses: a leaf module that assets import.

Exponential backoff with jitter; TALLY_STEP_RETRY_DELAY_S (default 30 s) shortens
the first delay for tests and impatient backfills. Configuration errors never
retry: they raise `Failure(allow_retries=False)` (see assets/config.py)."""

from __future__ import annotations

import os

from dagster import Backoff, Jitter, RetryPolicy

STEP_RETRY = RetryPolicy(
    max_retries=3,
    delay=float(os.environ.get("TALLY_STEP_RETRY_DELAY_S", "30")),
    backoff=Backoff.EXPONENTIAL,
    jitter=Jitter.PLUS_MINUS,
)
