"""Clean processes (issue 11, item 6): `tally ui` and `tally sandbox` stop with their
whole process tree on SIGTERM / SIGINT, even started the way a shell backgrounds
a job (SIGINT ignored); `tally stop` stops the embedded PostgreSQL and the demo's
sandbox, and says "not running" the second time; a run the CLI prints is in the
UI, on its timeline's code location."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import free_port

from pipelines.processes import wait_until

ROOT = Path(__file__).resolve().parents[1]
UI_START_S = 240.0
STOP_S = 60.0


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`tally ARGS` as a shell's background job starts it: SIGINT ignored."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def unix_socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        return probe.connect_ex(str(path)) == 0


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def alive(processes: list[psutil.Process]) -> list[str]:
    survivors = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                survivors.append(" ".join(process.cmdline())[:120])
        except psutil.NoSuchProcess:
            pass
    return survivors


def stop_and_check(process: subprocess.Popen, sig: int, port: int, tree: list[psutil.Process]):
    process.send_signal(sig)
    try:
        code = process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        for member in tree:  # leave nothing behind for the next test
            member.kill()
        pytest.fail(f"did not stop within {STOP_S:.0f} s of signal {sig}")
    output = process.stdout.read() if process.stdout else ""
    assert code == 128 + sig, output
    assert alive(tree) == [], output
    assert not port_open(port)
    assert "Traceback" not in output, output
    return output


def run_id_printed(stdout: str) -> str:
    match = re.search(r"\] \d{4}-\d\d-\d\d  ok .*  run ([0-9a-f-]{36})$", stdout, re.MULTILINE)
    assert match, stdout
    return match.group(1)


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    answer = httpx.post(
        f"http://127.0.0.1:{port}/graphql",
        json={"query": query, "variables": variables or {}},
        timeout=30,
    )
    answer.raise_for_status()
    return answer.json()["data"]


RUN_QUERY = """
query ($id: ID!) {
  runOrError(runId: $id) {
    __typename
    ... on Run { runId jobName repositoryOrigin { repositoryLocationName repositoryName } }
  }
}"""
RUNS_QUERY = "{ runsOrError { ... on Runs { results { runId } } } }"
LOCATIONS_QUERY = "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_stops_with_its_whole_tree_and_shows_cli_runs(engine, dagster_home, sig):
    day = "2026-11-20"
    cli = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "--start-date", day, "--end-date", day]
        + ["--report-only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    run_id = run_id_printed(cli.stdout)

    port = free_port()
    ui = start("ui", "--port", str(port))
    try:
        assert wait_until(
            lambda: answers(f"http://127.0.0.1:{port}/server_info") or ui.poll() is not None,
            UI_START_S,
            interval_s=0.5,
        )
        assert ui.poll() is None, ui.stdout.read() if ui.stdout else ""
        tree = process_tree(ui.pid)
        assert len(tree) >= 3  # tally, dagster dev, the webserver (and daemon, code server)

        # The full id the CLI printed opens in the UI, on the workspace's code location.
        run = graphql(port, RUN_QUERY, {"id": run_id})["runOrError"]
        assert run["__typename"] == "Run" and run["jobName"] == "daily_billing"
        listed = graphql(port, RUNS_QUERY)["runsOrError"]["results"]
        assert run_id in {entry["runId"] for entry in listed}
        locations = graphql(port, LOCATIONS_QUERY)["workspaceOrError"]["locationEntries"]
        assert run["repositoryOrigin"] == {
            "repositoryLocationName": locations[0]["name"],
            "repositoryName": "__repository__",
        }
    except BaseException:
        ui.kill()
        raise
    stop_and_check(ui, sig, port, tree)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sandbox_stops_on_a_signal(sig):
    port = free_port()
    sandbox = start("sandbox", "--port", str(port))
    try:
        assert wait_until(
            lambda: (
                answers(f"http://127.0.0.1:{port}/_sandbox/health") or sandbox.poll() is not None
            ),
            60,
        )
        assert sandbox.poll() is None
        tree = process_tree(sandbox.pid)
    except BaseException:
        sandbox.kill()
        raise
    stop_and_check(sandbox, sig, port, tree)


def test_stop_stops_the_embedded_postgres_and_the_demo_sandbox(tmp_path):
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_HOME")},
        "TALLY_HOME": str(home),
    }
    # Both started the way tally starts them: the embedded server on first use,
    # the sandbox as `tally demo` leaves it.
    started = subprocess.run(
        [
            sys.executable,
            "-c",
            "from resources.db import embedded_database_url; embedded_database_url(); "
            "from pipelines import demo_sandbox; print(demo_sandbox.start().port)",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert started.returncode == 0, started.stderr
    sandbox_port = int(started.stdout.strip().splitlines()[-1])
    lines = (home / "pg" / "postmaster.pid").read_text().splitlines()
    postmaster, pg_port = int(lines[0]), int(lines[3])
    socket_file = Path(lines[4]) / f".s.PGSQL.{pg_port}"
    assert psutil.pid_exists(postmaster) and socket_file.exists()
    assert answers(f"http://127.0.0.1:{sandbox_port}/_sandbox/health")

    def tally_stop() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "stop"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = tally_stop()
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"embedded PostgreSQL: stopped (pid {postmaster}" in first.stdout
    assert "sandbox: stopped (pid" in first.stdout and f"port {sandbox_port})" in first.stdout
    assert not psutil.pid_exists(postmaster)
    # The embedded server listens on its unix socket only (no TCP port): closed.
    assert not socket_file.exists() and not unix_socket_answers(socket_file)
    assert not port_open(sandbox_port)

    second = tally_stop()
    assert second.returncode == 0, second.stderr
    assert "embedded PostgreSQL: not running" in second.stdout
    assert "sandbox: not running" in second.stdout
