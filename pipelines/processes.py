"""Child processes the CLI starts (`tally ui`'s `dagster dev`, the demo's sandbox)
and how they end: each child leads its own process group, a SIGTERM or SIGINT to
tally is passed to the whole group, tally waits for it and kills what is left
after a grace period, so nothing outlives the command."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from types import FrameType

import psutil

GRACE_S = 20.0  # for the child to stop its own children after SIGINT
LEFTOVER_GRACE_S = 5.0
EXIT_SIGNALLED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def exit_code_after(signum: int | None, child_code: int) -> int:
    """What tally exits with: 128 + the signal that stopped it (130 SIGINT, 143
    SIGTERM), else the child's own code (a signal-killed child counts as failed)."""
    if signum is not None:
        return 128 + signum
    return child_code if child_code >= 0 else 128 - child_code


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (those alive now)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(processes: Sequence[psutil.Process], sig: int = signal.SIGKILL) -> None:
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.send_signal(sig)


def wait_gone(processes: Sequence[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited (or `timeout_s`); the ones still alive."""
    _, alive = psutil.wait_procs(list(processes), timeout=timeout_s)
    return alive


def run_group(command: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None) -> int:
    """Run `command` as the leader of a new process group until it exits or tally
    gets SIGTERM / SIGINT. On a signal the group gets SIGINT (what Ctrl-C sends a
    foreground job: Dagster and uvicorn shut down cleanly on it); what is still
    alive of the tree and the group after GRACE_S is killed. Returns tally's exit
    code (130 / 143 after a signal)."""
    received: list[int] = []
    seen: dict[int, psutil.Process] = {}
    children: list[subprocess.Popen] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        for child in children:
            # Remember the tree now: a grandchild whose parent exits first is
            # re-parented and would no longer be found below the child.
            seen.update((process.pid, process) for process in tree(child.pid))
            with suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGINT)

    # Handlers first: a signal tally ignores (SIGINT in a backgrounded job) would
    # stay ignored in the child; a handled one is reset to its default there.
    previous = {sig: signal.signal(sig, forward) for sig in EXIT_SIGNALLED}
    child = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True)
    children.append(child)
    if received:  # the signal came while the child was being started
        os.killpg(child.pid, signal.SIGINT)
    try:
        code = _wait(child, received)
        if received:
            leftovers = [
                process
                for process in {**seen, **{p.pid: p for p in group_members(child.pid)}}.values()
                if process.pid != child.pid
            ]
            kill_tree(leftovers, signal.SIGTERM)
            kill_tree(wait_gone(leftovers, LEFTOVER_GRACE_S))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code_after(received[0] if received else None, code)


def _wait(child: subprocess.Popen, received: list[int]) -> int:
    """The child's exit code; once a signal arrived, at most GRACE_S more, then
    the child's tree is killed."""
    signalled_at: float | None = None
    while True:
        try:
            return child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if received and signalled_at is None:
            signalled_at = time.monotonic()
        if signalled_at is not None and time.monotonic() - signalled_at > GRACE_S:
            kill_tree(tree(child.pid))
            return child.wait()


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            if os.getpgid(process.pid) == pgid:
                members.append(process)
    return members


def spawn_detached(
    command: Sequence[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None
) -> int:
    """Start `command` in its own session, outliving tally (the demo's sandbox, as
    its embedded PostgreSQL outlives it); output goes to `log`. Returns its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        child = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return child.pid


def terminate(pid: int, *, grace_s: float = 10.0) -> bool:
    """SIGTERM `pid` and its descendants, SIGKILL after `grace_s`; False when it was
    not running."""
    processes = tree(pid)
    if not processes:
        return False
    kill_tree(processes, signal.SIGTERM)
    kill_tree(wait_gone(processes, grace_s))
    return True


def wait_until(condition, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `condition()` until true or `timeout_s`; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


def record_exit_signals() -> list[int]:
    """Handlers that only note SIGTERM / SIGINT (in the returned list), for a server
    that shuts itself down on them (uvicorn re-raises the signal once it has):
    the command then exits 128 + signal instead of dying mid-cleanup."""
    received: list[int] = []
    for sig in EXIT_SIGNALLED:
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    return received
