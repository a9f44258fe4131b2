"""`tally stop`: stop what tally left running under TALLY_HOME, the embedded
PostgreSQL (`.tally/pg`) and the demo's sandbox. Idempotent: what is not
running is said so, and the exit code is still 0."""

from __future__ import annotations

from collections.abc import Callable

EXIT_OK, EXIT_FAILED = 0, 1


def stop_local(echo: Callable[[str], None]) -> int:
    """`tally stop`: the embedded PostgreSQL and the demo's sandbox under TALLY_HOME
    (idempotent: what is not running is said so)."""
    from pipelines import demo_sandbox
    from resources.db import DatabaseUnavailable, embedded_pgdata, stop_embedded_server

    stopped = demo_sandbox.stop()
    if stopped is None:
        echo("sandbox: not running")
    else:
        echo(f"sandbox: stopped (pid {stopped.pid}, port {stopped.port})")
    try:
        pid = stop_embedded_server()
    except DatabaseUnavailable as error:
        echo(f"embedded PostgreSQL: {error}")
        return EXIT_FAILED
    if pid is None:
        echo(f"embedded PostgreSQL: not running ({embedded_pgdata()})")
    else:
        echo(f"embedded PostgreSQL: stopped (pid {pid}, {embedded_pgdata()})")
    return EXIT_OK
