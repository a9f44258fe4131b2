"""`make screenshot`: the demo's Dagster UI in headless Chromium, as finance sees it.

Starts `tally ui` on the demo's local instance, drives Debian's `chromium` over the
Chrome DevTools protocol (a websocket; no browser download) and writes a PNG of the
finance review asset and of the reconciliation asset to docs/img/. Run `tally demo`
first (the Makefile target does). A developer's tool, not part of the code location
(the image does not ship it)."""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

from resources.db import PROJECT_ROOT

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
UI_START_S = 240.0
PAGE_S = 90.0
WIDTH, HEIGHT = 2000, 1200
# The UI scrolls inside its own panes, not the document: a tall window shows it all.
TALL = 2100
# Dagster's first-visit "Join the Dagster community" dialog covers the page.
DISMISS = """[...document.querySelectorAll('[role=dialog] button, .bp5-dialog button')]
  .filter(b => b.innerText.trim() === 'Skip').forEach(b => b.click())"""

LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename } } } } }"""
LATEST_PARTITION = """query ($key: AssetKeyInput!) {
  assetNodes(assetKeys: [$key]) { assetMaterializations(limit: 1) { partition } } }"""


class ScreenshotError(RuntimeError):
    """Something the user can fix; the message says what."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def find_browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise ScreenshotError(
        "no Chromium found (looked for chromium, chromium-browser, google-chrome); "
        "install Debian's: apt-get install chromium"
    )


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise ScreenshotError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.25)
    return value


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    answer = httpx.post(
        f"http://127.0.0.1:{port}/graphql",
        json={"query": query, "variables": variables or {}},
        timeout=30,
    )
    answer.raise_for_status()
    return answer.json()["data"]


def location_loaded(port: int) -> bool:
    try:
        entries = graphql(port, LOCATIONS)["workspaceOrError"]["locationEntries"]
    except (httpx.HTTPError, KeyError, TypeError):
        return False
    return any(
        entry["loadStatus"] == "LOADED"
        and (entry["locationOrLoadError"] or {}).get("__typename") == "RepositoryLocation"
        for entry in entries
    )


def stop_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the process's group (it leads one), SIGKILL after `grace_s`."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def running_ui(port: int, log: Path) -> Iterator[None]:
    """`tally ui --port PORT` until the block ends; its output goes to `log`."""
    with open(log, "wb") as output:
        ui = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port)],
            cwd=PROJECT_ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: ui.poll() is not None or location_loaded(port), UI_START_S, "tally ui to load"
        )
        if ui.poll() is not None:
            raise ScreenshotError(f"tally ui exited with {ui.returncode}; see {log}")
        yield
    finally:
        stop_group(ui)


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, executable: str, profile: Path) -> None:
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [
                executable,
                "--headless=new",
                "--no-sandbox",  # as root (CI, containers) Chromium refuses its sandbox
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                f"--window-size={WIDTH},{HEIGHT}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        active = profile / "DevToolsActivePort"
        wait_for(lambda: active.exists() and active.read_text().strip(), 30, "Chromium to start")
        port = active.read_text().split()[0]
        pages = wait_for(
            lambda: [
                t
                for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                if t["type"] == "page"
            ],
            30,
            "Chromium's first page",
        )
        self.connection = ExitStack()
        self.socket = self.connection.enter_context(
            connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        )
        self.ids = itertools.count(1)
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict:
        """Send one command; its result (events in between are skipped)."""
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=PAGE_S))
            if message.get("id") == message_id:
                if "error" in message:
                    raise ScreenshotError(f"Chromium: {method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def capture(self, url: str, shows: list[str], target: Path, height: int = HEIGHT) -> None:
        """Open `url` in a window `height` tall, wait until the page shows every text
        in `shows` and has stopped changing, and write it as PNG to `target`."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.call("Page.navigate", url=url)
        texts = json.dumps(shows)
        wait_for(
            lambda: self.evaluate(
                f"{texts}.every(t => document.body && document.body.innerText.includes(t))"
            ),
            PAGE_S,
            f"{url} to show {', '.join(shows)}",
        )
        # The UI streams in the rest (plots, tables): settled once the text stops growing.
        previous: list[int] = []

        def settled() -> bool:
            self.evaluate(DISMISS)
            previous.append(int(self.evaluate("document.body.innerText.length") or 0))
            return len(previous) >= 4 and len(set(previous[-4:])) == 1

        wait_for(settled, PAGE_S, f"{url} to settle")
        shot = self.call("Page.captureScreenshot", format="png")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        with suppress(Exception):
            self.connection.close()
        stop_group(self.process, grace_s=10)


def take(out: Path, port: int) -> list[Path]:
    browser_path = find_browser()
    with tempfile.TemporaryDirectory(prefix="tally-screenshot-") as scratch:
        with running_ui(port, Path(scratch) / "ui.log"):
            nodes = graphql(port, LATEST_PARTITION, {"key": {"path": ["reconciliation"]}})
            events = nodes["assetNodes"][0]["assetMaterializations"] if nodes["assetNodes"] else []
            if not events:
                raise ScreenshotError("reconciliation was never materialized; run `tally demo`")
            day = events[0]["partition"]
            base = f"http://127.0.0.1:{port}"
            browser = Browser(browser_path, Path(scratch) / "profile")
            try:
                pages = [
                    (
                        f"{base}/assets/finance_review",
                        ["finance_review", "open_credit_proposals"],
                        out / "finance-review.png",
                        TALL,
                    ),
                    (
                        f"{base}/assets/reconciliation?partition={day}",
                        ["reconciliation", "billed_dollars"],
                        out / "reconciliation.png",
                        TALL,
                    ),
                ]
                for url, shows, target, height in pages:
                    browser.capture(url, shows, target, height)
            finally:
                browser.close()
    return [target for _, _, target, _ in pages]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/screenshot.py", description=__doc__)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "img")
    parser.add_argument("--port", type=int, default=0, help="tally ui's port (default: free)")
    args = parser.parse_args(argv)
    try:
        written = take(args.out, args.port or free_port())
    except ScreenshotError as error:
        print(f"screenshot: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
