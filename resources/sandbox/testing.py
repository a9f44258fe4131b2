"""Run the sandbox in-process for tests and benchmarks.

with running_sandbox() as sandbox:
    client = stripe.StripeClient("sk_test_x", base_addresses=sandbox.stripe_base_addresses)
    polar = Polar("token", base_url=sandbox.base_url)
    sandbox.post("/_sandbox/reset")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from .app import create_app
from .state import SandboxState

STARTUP_TIMEOUT = 10.0


@dataclass
class RunningSandbox:
    base_url: str
    app: Starlette
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def state(self) -> SandboxState:
        return self.app.state.sandbox

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def stripe_base_addresses(self) -> dict[str, str]:
        """Every Stripe base address pointed here (else the v2 stream escapes)."""
        return {name: self.base_url for name in ("api", "meter_events", "files", "connect")}

    def url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url(path), timeout=10.0, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url(path), json=json, timeout=10.0, **kwargs)

    def reset(self) -> None:
        self.post("/_sandbox/reset").raise_for_status()


def _wait_until_serving(
    server: uvicorn.Server, thread: threading.Thread, port: int, deadline: float
) -> None:
    ready = threading.Event()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the sandbox server thread exited during startup")
        if time.monotonic() > deadline:
            raise TimeoutError("the sandbox server did not start in time")
        ready.wait(0.005)
    while True:  # started: make sure it really accepts connections
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            ready.wait(0.005)


@contextlib.contextmanager
def running_sandbox(
    clock: Callable[[], float] | None = None, *, log_level: str = "warning"
) -> Iterator[RunningSandbox]:
    """Start the sandbox on 127.0.0.1 with a free port in a background thread.

    Yields once the server accepts connections; shuts it down on exit.
    """
    app = create_app(clock)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"sandbox-{port}", daemon=True
    )
    thread.start()
    try:
        _wait_until_serving(server, thread, port, time.monotonic() + STARTUP_TIMEOUT)
        yield RunningSandbox(f"http://127.0.0.1:{port}", app, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)
        sock.close()
