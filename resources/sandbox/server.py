"""Blocking entry point used by `tally sandbox --host 127.0.0.1 --port 12111`."""

from __future__ import annotations

import uvicorn

from .app import create_app


def serve(host: str, port: int) -> None:
    """Serve both provider APIs (and /_sandbox) on host:port until interrupted.

    Access logs are off: request lines would be noise at benchmark rates, and
    nothing here ever logs headers, so API keys never reach a log.
    A port outside 1-65535 is refused (ValueError): uvicorn would listen elsewhere.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"sandbox port must be 1-65535, got {port!r}")
    uvicorn.run(
        create_app(),
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        lifespan="off",
    )
