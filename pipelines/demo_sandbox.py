"""The demo's provider sandbox: a `tally sandbox` process that outlives `tally
demo` (as its embedded PostgreSQL does), so what the demo pushed is still at the
"providers" when `tally ui` backfills a day or runs `issue_credits`.

Its pid and port are recorded in `TALLY_HOME/sandbox.json`; `tally ui` and
`tally doctor` point the provider settings at it when none are set; `tally stop`
stops it. A recorded sandbox that is gone (after `tally stop`, a reboot) is
started again by `tally ui`, empty, with the demo's customers created."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import httpx

from pipelines.processes import spawn_detached, terminate, wait_until
from resources.db import PROJECT_ROOT, tally_home

STARTUP_TIMEOUT_S = 30.0
DEMO_STRIPE_KEY = "sk_test_tally_demo"
DEMO_POLAR_TOKEN = "polar_oat_tally_demo"
# Any of these set means the operator chose providers: never override them.
PROVIDER_SETTINGS = ("STRIPE_API_KEY", "STRIPE_API_BASE", "POLAR_ACCESS_TOKEN", "POLAR_API_BASE")


def record_path():
    return tally_home() / "sandbox.json"


@dataclass(frozen=True)
class DemoSandbox:
    """A sandbox over HTTP: what the demo needs of it (`base_url`, `post`)."""

    pid: int
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, json: Any = None, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.base_url + path, json=json, timeout=10.0, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=10.0, **kwargs)

    def answers(self) -> bool:
        try:
            return self.get("/_sandbox/health").status_code == 200
        except httpx.HTTPError:
            return False

    def provider_env(self) -> dict[str, str]:
        """The four provider settings pointing at this sandbox."""
        return {
            "STRIPE_API_BASE": self.base_url,
            "STRIPE_API_KEY": DEMO_STRIPE_KEY,
            "POLAR_API_BASE": self.base_url,
            "POLAR_ACCESS_TOKEN": DEMO_POLAR_TOKEN,
        }


def recorded() -> DemoSandbox | None:
    """The sandbox the demo recorded (alive or not), None when there is no record."""
    try:
        data = json.loads(record_path().read_text())
        return DemoSandbox(pid=int(data["pid"]), port=int(data["port"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running() -> DemoSandbox | None:
    """The recorded sandbox when it still answers."""
    sandbox = recorded()
    return sandbox if sandbox is not None and sandbox.answers() else None


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start() -> DemoSandbox:
    """A new `tally sandbox` in its own session on a free port, recorded; a sandbox
    recorded before is stopped first (its state belongs to an older demo)."""
    stop()
    port = _free_port()
    log = tally_home() / "sandbox.log"
    command = [sys.executable, "-m", "pipelines.cli", "sandbox", "--port", str(port)]
    pid = spawn_detached(command, cwd=PROJECT_ROOT, log=log, env=dict(os.environ))
    sandbox = DemoSandbox(pid=pid, port=port)
    if not wait_until(sandbox.answers, STARTUP_TIMEOUT_S):
        terminate(pid)
        raise RuntimeError(f"the provider sandbox did not start; see {log}")
    record_path().write_text(json.dumps({"pid": pid, "port": port}))
    return sandbox


def stop() -> DemoSandbox | None:
    """Stop the recorded sandbox and forget it; the one stopped, None if none ran."""
    sandbox = recorded()
    record_path().unlink(missing_ok=True)
    if sandbox is None or not _is_sandbox(sandbox.pid):
        return None
    terminate(sandbox.pid)
    return sandbox


def _is_sandbox(pid: int) -> bool:
    """The pid is still a `tally sandbox` (not a pid reused after a reboot)."""
    try:
        command = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return False
    return b"sandbox" in command and b"pipelines.cli" in command


def providers_configured() -> bool:
    return any(os.environ.get(name) for name in PROVIDER_SETTINGS)


def for_local_commands(*, restart: bool, echo) -> DemoSandbox | None:
    """After `tally demo` with no provider settings: point them (in this process's
    environment, which `tally ui`'s children inherit) at the demo's sandbox. When it
    is recorded but gone and `restart`, start it again with the demo's customers
    (the provider-side usage of the demo is gone with it). None: settings untouched."""
    if providers_configured() or recorded() is None:
        return None
    sandbox = running()
    if sandbox is None:
        if not restart:
            return None
        sandbox = start()
        _create_demo_customers(sandbox)
        echo(
            f"providers: the demo's sandbox was not running; started an empty one on "
            f"{sandbox.base_url} with the demo's customers (`tally stop` stops it)"
        )
    else:
        echo(f"providers: the demo's sandbox on {sandbox.base_url} (`tally stop` stops it)")
    os.environ.update(sandbox.provider_env())
    return sandbox


def _create_demo_customers(sandbox: DemoSandbox) -> None:
    from pipelines.demo import _create_customers
    from resources.db import control_engine

    _create_customers(control_engine(), sandbox)
