"""Real `dagster-daemon` and `dagster-webserver` processes for tests, and the
webserver's GraphQL: each process leads its own session (start_new_session), its
output goes to a file the failure messages quote, and `stop` ends the whole tree."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
WORKSPACE = ROOT / "workspace.yaml"
REPOSITORY = "__repository__"
STOP_S = 15.0


class DagsterProcess:
    """One Dagster command running in the background, output in `log`."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with open(log, "wb") as output:
            self.popen = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} (last {lines} lines) ---\n" + "\n".join(
            self.output().splitlines()[-lines:]
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        try:
            leader = psutil.Process(self.pid)
            return [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal_group(self, sig: int) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def stop_all(processes: list[DagsterProcess]) -> None:
    """SIGTERM to each process group and every descendant (code servers and run
    workers may lead groups of their own), all at once; SIGKILL what is left after
    STOP_S."""
    tree = [member for process in processes for member in process.tree()]
    for process in processes:
        process.signal_group(signal.SIGTERM)
    for member in tree:
        with suppress(psutil.NoSuchProcess):
            member.terminate()
    _, left = psutil.wait_procs(tree, timeout=STOP_S)
    for member in left:
        with suppress(psutil.NoSuchProcess):
            member.kill()
    for process in processes:
        process.signal_group(signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            process.popen.wait(timeout=STOP_S)


@contextmanager
def dagster_processes(
    env: dict[str, str], logs: Path, *, webserver_port: int, daemon: bool = True
) -> Iterator[dict[str, DagsterProcess]]:
    """The webserver on `webserver_port` (and the daemon) on workspace.yaml."""
    started: dict[str, DagsterProcess] = {}
    try:
        started["webserver"] = DagsterProcess(
            "dagster-webserver",
            ["dagster-webserver", "-w", str(WORKSPACE), "-h", "127.0.0.1"]
            + ["-p", str(webserver_port)],
            env,
            logs / "webserver.log",
        )
        if daemon:
            started["daemon"] = DagsterProcess(
                "dagster-daemon",
                ["dagster-daemon", "run", "-w", str(WORKSPACE)],
                env,
                logs / "daemon.log",
            )
        yield started
    finally:
        stop_all(list(started.values()))


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, *, context: Callable[[], str]
) -> Any:
    """Poll `condition()` until it returns something truthy (returned) or fail after
    `timeout_s` naming `what`, with `context()` (the processes' output)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what}\n{context()}"
            )
        time.sleep(0.2)


class GraphQL:
    """The webserver's /graphql."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/graphql"

    def __call__(self, query: str, variables: dict | None = None) -> dict:
        answer = httpx.post(
            self.url, json={"query": query, "variables": variables or {}}, timeout=60
        )
        assert answer.status_code == 200, f"/graphql {answer.status_code}: {answer.text[:2000]}"
        body = answer.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def location_loaded(self) -> str | None:
        """The code location's name once the webserver has loaded it, else None."""
        try:
            data = self(LOCATIONS_QUERY)
        except (httpx.HTTPError, AssertionError):
            return None
        for entry in data["workspaceOrError"].get("locationEntries", []):
            loaded = entry["locationOrLoadError"] or {}
            if entry["loadStatus"] == "LOADED" and loaded.get("__typename") == "RepositoryLocation":
                return entry["name"]
            if loaded.get("__typename") == "PythonError":
                raise AssertionError(f"code location failed to load: {loaded['message']}")
        return None


LOCATIONS_QUERY = """
{ workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }"""
