"""User mistakes on the `tally` command line end in one clear line on stderr and exit
code 2: never "unexpected …", never a traceback (issue 9, item 9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TALLY = Path(sys.executable).with_name("tally")


def tally(*args: str, env: dict[str, str] | None = None, timeout: int = 120):
    command = [str(TALLY)] if TALLY.exists() else [sys.executable, "-m", "pipelines.cli"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def one_clear_line(result, *words: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr, line
    for word in words:
        assert word in line, line
    return line


def test_seed_end_date_far_in_the_future(database_url):
    line = one_clear_line(tally("seed", "--end-date", "9999-12-31"), "--end-date", "9999-12-31")
    assert "future" in line


def test_seed_days_before_the_calendar(database_url):
    one_clear_line(tally("seed", "--days", "99999999", "--end-date", "2026-11-20"), "--days")


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_metrics_port_out_of_range(dagster_home, port):
    one_clear_line(tally("metrics", "--port", port), "--port", "1-65535")


@pytest.mark.parametrize("port", ["99999", "65536"])
def test_sandbox_port_out_of_range_is_refused_not_served_elsewhere(port):
    try:
        result = tally("sandbox", "--port", port, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`tally sandbox --port {port}` started serving instead of refusing")
    line = one_clear_line(result, "--port", "1-65535")
    assert "provider sandbox on" not in result.stdout, line


def test_sandbox_serve_refuses_a_port_out_of_range():
    code = "from resources.sandbox.server import serve; serve('127.0.0.1', 99999)"
    try:  # a subprocess: if serve() listened, it would block forever
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        pytest.fail("serve() listened on a port outside 1-65535")
    assert result.returncode != 0
    assert "ValueError: sandbox port must be 1-65535, got 99999" in result.stderr


def _stop_embedded_server(pgdata: Path) -> None:
    pid_file = pgdata / "postmaster.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().splitlines()[0])
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--days", "0"], "--days"),
        (["--orgs", "0"], "--orgs"),
        (["--instances", "-3"], "--instances"),
        (["--orgs", "9", "--instances", "3"], "--instances"),
        (["--days", "100000"], "--days"),
    ],
)
def test_demo_bad_flags_refused_before_starting_postgres(tmp_path, args, flag):
    home = tmp_path / "home"
    env = {"TALLY_HOME": str(home), "DATABASE_URL": "", "BILLING_DATABASE_URL": ""}
    try:
        result = tally("demo", *args, env=env)
    finally:
        _stop_embedded_server(home / "pg")
    one_clear_line(result, flag)
    assert not (home / "pg" / "postmaster.pid").exists(), "embedded PostgreSQL left running"
    assert "starting the embedded PostgreSQL" not in result.stdout


RUN = ["run", "--start-date", "2026-11-20", "--end-date", "2026-11-20"]


@pytest.mark.parametrize("variable", ["DATABASE_URL", "BILLING_DATABASE_URL"])
@pytest.mark.parametrize("command", [RUN, ["status"], ["org", "org-a"], ["metrics", "--once"]])
def test_malformed_database_url_port(dagster_home, database_url, variable, command):
    env = {variable: "postgresql://postgres:s3cret@127.0.0.1:notaport/x"}
    line = one_clear_line(tally(*command, env=env), variable, "notaport", "port")
    assert "s3cret" not in line


@pytest.mark.parametrize("variable", ["DATABASE_URL", "BILLING_DATABASE_URL"])
@pytest.mark.parametrize("command", [RUN, ["status"], ["seed"], ["metrics", "--once"]])
def test_database_url_of_another_database(dagster_home, database_url, variable, command):
    env = {variable: "mysql://root:s3cret@127.0.0.1/x"}
    line = one_clear_line(tally(*command, env=env), variable, "mysql", "PostgreSQL")
    assert "s3cret" not in line


def test_unparseable_database_url(dagster_home):
    line = one_clear_line(tally(*RUN, env={"DATABASE_URL": "not a url"}), "DATABASE_URL")
    assert "postgresql://" in line


def test_database_url_port_out_of_range(dagster_home):
    env = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:99999/x"}
    one_clear_line(tally(*RUN, env=env), "DATABASE_URL", "99999")


def test_url_validation_accepts_what_postgres_accepts():
    from resources import db

    for url in (
        "postgres://u:p@h:5432/d",
        "postgresql://u@h/d",
        "postgresql+psycopg2://u@[::1]:5433/d",
        "postgresql:///d?host=/tmp",
    ):
        db.check_url(db.normalize_url(url), "DATABASE_URL")


def test_ui_refuses_a_bad_billing_url_before_starting(dagster_home):
    command = [str(TALLY)] if TALLY.exists() else [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "BILLING_DATABASE_URL": "mysql://root@127.0.0.1/x"}
    process = subprocess.Popen(
        [*command, "ui", "--port", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # on failure, the Dagster UI it started goes too
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("`tally ui` started despite a mysql:// BILLING_DATABASE_URL")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    one_clear_line(result, "BILLING_DATABASE_URL", "mysql")


@pytest.mark.parametrize("value", ["2025-13-01", "yesterday"])
@pytest.mark.parametrize(
    "command", [("run", "--start-date", "2025-11-01", "--end-date", "2025-11-01"), ("org", "org-x")]
)
def test_malformed_first_day_setting(dagster_home, database_url, value, command):
    line = one_clear_line(tally(*command, env={"TALLY_FIRST_DAY": value}), "TALLY_FIRST_DAY")
    assert "YYYY-MM-DD" in line and value in line
