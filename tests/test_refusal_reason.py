"""The push's refusal reason reaches the discrepancy (issue 9, item 9): finance sees
why a day's usage was never sent, not just that it was not."""

from __future__ import annotations

import datetime as dt

from builders import add_org, discrepancy_rows
from test_reconcile import PIPELINE, run, used

DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def test_an_org_without_a_customer_id_says_why_it_was_not_pushed(engine, providers_env):
    add_org(engine, "org-nocust", customer="")
    add_org(engine, "o" * 90, customer="cus_LONGORG1")  # a long id still pushes (digest)
    used(engine, "org-nocust", "i-n", "small", 1, 60, day=DAY)
    used(engine, "o" * 90, "i-l", "small", 1, 30, day=DAY)
    run(PIPELINE, day=DAY)
    [row] = discrepancy_rows(engine, DAY)
    assert (row["kind"], row["org_id"], row["delta_seconds"]) == ("unpushed", "org-nocust", -3600)
    assert "push refused: no provider_customer_id; set it on the organization" in row["detail"]
    assert row["money_moving"]
