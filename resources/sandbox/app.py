"""The sandbox ASGI app: Stripe and Polar on one port, plus /_sandbox admin."""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import admin, polar_api, stripe_api
from .routing import dispatch
from .state import SandboxState

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def create_app(clock: Callable[[], float] | None = None) -> Starlette:
    """Build a fresh sandbox.

    `clock` returns epoch seconds (default `time.time`); the 24 h dedupe and
    cancel windows, the 35-day/5-minute checks and Polar's future-timestamp
    check read it (plus the offset moved by ``/_sandbox/clock`` or
    ``app.state.sandbox.advance_clock``). The state is ``app.state.sandbox``.
    """
    specs = {"stripe": stripe_api.SPEC, "polar": polar_api.SPEC}

    async def provider_endpoint(request: Request) -> Response:
        return await dispatch(request, specs)

    app = Starlette(
        routes=[*admin.routes(), Route("/{path:path}", provider_endpoint, methods=_METHODS)]
    )
    app.state.sandbox = SandboxState(clock)
    return app
