"""Blocking entry point used by `tally sandbox --host 127.0.0.1 --port 12111`."""

from __future__ import annotations

import uvicorn

from .app import create_app


def serve(host: str, port: int) -> None:
    """Serve both provider APIs (and /_sandbox) on host:port until interrupted.

    Access logs are off: request lines would be noise at benchmark rates, and
    nothing here ever logs headers, so API keys never reach a log.
    """
    uvicorn.run(
        create_app(),
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        lifespan="off",
    )
