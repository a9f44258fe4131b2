"""`tally doctor`: is this deployment able to bill tonight? One line per check,
`OK  <what>` or `FAIL <what>: <what is wrong> — <the fix>`, exit 1 on any FAIL.

The decisions (what is a failure, what the line says) are pure functions on facts
and are tested directly; `run_doctor` below gathers the facts. Nothing here
changes anything: migrations are reported, never applied. Every line passes
through `scrub`, so no key or password is ever printed.

Local instance (no `storage:` in the Dagster home's dagster.yaml, i.e. the one
`tally` makes under `.tally/dagster`): no daemon is expected between `tally ui`
sessions, so the daemon line is informational there; on a deployment's instance a
daemon that is not alive is a failure (nothing fires on schedule)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.status import DeploymentFacts

EXIT_OK, EXIT_FAILED = 0, 1


@dataclass(frozen=True)
class Check:
    """One line: `problem` None is OK; `what` may carry its detail ("smtp: …")."""

    what: str
    problem: str | None = None
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None


def line(check: Check) -> str:
    if check.ok:
        return f"OK  {check.what}"
    fix = f" — {check.fix}" if check.fix else ""
    return f"FAIL {check.what}: {check.problem}{fix}"


def exit_code(checks: Iterable[Check]) -> int:
    return EXIT_OK if all(check.ok for check in checks) else EXIT_FAILED


def from_error(what: str, message: str, fix: str = "") -> Check:
    """A failure from one of tally's one-line errors, `<what is wrong>; <the fix>`."""
    problem, separator, said_fix = message.partition("; ")
    if separator and not fix:
        return Check(what, problem, said_fix)
    return Check(what, message, fix)


# --------------------------------------------------------------------------- decisions


def migrations_check(applied: Collection[str], available: Sequence[str]) -> Check:
    pending = [version for version in available if version not in applied]
    if not pending:
        return Check(f"billing database: migrated ({len(available)} migrations applied)")
    first = pending[0]
    more = f" … {pending[-1]}" if len(pending) > 1 else ""
    return Check(
        "billing database",
        f"{len(pending)} migrations pending ({first}{more})",
        "run `tally run --start-date D --end-date D` or materialize a day in `tally ui`: "
        "both apply them first",
    )


def control_tables_check(missing: Sequence[str], tables: Sequence[str]) -> Check:
    if not missing:
        return Check(f"control plane: tables present ({', '.join(tables)})")
    return Check(
        "control plane",
        f"table(s) missing: {', '.join(missing)}",
        "point DATABASE_URL at the control-plane database (locally `tally demo` or "
        "`tally seed` creates them)",
    )


def provider_key_check(provider: str, variable: str, orgs: int, key_set: bool) -> Check | None:
    """None when the key is set (then a read-only call decides)."""
    if key_set:
        return None
    return Check(
        provider,
        f"{variable} is not set and {orgs} org(s) are billed through {provider}",
        f"export {variable}=… (the key of that {provider} account)",
    )


def provider_answer_check(
    provider: str, variables: tuple[str, str], base: str | None, error: str | None
) -> Check:
    """`error`: the read-only call's failure (already scrubbed), None when accepted."""
    key_variable, base_variable = variables
    where = base or f"{provider}'s API"
    if error is None:
        return Check(f"{provider}: key accepted by a read-only call (list meters, {where})")
    if "gave up after" in error or "circuit open" in error:
        return Check(
            provider,
            f"no answer from {where} ({error})",
            f"check {base_variable} and the network (unset {base_variable} for the real API)",
        )
    return Check(
        provider,
        f"{key_variable} not accepted ({error})",
        f"set {key_variable} to a valid secret key for {where}",
    )


def unknown_provider_check(provider: str, orgs: int, known: Sequence[str]) -> Check:
    return Check(
        "providers",
        f"{orgs} org(s) have organizations.provider={provider!r}, which tally does not know",
        f"set it to {' or '.join(repr(name) for name in known)}",
    )


def schedule_check(facts: DeploymentFacts) -> Check:
    from pipelines.status import SCHEDULE

    if facts.schedule_status == "running":
        return Check(f"schedule: {SCHEDULE} RUNNING ({facts.schedule_source})")
    return Check(
        "schedule",
        f"{SCHEDULE} STOPPED ({facts.schedule_source}): no day is billed at night",
        f"turn it on in the UI (Overview → Schedules) or `dagster schedule start {SCHEDULE}`",
    )


def daemon_check(facts: DeploymentFacts, *, local: bool) -> Check:
    beat = facts.daemon_heartbeat_at
    when = beat.isoformat(timespec="seconds").replace("+00:00", "Z") if beat else None
    if facts.daemon_alive:
        return Check(f"daemon: alive (last heartbeat {when})")
    if local:
        seen = f"last heartbeat {when}" if when else "none has run here"
        return Check(f"daemon: local instance, {seen} (`tally ui` runs one while it is open)")
    problem = (
        f"last heartbeat {when}: dagster-daemon is down, nothing fires on schedule"
        if when
        else "no dagster-daemon has ever run on this instance: nothing fires on schedule"
    )
    return Check(
        "daemon", problem, "start `dagster-daemon run` on this DAGSTER_HOME (the chart runs it)"
    )


# --------------------------------------------------------------------------- gathering


def _configuration() -> list[Check]:
    from assets.pricing import PricingError, current_pricing
    from pipelines.partitions import first_partition_day
    from resources.db import DatabaseUnavailable, check_database_urls
    from resources.settings import SettingInvalid

    checks: list[Check] = []
    try:
        check_database_urls()
        checks.append(Check("config: DATABASE_URL / BILLING_DATABASE_URL"))
    except DatabaseUnavailable as error:
        checks.append(from_error("config", str(error)))
    try:
        checks.append(Check(f"config: first partition {first_partition_day()}"))
    except SettingInvalid as error:
        checks.append(from_error("config", str(error)))
    try:
        from pipelines.logs import LogFormatError, log_format

        try:
            checks.append(Check(f"config: TALLY_LOG_FORMAT {log_format().value}"))
        except LogFormatError as error:
            checks.append(from_error("config", str(error)))
    except ImportError:  # pragma: no cover - logs.py is optional in older trees
        pass
    try:
        current_pricing()
        source = os.environ.get("TALLY_PRICING_FILE") or "built-in defaults"
        checks.append(Check(f"config: pricing ({source})"))
    except PricingError as error:
        checks.append(
            Check("config", f"pricing configuration: {error}", "fix TALLY_PRICING_FILE or unset it")
        )
    return checks


def _query(engine, name: str, params: dict | None = None) -> list[tuple]:
    import sqlalchemy as sa

    from resources.db import load_sql

    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.text(load_sql(name)), params or {})]


def _databases() -> tuple[list[Check], list[tuple[str, int]] | None]:
    """The database lines, and the providers in use (None: control plane unread)."""
    from resources.control_plane import TABLES
    from resources.db import (
        MIGRATIONS_DIR,
        DatabaseUnavailable,
        billing_engine,
        control_engine,
    )

    checks: list[Check] = []
    providers: list[tuple[str, int]] | None = None
    try:
        control = control_engine()
        missing = [
            row[0] for row in _query(control, "doctor/missing_tables.sql", {"tables": list(TABLES)})
        ]
        checks.append(control_tables_check(missing, TABLES))
        if "organizations" not in missing:
            providers = [
                (row[0], int(row[1])) for row in _query(control, "doctor/providers_in_use.sql")
            ]
    except DatabaseUnavailable as error:
        checks.append(from_error("control plane database", str(error)))
    try:
        billing = billing_engine(apply_migrations=False)  # doctor never migrates
        migrated = _query(billing, "doctor/migrations_ledger_exists.sql")[0][0]
        applied = (
            {row[0] for row in _query(billing, "doctor/applied_migrations.sql")}
            if migrated
            else set()
        )
        available = [path.stem for path in sorted(MIGRATIONS_DIR.glob("*.sql"))]
        checks.append(migrations_check(applied, available))
    except DatabaseUnavailable as error:
        checks.append(from_error("billing database", str(error)))
    return checks, providers


def _providers(in_use: list[tuple[str, int]] | None) -> list[Check]:
    from pipelines.logs import scrub
    from resources.providers import Provider, ProviderError, ProvidersResource
    from resources.providers.resource import _SETTINGS

    if in_use is None:  # unknown: check the providers whose keys are set
        in_use = [
            (provider.value, 0) for provider in Provider if os.environ.get(_SETTINGS[provider][1])
        ]
        if not in_use:
            return [
                Check(
                    "providers",
                    "not checked: which providers the orgs use is in the control plane",
                    "fix the control-plane database first",
                )
            ]
    if not in_use:
        return [Check("providers: no org is billed through a provider")]
    checks: list[Check] = []
    known = [provider.value for provider in Provider]
    for name, orgs in in_use:
        if name not in known:
            checks.append(unknown_provider_check(name, orgs, known))
            continue
        provider = Provider(name)
        _, key_variable, _, base_variable = _SETTINGS[provider]
        missing = provider_key_check(name, key_variable, orgs, bool(os.environ.get(key_variable)))
        if missing is not None:
            checks.append(missing)
            continue
        error: str | None = None
        try:
            ProvidersResource().client(name).ping()
        except ProviderError as failure:
            error = scrub(str(failure).removeprefix(f"{name}: "))
        base = os.environ.get(base_variable) or None
        checks.append(provider_answer_check(name, (key_variable, base_variable), base, error))
    return checks


def _smtp() -> Check:
    import smtplib
    import ssl

    host = os.environ.get("SMTP_HOST", "")
    if not host:
        return Check("smtp: not configured (alerts are recorded, not mailed)")
    port_text = os.environ.get("SMTP_PORT") or "25"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return Check(
            "smtp", f"SMTP_PORT={port_text!r} is not a port", "set SMTP_PORT to 1-65535 (e.g. 587)"
        )
    port = int(port_text)
    username = os.environ.get("SMTP_USERNAME", "")
    try:
        with smtplib.SMTP(host, port, timeout=10) as server:
            server.ehlo()
            if server.has_extn("starttls"):
                server.starttls(context=ssl.create_default_context())
                server.ehlo()
            if username:
                server.login(username, os.environ.get("SMTP_PASSWORD", ""))
            server.noop()
    except smtplib.SMTPAuthenticationError as error:
        return Check(
            "smtp",
            f"{host}:{port} refused the login ({error.smtp_code})",
            "check SMTP_USERNAME / SMTP_PASSWORD",
        )
    except (OSError, smtplib.SMTPException) as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return Check(
            "smtp",
            f"cannot reach {host}:{port} ({reason})",
            "check SMTP_HOST / SMTP_PORT, or unset SMTP_HOST to record alerts without mailing",
        )
    login = ", login accepted" if username else ""
    return Check(f"smtp: {host}:{port} answers EHLO and NOOP{login}")


def _deployment() -> list[Check]:
    import yaml

    from pipelines.local import local_dagster_home, open_local_instance
    from pipelines.status import deployment_facts

    try:
        home = local_dagster_home()
        settings = yaml.safe_load((home / "dagster.yaml").read_text()) or {}
        with open_local_instance() as instance:
            facts = deployment_facts(instance, dt.datetime.now(dt.UTC))
    except Exception as error:  # noqa: BLE001 - a broken instance is a finding, not a crash
        return [
            Check(
                "dagster instance",
                f"cannot open it ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
                "check DAGSTER_HOME and the storage in its dagster.yaml",
            )
        ]
    local = "storage" not in settings
    return [schedule_check(facts), daemon_check(facts, local=local)]


def gather() -> list[Check]:
    from pipelines import demo_sandbox

    # After `tally demo` with no provider settings: the demo's sandbox, as `tally ui` uses.
    demo_sandbox.for_local_commands(restart=False, echo=lambda _line: None)
    checks = _configuration()
    database_checks, in_use = _databases()
    checks += database_checks
    checks += _providers(in_use)
    checks.append(_smtp())
    checks += _deployment()
    return checks


def run_doctor(echo: Callable[[str], None]) -> int:
    from pipelines.logs import scrub

    checks = gather()
    for check in checks:
        echo(scrub(line(check)))
    return exit_code(checks)
