"""Processing orgs in chunks (bounded memory) gives exactly the unchunked result."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from assets.metering import MeteringRules, compute_billed_usage, compute_in_org_chunks
from pipelines.seed import SeedSpec, generate

END = dt.date(2026, 11, 20)


@pytest.fixture(scope="module")
def world():
    frames = generate(SeedSpec(orgs=9, instances=27, days=2, end_date=END, seed=11))
    throttle = frames["throttle_settings"].assign(
        continuous_limit_s=lambda f: f["continuous_limit_minutes"] * 60,
        daily_limit_s=lambda f: f["daily_limit_minutes"] * 60,
        idle_timeout_s=lambda f: f["idle_timeout_minutes"] * 60,
    )
    return frames["heartbeats"], frames["instances"], throttle


@pytest.mark.parametrize("chunk_rows", [500, 5_000, 20_000])
def test_chunked_equals_unchunked(world, chunk_rows):
    heartbeats, instances, throttle = world
    run_time = dt.datetime(2026, 11, 21, 2, tzinfo=dt.UTC)
    whole = compute_billed_usage(heartbeats, instances, throttle, END, run_time, MeteringRules())
    chunked = compute_in_org_chunks(
        heartbeats,
        instances,
        throttle,
        END,
        run_time,
        MeteringRules(),
        max_rows_per_chunk=chunk_rows,
    )
    assert len(heartbeats) > 2 * chunk_rows or chunk_rows == 20_000
    pd.testing.assert_frame_equal(whole.billed, chunked.billed)
    assert whole.billed["over_daily_seconds"].sum() > 0  # the cap path is exercised
    assert whole.duplicates_collapsed == chunked.duplicates_collapsed
    key = ["reason", "sent_at"]
    left = whole.quarantine.astype({"instance_id": object}).sort_values(key).reset_index(drop=True)
    right = (
        chunked.quarantine.astype({"instance_id": object}).sort_values(key).reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(left[key], right[key])
    assert len(whole.quarantine) > 0
