"""Request pipeline for the provider APIs.

Every Stripe or Polar request goes through `dispatch`: pick the provider, match
the route, count it, check auth, apply the rate limit, latency and injected
errors, replay Stripe idempotent requests, run the handler, and finally maybe
drop the answer after the handler stored its data. /_sandbox/* never comes here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import Response

from .common import DAY, ApiError, decode_form, json_response

if TYPE_CHECKING:
    from .state import SandboxState

log = logging.getLogger("tally.sandbox")

Handler = Callable[["SandboxState", "Ctx"], tuple[int, Any]]


@dataclass
class Ctx:
    """What a handler sees of the request."""

    method: str
    path: str
    params: dict[str, str]
    query: QueryParams
    headers: Headers
    body: bytes
    _form: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def form(self) -> dict[str, Any]:
        if self._form is None:
            self._form = decode_form(self.body)
        return self._form

    @property
    def bearer(self) -> str:
        auth = self.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""


@dataclass
class ProviderRoute:
    method: str
    template: str
    handler: Handler
    writes: bool = False
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template.rstrip("/"))
        self.regex = re.compile(f"^{pattern}/?$")

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.template}"


@dataclass
class ProviderSpec:
    """A provider's routes and how it words the errors the pipeline produces."""

    name: str
    routes: list[ProviderRoute]
    unauthorized: Callable[[Ctx], ApiError]
    rate_limited: Callable[[int], ApiError]
    server_error: Callable[[str], ApiError]
    unknown_route: Callable[[Ctx], ApiError]
    idempotent_posts: bool = False

    def match(self, method: str, path: str) -> tuple[ProviderRoute | None, dict[str, str]]:
        for route in self.routes:
            if route.method != method:
                continue
            found = route.regex.match(path)
            if found:
                return route, found.groupdict()
        return None, {}


_UUID_SEGMENT = re.compile(
    r"/[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def detect_provider(path: str, headers: Headers) -> str:
    """Both APIs share /v1/customers and /v1/subscriptions: tell them apart.

    The SDKs announce themselves (Polar-Version / Stripe-Version /
    X-Stripe-Client-User-Agent); otherwise Polar's collection paths end in '/',
    its ids are UUIDs and it alone has /v1/events, /v1/meters and /external/.
    """
    if path.startswith(("/v2/", "/v1/billing/")):
        return "stripe"
    if path.startswith(("/v1/events", "/v1/meters")):
        return "polar"
    if "polar-version" in headers:
        return "polar"
    if "stripe-version" in headers or "x-stripe-client-user-agent" in headers:
        return "stripe"
    if path.endswith("/") or "/external/" in path or _UUID_SEGMENT.search(path):
        return "polar"
    return "stripe"


def _render(error: ApiError, extra: dict[str, str] | None = None) -> Response:
    headers = {**error.headers, **(extra or {})}
    if error.payload is None:  # an empty body (Polar's 429)
        return Response(b"", status_code=error.status, headers=headers)
    return json_response(error.status, error.payload, headers)


async def dispatch(request: Request, specs: dict[str, ProviderSpec]) -> Response:
    state: SandboxState = request.app.state.sandbox
    path = request.url.path
    method = request.method
    spec = specs[detect_provider(path, request.headers)]
    provider = spec.name
    route, params = spec.match(method, path)
    endpoint = route.endpoint if route else f"{method} (unknown route)"
    ctx = Ctx(method, path, params, request.query_params, request.headers, b"")

    with state.lock:
        state.stats.record_request(provider, endpoint)
    response = await _run(state, spec, route, ctx, request)
    with state.lock:
        state.stats.record_status(provider, response.status_code)
    return response


async def _run(
    state: SandboxState,
    spec: ProviderSpec,
    route: ProviderRoute | None,
    ctx: Ctx,
    request: Request,
) -> Response:
    if not ctx.bearer:
        return _render(spec.unauthorized(ctx))
    with state.lock:
        limiter = state.limiters.get(spec.name)
        retry_after = limiter.take() if limiter is not None else None
        latency = state.faults.latency_ms
    if retry_after is not None:
        return _render(spec.rate_limited(retry_after), {"Retry-After": str(retry_after)})
    if latency > 0:
        await asyncio.sleep(latency / 1000.0)
    if route is None:
        return _render(spec.unknown_route(ctx))
    ctx.body = await request.body()

    idem_key = ""
    if spec.idempotent_posts and ctx.method == "POST":
        idem_key = ctx.headers.get("idempotency-key", "")
    with state.lock:
        if idem_key:
            replay = _idempotency_lookup(state, spec, ctx, idem_key)
            if replay is not None:
                return replay
        if state.faults.error_rate > 0 and state.rng.random() < state.faults.error_rate:
            state.stats.bump(spec.name, "injected_errors")
            failure = spec.server_error("Injected fault: the server failed the request.")
            if idem_key:
                # Stripe saves the answer to a keyed request, a 500 included, and
                # replays it to every retry with the same key for 24 h.
                _idempotency_store(state, ctx, idem_key, failure.status, failure.payload)
            return _render(failure)
        try:
            state.settle()  # the providers' asynchronous work, up to the clock
            status, payload = route.handler(state, ctx)
        except ApiError as error:
            return _render(error)
        except Exception:  # a sandbox bug must still answer in the provider's shape
            log.exception("sandbox handler failed: %s %s", ctx.method, route.endpoint)
            return _render(spec.server_error("The sandbox failed to handle the request."))
        if idem_key and 200 <= status < 300:
            _idempotency_store(state, ctx, idem_key, status, payload)
        if (
            route.writes
            and 200 <= status < 300
            and state.faults.drop_after_store_rate > 0
            and state.rng.random() < state.faults.drop_after_store_rate
        ):
            state.stats.bump(spec.name, "dropped_after_store")
            return _render(
                spec.server_error("Injected fault: the request was stored but its answer lost.")
            )
    return json_response(status, payload, {"Request-Id": f"req_{id(ctx):x}"})


def _fingerprint(ctx: Ctx) -> str:
    digest = hashlib.sha256()
    for part in (ctx.method.encode(), ctx.path.encode(), ctx.body):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()


def _idempotency_lookup(
    state: SandboxState, spec: ProviderSpec, ctx: Ctx, key: str
) -> Response | None:
    """Stripe replays a stored answer for a known key with the same request.

    Successful answers and server errors are stored (Stripe saves nothing when
    validation failed); keys expire 24 h after first use.
    """
    store = state.stripe.idempotency
    record = store.get(key)
    if record is None:
        return None
    if state.now() - record["created"] > DAY:
        del store[key]
        return None
    if record["fingerprint"] != _fingerprint(ctx):
        return _render(
            ApiError(
                400,
                {
                    "error": {
                        "type": "idempotency_error",
                        "message": (
                            "Keys for idempotent requests can only be used with the same "
                            "parameters they were first used with. Try using a key other "
                            f"than '{key}' if you meant to execute a different request."
                        ),
                    }
                },
            )
        )
    return Response(
        record["body"],
        status_code=record["status"],
        media_type="application/json",
        headers={"Idempotent-Replayed": "true"},
    )


def _idempotency_store(state: SandboxState, ctx: Ctx, key: str, status: int, payload: Any) -> None:
    state.stripe.idempotency[key] = {
        "fingerprint": _fingerprint(ctx),
        "status": status,
        "body": json.dumps(payload, separators=(",", ":"), ensure_ascii=False),
        "created": state.now(),
    }
