"""Org shards (issue 13 item 4): a day split into N shards of whole orgs that meter,
push and read back as their own runs; the day's combine reads the customers shared
by several shards and reconciles. N = 4 gives the same billed usage, ledger,
provider totals and discrepancies as N = 1, and a failed shard re-runs alone.

Real PostgreSQL, the sandbox over HTTP with the real SDKs, real Dagster runs
through `tally run`'s own runner (pipelines/runner.py)."""

from __future__ import annotations

import datetime as dt

import builders
import pytest
import sqlalchemy as sa
from builders import add_heartbeats, add_instance, add_org, at, every_minute, query_rows
from conftest import POLAR_TOKEN
from dagster import DagsterRunStatus
from test_push import sandbox_usage

from assets.provider_usage import ProviderDay, ReadScope
from assets.shards import Shard, shard_count, shard_of, sibling_labels
from pipelines.shard_runs import ShardRun, shards_ready
from resources.settings import SettingInvalid

DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
SHARDS = 4


# -- the shard of an org, directly ------------------------------------------------------


def test_an_orgs_shard_is_a_stable_hash_of_its_id() -> None:
    # The first four bytes of SHA-256, big-endian, mod N: the same on every machine
    # and run (these values are the contract a re-sharded deployment relies on).
    assert [shard_of(f"org-{n}", 4) for n in range(8)] == [
        int.from_bytes(__import__("hashlib").sha256(f"org-{n}".encode()).digest()[:4], "big") % 4
        for n in range(8)
    ]
    assert shard_of("org-1", 1) == 0
    orgs = [f"org-{n:05d}" for n in range(4000)]
    sizes = [sum(shard_of(org, 4) == k for org in orgs) for k in range(4)]
    assert all(900 < size < 1100 for size in sizes), sizes  # about even
    # Each org belongs to exactly one shard of a layout.
    for org in orgs[:200]:
        assert sum(Shard(k, 4).owns(org) for k in range(4)) == 1
    assert Shard(0, 4).owns(None) and not Shard(1, 4).owns(None)  # unknown instances


def test_labels_and_the_setting() -> None:
    assert Shard().label == "all" and Shard(2, 4).label == "2/4"
    assert sibling_labels(3) == ["0/3", "1/3", "2/3"] and sibling_labels(1) == ["all"]
    assert shard_count({}) == 1 and shard_count({"TALLY_SHARDS": "8"}) == 8
    for bad in ("0", "-1", "65", "four", "1.5"):
        with pytest.raises(SettingInvalid, match="TALLY_SHARDS=.* whole number from 1 to 64"):
            shard_count({"TALLY_SHARDS": bad})
    with pytest.raises(ValueError):
        Shard(4, 4)


def _orgs_in(shard: int, count: int, how_many: int, prefix: str) -> list[str]:
    found = [f"{prefix}-{n}" for n in range(400) if shard_of(f"{prefix}-{n}", count) == shard]
    return found[:how_many]


def test_read_back_scopes_split_customers_by_where_their_orgs_are() -> None:
    a, b = _orgs_in(0, 4, 1, "a")[0], _orgs_in(1, 4, 1, "b")[0]
    day = ProviderDay(
        current={"cus_a": [a], "cus_shared": [a]},
        sent={("cus_shared", "gpu"): {b: 60}, ("cus_a", "small"): {a: 60}},
    )
    # cus_shared has a current org in shard 0 and a sent org in shard 1: shared.
    assert ReadScope(Shard(0, 4)).restrict(day).customers == ["cus_a"]
    assert ReadScope(Shard(1, 4)).restrict(day).customers == []
    assert ReadScope(Shard(0, 4), shared=True).restrict(day).customers == ["cus_shared"]
    assert ReadScope().restrict(day).customers == ["cus_a", "cus_shared"]
    assert ReadScope(Shard(0, 4), shared=True).params()["parts"] == [
        *sibling_labels(4),
        "shared",
    ]


def _run(run_id: str, shard: str, status: DagsterRunStatus, created: float) -> ShardRun:
    return ShardRun(run_id, DAY, shard, status, created)


@pytest.mark.parametrize(
    ("runs", "ready", "waiting"),
    [
        ([], False, ["shard 0: never run", "shard 1: never run"]),
        ([_run("a", "0", DagsterRunStatus.SUCCESS, 1)], False, ["shard 1: never run"]),
        (
            [
                _run("a", "0", DagsterRunStatus.SUCCESS, 1),
                _run("b", "1", DagsterRunStatus.FAILURE, 2),
            ],
            False,
            ["shard 1: failure"],
        ),
        (  # the failed shard re-ran alone and succeeded: its latest run counts
            [
                _run("a", "0", DagsterRunStatus.SUCCESS, 1),
                _run("b", "1", DagsterRunStatus.FAILURE, 2),
                _run("c", "1", DagsterRunStatus.SUCCESS, 3),
            ],
            True,
            [],
        ),
        (  # a re-run in progress holds the combine back
            [
                _run("a", "0", DagsterRunStatus.SUCCESS, 1),
                _run("c", "1", DagsterRunStatus.SUCCESS, 3),
                _run("d", "0", DagsterRunStatus.STARTED, 4),
            ],
            False,
            ["shard 0: started"],
        ),
    ],
)
def test_a_day_is_combined_when_every_shards_latest_run_succeeded(runs, ready, waiting) -> None:
    state = shards_ready(DAY, 2, runs)
    assert (state.ready, state.waiting_for) == (ready, waiting)


def test_each_new_set_of_shard_runs_asks_for_its_own_combine() -> None:
    first = shards_ready(
        DAY,
        2,
        [
            _run("aaaaaaaa1", "0", DagsterRunStatus.SUCCESS, 1),
            _run("bbbbbbbb1", "1", DagsterRunStatus.SUCCESS, 2),
        ],
    )
    again = shards_ready(
        DAY,
        2,
        [
            _run("aaaaaaaa1", "0", DagsterRunStatus.SUCCESS, 1),
            _run("bbbbbbbb1", "1", DagsterRunStatus.SUCCESS, 2),
            _run("cccccccc1", "1", DagsterRunStatus.SUCCESS, 3),
        ],
    )
    assert first.run_key != again.run_key and first.run_key.startswith(f"combine:{DAY}:")


# -- N = 4 against N = 1, end to end ------------------------------------------------------


def world(engine) -> dict[str, list[str]]:
    """Stripe orgs in every shard, a Stripe customer shared by orgs of two shards,
    the Polar orgs all in one shard, capped and idle usage, an unknown instance."""
    stripe = [org for k in range(SHARDS) for org in _orgs_in(k, SHARDS, 2, "org")]
    polar_shard = shard_of(stripe[0], SHARDS)
    polar = _orgs_in(polar_shard, SHARDS, 2, "polar")
    shared = [_orgs_in(0, SHARDS, 1, "share")[0], _orgs_in(3, SHARDS, 1, "share")[0]]
    for position, org in enumerate(stripe):
        throttle = (60, 120, 30) if position % 3 == 0 else None
        add_org(engine, org, throttle=throttle)
    for org in polar:
        add_org(engine, org, provider="polar", customer=f"ext_{org}")
    for org in shared:
        add_org(engine, org, customer="cus_shared_by_two")
    tiers = ["small", "medium", "large", "gpu"]
    for position, org in enumerate(stripe + polar + shared):
        for n in range(2):
            instance = f"i-{org}-{n}"
            add_instance(engine, instance, org, tiers[(position + n) % 4])
            start = at(DAY, 1 + position % 5 + n, 7 * n)
            add_heartbeats(engine, every_minute(instance, start, 90 + 40 * n))
            # an idle stretch then more activity: idle pause and continuous caps apply
            add_heartbeats(
                engine, every_minute(instance, start + dt.timedelta(minutes=200), 45, active=False)
            )
            add_heartbeats(engine, every_minute(instance, start + dt.timedelta(minutes=250), 30))
    # Ran across midnight into the day (the look-back window).
    add_heartbeats(engine, every_minute(f"i-{stripe[1]}-0", at(DAY, -1, 50), 40))
    add_heartbeats(engine, every_minute("i-nobody-has", at(DAY, 4), 20))  # quarantined
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE heartbeats SET active = NULL WHERE ctid IN "
                "(SELECT ctid FROM heartbeats ORDER BY sent_at LIMIT 3)"
            )
        )
    return {"stripe": stripe, "polar": polar, "shared": shared, "polar_shard": [str(polar_shard)]}


def outcome(engine, sandbox) -> dict[str, object]:
    """Everything the shards must agree on with the unsharded day."""
    day = {"d": DAY}
    return {
        "billed_usage": query_rows(
            engine,
            "SELECT org_id, tier, runtime_seconds, idle_paused_seconds, over_continuous_seconds, "
            "over_daily_seconds, billable_seconds FROM billing.billed_usage "
            "WHERE usage_date = :d ORDER BY 1, 2",
            day,
        ),
        "instances": query_rows(
            engine,
            "SELECT org_id, instance_id, tier, runtime_seconds, billable_seconds "
            "FROM billing.billed_usage_instances WHERE usage_date = :d ORDER BY 1, 2, 3",
            day,
        ),
        "quarantine": query_rows(
            engine,
            "SELECT instance_id, reason, count(*) FROM billing.quarantine "
            "WHERE usage_date = :d GROUP BY 1, 2 ORDER BY 1, 2",
            day,
        ),
        "ledger": query_rows(
            engine,
            "SELECT org_id, tier, seq, provider, customer_id, quantity, identifier, status "
            "FROM billing.usage_push_ledger WHERE usage_date = :d ORDER BY 1, 2, 3",
            day,
        ),
        "provider_usage": query_rows(
            engine,
            "SELECT org_id, tier, provider, customer_id, seconds FROM billing.provider_usage "
            "WHERE usage_date = :d ORDER BY 1, 2, 3, 4",
            day,
        ),
        "discrepancies": query_rows(
            engine,
            "SELECT kind, org_id, tier, provider, delta_seconds FROM billing.discrepancies "
            "WHERE usage_date = :d ORDER BY 1, 2, 3, 4",
            day,
        ),
        "quota": query_rows(
            engine,
            "SELECT org_id, plan, billable_seconds, included_used_seconds, overage_seconds, "
            "expected_charges FROM billing.quota_usage WHERE usage_date = :d ORDER BY 1",
            day,
        ),
        "at_the_providers": sandbox_usage(sandbox),
    }


def empty_billing(engine, sandbox) -> None:
    """Back to before the first run: billing tables empty, the sandbox reset with
    the orgs' customers."""
    with engine.begin() as connection:
        tables = connection.execute(
            sa.text(
                "SELECT 'billing.' || quote_ident(table_name) FROM information_schema.tables "
                "WHERE table_schema = 'billing' AND table_name <> 'schema_migrations'"
            )
        ).scalars()
        connection.execute(sa.text(f"TRUNCATE {', '.join(tables)} CASCADE"))
    sandbox.reset()
    builders.use_sandbox(sandbox)


def run_days_here(**options) -> tuple[int, list[str]]:
    from pipelines.runner import run_days

    lines: list[str] = []
    failures = run_days([DAY], report_only=False, echo=lines.append, **options)
    return failures, lines


def combine_sensor_says():
    """What the daemon's `shards_combined` sensor asks for, on this instance's runs."""
    from dagster import build_sensor_context

    from pipelines.local import open_local_instance
    from pipelines.shard_runs import shards_combined_sensor

    with open_local_instance() as instance:
        return shards_combined_sensor(SHARDS)(build_sensor_context(instance=instance))


def meter_shard_runs(shard: str) -> list[str]:
    from pipelines.local import open_local_instance
    from pipelines.shard_runs import shard_runs

    with open_local_instance() as instance:
        return [run.run_id for run in shard_runs(instance, [DAY]) if run.shard == shard]


def test_four_shards_bill_push_and_read_back_exactly_what_one_day_does(
    engine, providers_env, dagster_home, monkeypatch
):
    orgs = world(engine)
    failures, lines = run_days_here()
    assert failures == 0, lines
    unsharded = outcome(engine, providers_env)
    # The world exercises what it should: caps, idle, quarantine, both providers, the
    # shared customer, a clean reconciliation.
    assert any(row[4] > 0 for row in unsharded["billed_usage"])  # over continuous
    assert any(row[3] > 0 for row in unsharded["billed_usage"])  # idle paused
    assert ("i-nobody-has", "unknown_instance", 20) in unsharded["quarantine"]
    assert ("stripe", "cus_shared_by_two") in {k[:2] for k in unsharded["at_the_providers"]}
    assert {k[0] for k in unsharded["at_the_providers"]} == {"stripe", "polar"}
    assert len({row[0] for row in unsharded["ledger"]}) == len(
        orgs["stripe"] + orgs["polar"] + orgs["shared"]
    )

    empty_billing(engine, providers_env)
    monkeypatch.setenv("TALLY_SHARDS", str(SHARDS))
    failures, lines = run_days_here()
    assert failures == 0, lines
    assert sum(" shard " in line and " ok " in line for line in lines) == SHARDS, lines
    assert any(f"combined {SHARDS} shards" in line for line in lines), lines
    assert outcome(engine, providers_env) == unsharded
    parts = query_rows(
        engine,
        "SELECT DISTINCT part FROM billing.billed_usage WHERE usage_date = :d ORDER BY 1",
        {"d": DAY},
    )
    assert [part for (part,) in parts] == sibling_labels(SHARDS)
    shared_rows = query_rows(
        engine,
        "SELECT DISTINCT customer_id FROM billing.provider_usage "
        "WHERE usage_date = :d AND part = 'shared'",
        {"d": DAY},
    )
    assert shared_rows == [("cus_shared_by_two",)]
    (request,) = combine_sensor_says()  # under the daemon, the sensor combines the day
    assert request.partition_key == DAY.isoformat() and request.run_key.startswith("combine:")

    # Late heartbeats are counted per shard: the shard that owns the instance sees them.
    from assets.late_heartbeats import find_late_days
    from resources.db import billing_engine, control_engine

    late_org = orgs["stripe"][5]
    owner = Shard(shard_of(late_org, SHARDS), SHARDS)
    add_heartbeats(engine, every_minute(f"i-{late_org}-0", at(DAY, 20), 3))
    now = dt.datetime.now(dt.UTC)
    found = find_late_days(control_engine(), billing_engine(), DAY, DAY, now)
    assert [(day.usage_date, day.late_heartbeats) for day in found] == [(DAY, 3)]
    mine = find_late_days(control_engine(), billing_engine(), DAY, DAY, now, part=owner.label)
    assert [day.late_heartbeats for day in mine] == [3]
    other = Shard((owner.index + 1) % SHARDS, SHARDS).label
    assert find_late_days(control_engine(), billing_engine(), DAY, DAY, now, part=other) == []


def test_a_failed_shard_re_runs_alone_and_the_day_then_combines(
    engine, providers_env, dagster_home, monkeypatch
):
    orgs = world(engine)
    assert run_days_here()[0] == 0
    unsharded = outcome(engine, providers_env)

    empty_billing(engine, providers_env)
    monkeypatch.setenv("TALLY_SHARDS", str(SHARDS))
    monkeypatch.delenv("POLAR_ACCESS_TOKEN")  # the Polar orgs' shard cannot push
    (polar_shard,) = orgs["polar_shard"]
    failures, lines = run_days_here()
    assert failures == 1
    assert any(f"shard {polar_shard}/{SHARDS}  FAILED" in line for line in lines), lines
    assert any(f"--shard {polar_shard}" in line for line in lines), lines
    assert any(
        "not combined yet" in line and f"shard {polar_shard}: failure" in line for line in lines
    ), lines
    assert not query_rows(engine, "SELECT 1 FROM billing.reconciliations")  # not combined
    skipped = combine_sensor_says()
    assert f"shard {polar_shard}: failure" in skipped.skip_message
    others = {k: meter_shard_runs(str(k)) for k in range(SHARDS) if str(k) != polar_shard}
    ledger_before = query_rows(
        engine,
        "SELECT identifier, status, sent_at FROM billing.usage_push_ledger ORDER BY 1",
    )
    assert ledger_before and all(status == "sent" for _, status, _ in ledger_before)
    assert not [row for row in ledger_before if row[0].split(":")[1] in orgs["polar"]]

    monkeypatch.setenv("POLAR_ACCESS_TOKEN", POLAR_TOKEN)
    failures, lines = run_days_here(shard=int(polar_shard))
    assert failures == 0, lines
    assert [line for line in lines if " shard " in line and " ok " in line] != []
    assert sum(" shard " in line and "run " in line for line in lines) == 1  # that one alone
    assert {k: meter_shard_runs(str(k)) for k in others} == others  # none re-ran
    assert len(meter_shard_runs(polar_shard)) == 2
    assert any(f"combined {SHARDS} shards" in line for line in lines), lines
    # The other shards' ledger rows are untouched; the day equals the unsharded one.
    after = {
        row[0]: row
        for row in query_rows(
            engine, "SELECT identifier, status, sent_at FROM billing.usage_push_ledger"
        )
    }
    assert all(
        after[identifier] == row
        for identifier, *_ in ledger_before
        for row in [next(r for r in ledger_before if r[0] == identifier)]
    )
    assert outcome(engine, providers_env) == unsharded


# -- the daemon's side: schedule, combine sensor, late re-runs ---------------------------


def test_the_sharded_schedule_asks_for_one_run_per_shard_and_re_reads_settling_days(engine):
    from dagster import build_schedule_context

    from pipelines.definitions import build_definitions
    from resources.db import PostgresResource

    settling = DAY - dt.timedelta(days=3)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO billing.discrepancies (usage_date, kind, org_id, delta_seconds, "
                "money_moving, detail) VALUES (:d, 'provider_settling', 'org-x', -60, false, 'x')"
            ),
            {"d": settling},
        )
    defs = build_definitions(SHARDS)
    repository = defs.get_repository_def()
    tick = dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(2), tzinfo=dt.UTC)
    context = build_schedule_context(
        scheduled_execution_time=tick,
        repository_def=repository,
        resources={"postgres": PostgresResource()},
    )
    schedule = repository.get_schedule_def("daily_billing_schedule")
    assert schedule.job_name == "meter_shard"
    requests = list(schedule.evaluate_tick(context).run_requests)
    keys = [str(request.partition_key) for request in requests]
    # Distinct partition keys: the queued run coordinator's one-run-per-partition
    # limit lets a day's shards run side by side.
    assert keys == [f"{DAY}|{k}" for k in range(SHARDS)] + [
        f"{settling}|{k}" for k in range(SHARDS)
    ]
    assert len({request.run_key for request in requests}) == len(requests)
    for request in requests[SHARDS:]:
        assert [key.to_user_string() for key in request.asset_selection] == ["provider_usage"]


def test_late_heartbeats_of_a_sharded_day_re_run_every_shard() -> None:
    from assets.late_heartbeats import LateDay
    from pipelines.late import late_run_requests

    late = LateDay(DAY, 7, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), False)
    requests = late_run_requests(late, SHARDS)
    assert [str(r.partition_key) for r in requests] == [f"{DAY}|{k}" for k in range(SHARDS)]
    assert {r.job_name for r in requests} == {"meter_shard"}
    (single,) = late_run_requests(late, 1)
    assert single.partition_key == DAY.isoformat() and single.job_name is None


@pytest.mark.parametrize(
    ("shards", "argv", "message"),
    [
        ("", ["--shard", "1"], "days are not split into shards; set TALLY_SHARDS"),
        ("4", ["--shard", "4"], "TALLY_SHARDS=4 has shards 0 to 3"),
        ("4", ["--shard", "-1"], "TALLY_SHARDS=4 has shards 0 to 3"),
    ],
)
def test_shard_option_misuse_is_one_line_and_exit_2(shards, argv, message, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.setenv("TALLY_SHARDS", shards)
    day = DAY.isoformat()
    code = main(["run", "--start-date", day, "--end-date", day, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
