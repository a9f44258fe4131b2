"""/_sandbox/* admin endpoints (no auth, no faults, no rate limits, not counted).

Every admin call, like every provider call, first brings the providers'
asynchronous work up to the sandbox clock (``SandboxState.settle``): Stripe
events and cancels that are due are processed, period invoices and Polar orders
are created and finalized, each as of the moment it was due.

Contract (used by tests and outside checkers; DESIGN §7):

* ``GET  /_sandbox/usage?date=YYYY-MM-DD`` -> ``[{"provider","customer","tier","seconds"}]``
  summed per (provider, customer, tier) for events whose timestamp falls on that
  UTC day, after dedupe and cancellations: what the provider **accepted** (what
  will be there once processed). It includes Stripe events and cancels still
  inside ``processing_delay_s`` and leaves out Stripe events for a customer that
  did not exist (never counted). ``&processed=true``: only what the provider has
  processed, i.e. what its read APIs (summaries, quantities) show right now. Polar
  processes at once, so both views agree for Polar. Stripe: tier from the meter
  event name ``tally_instance_seconds_{tier}``, customer =
  ``payload.stripe_customer_id``. Polar: events named ``tally.instance_usage``,
  tier = ``metadata.tier``, customer = ``external_customer_id`` (the Polar
  customer id when there is none).
* ``POST /_sandbox/events`` ``[{"provider","customer","tier","seconds","date"}]`` adds
  usage directly (timestamp = date 12:00 UTC), visible here and in the provider
  read APIs at once (usage already processed at the provider: no processing
  delay). Stripe: creates the tier's meter when missing. It creates no customer:
  planted Stripe usage for a customer that does not exist is not counted and is
  reported as a meter error, as an API event would be; Polar counts it.
* ``POST /_sandbox/faults`` ``{"error_rate","drop_after_store_rate","latency_ms",
  "processing_delay_s","rate_limit_per_s","stripe_rate_limit_per_s",
  "polar_rate_limit_per_s","seed"}`` (all optional, merged into the current
  settings); ``GET`` shows them. ``processing_delay_s`` (default 0): Stripe meter
  events and cancels (meter event adjustments) reach event summaries and invoices
  that many sandbox seconds after they were accepted (a cancel never before its
  event); the answers are immediate (a cancel answers ``status: pending``).
* ``POST /_sandbox/customers`` ``{"provider","customer","name","email"}`` (or a list)
  creates the customer with the id given (Polar: ``external_id`` = customer), or
  updates name and email of an existing one -> ``{"created","updated"}``; ``GET``
  lists them. Customers exist only once created (here, ``POST /v1/customers`` or
  ``POST /v1/customers/``). Stripe accepts meter events for an unknown customer
  (200), never counts them, and reports them when it processes them as a
  ``v1.billing.meter.error_report_triggered`` thin event about the meter
  (``GET /v2/core/events?object_id=<meter>``; see ``stripe_errors``). Polar
  accepts and counts events for unknown external customers, as Polar does.
* ``GET /_sandbox/meter_errors`` -> every Stripe meter event accepted and then not
  counted: ``[{"code","error_message","meter","event_name","customer","identifier",
  "value","timestamp","accepted_at","processed_at"}]``, oldest first.
* ``POST /_sandbox/subscriptions`` ``{"provider","customer","plan","period_start":
  "YYYY-MM-DD","interval":"month","status","unit_amounts"}`` (or a list) sets the
  customer's subscription (creating the customer when missing: a subscription
  implies one). ``period_start`` (optional) gives it billing periods from that UTC
  midnight, ``interval`` ``day|week|month|year`` (default month); ``status`` any
  Stripe status (``active`` … ``paused``; Polar's own set); ``unit_amounts``
  ``{tier: cents per second}`` prices the metered lines (default 0). Stripe
  finalizes each period's invoice at period end + grace with the usage it has
  processed by then; usage for a finalized period is on no invoice
  (``stripe_invoices``). Polar creates each cycle's order at period end from the
  events it *ingested* during the period (``polar_orders``).
* ``POST /_sandbox/settings`` ``{"finalization_grace_s": 3600}`` (default 1 h, at most
  72 h); ``GET`` shows it. Invoices already created keep the grace they had.
* ``POST /_sandbox/reset`` clears all state, customers, subscriptions, settings,
  faults, counters and the clock offset.
* ``POST /_sandbox/clock`` ``{"advance_seconds": n}`` or ``{"now": epoch}``; ``GET`` shows it.
* ``POST /_sandbox/plans`` ``{"provider","customer","plan"}`` (or a list of them): a
  subscription without billing periods (no invoices), as before.
* ``GET /_sandbox/stats``, ``POST /_sandbox/stats/reset``, ``GET /_sandbox/health``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .common import ApiError, as_int, json_response
from .periods import Interval
from .polar_api import TALLY_EVENT_NAME
from .stripe_api import SUBSCRIPTION_STATUSES as STRIPE_STATUSES

if TYPE_CHECKING:
    from .state import SandboxState

PROVIDERS = ("stripe", "polar")
POLAR_STATUSES = (
    "active",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "past_due",
    "trialing",
    "unpaid",
)


def _bad(message: str) -> ApiError:
    return ApiError(400, {"error": message})


def _state(request: Request) -> SandboxState:
    return request.app.state.sandbox


async def _json(request: Request) -> Any:
    body = await request.body()
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError as exc:
        raise _bad("The body is not valid JSON.") from exc


def _parse_date(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        raise _bad(f"{where}: expected a date as YYYY-MM-DD")
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError as exc:
        raise _bad(f"{where}: expected a date as YYYY-MM-DD, got {value!r}") from exc


AdminHandler = Callable[[Request], Awaitable[tuple[int, Any]]]


def _admin(handler: AdminHandler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            _state(request).settle()  # answers as if the providers kept up with the clock
            status, payload = await handler(request)
        except ApiError as error:
            return json_response(error.status, error.payload)
        return json_response(status, payload)

    return endpoint


@_admin
async def usage(request: Request) -> tuple[int, Any]:
    day = _parse_date(request.query_params.get("date"), "date")
    processed = request.query_params.get("processed", "false").lower()
    if processed not in ("true", "false", "1", "0"):
        raise _bad("processed: expected true or false")
    state = _state(request)
    with state.lock:
        state.settle()
        index = state.processed_usage if processed in ("true", "1") else state.usage
        return 200, index.for_date(day.strftime("%Y-%m-%d"))


@_admin
async def add_events(request: Request) -> tuple[int, Any]:
    body = await _json(request)
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list):
        raise _bad("expected a JSON list of {provider, customer, tier, seconds, date}")
    rows = []
    for i, item in enumerate(body):
        where = f"events[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where}: expected an object")
        provider = item.get("provider")
        if provider not in PROVIDERS:
            raise _bad(f"{where}.provider: expected 'stripe' or 'polar'")
        customer, tier = item.get("customer"), item.get("tier")
        if not isinstance(customer, str) or not customer:
            raise _bad(f"{where}.customer: expected a non-empty string")
        if not isinstance(tier, str) or not tier:
            raise _bad(f"{where}.tier: expected a non-empty string")
        seconds = item.get("seconds")
        whole = None if isinstance(seconds, bool) else as_int(seconds)
        if whole is None:
            raise _bad(f"{where}.seconds: expected an integer")
        day = _parse_date(item.get("date"), f"{where}.date")
        rows.append((provider, customer, tier, whole, day))
    state = _state(request)
    with state.lock:
        for provider, customer, tier, seconds, day in rows:
            noon = day.timestamp() + 12 * 3600
            ident = f"sandbox-admin-{uuid.uuid4().hex}"
            if provider == "stripe":
                meter = state.stripe.ensure_tier_meter(tier)
                state.stripe.ingest(
                    event_name=meter["event_name"],
                    payload={"stripe_customer_id": customer, "value": str(seconds)},
                    identifier=ident,
                    timestamp=int(noon),
                    check_window=False,
                    delay=False,
                )
            else:
                state.polar.store_event(
                    name=TALLY_EVENT_NAME,
                    key=customer,
                    customer_id=None,
                    external_customer_id=customer,
                    external_id=ident,
                    timestamp=noon,
                    metadata={
                        "tier": tier,
                        "seconds": seconds,
                        "usage_date": day.date().isoformat(),
                    },
                )
    return 200, {"inserted": len(rows)}


@_admin
async def faults(request: Request) -> tuple[int, Any]:
    state = _state(request)
    if request.method == "GET":
        with state.lock:
            return 200, state.faults.as_dict()
    body = await _json(request) or {}
    if not isinstance(body, dict):
        raise _bad("expected a JSON object")
    try:
        return 200, state.configure_faults(body)
    except ValueError as exc:
        raise _bad(str(exc)) from exc


@_admin
async def reset(request: Request) -> tuple[int, Any]:
    _state(request).reset()
    return 200, {"reset": True}


@_admin
async def clock(request: Request) -> tuple[int, Any]:
    state = _state(request)
    if request.method == "POST":
        body = await _json(request) or {}
        if not isinstance(body, dict):
            raise _bad('expected {"advance_seconds": n} or {"now": epoch}')
        if "now" in body:
            now = body["now"]
            if isinstance(now, bool) or not isinstance(now, int | float):
                raise _bad("now: expected epoch seconds")
            state.set_now(now)
        elif "advance_seconds" in body:
            step = body["advance_seconds"]
            if isinstance(step, bool) or not isinstance(step, int | float):
                raise _bad("advance_seconds: expected a number")
            state.advance_clock(step)
        else:
            raise _bad('expected {"advance_seconds": n} or {"now": epoch}')
    with state.lock:
        return 200, {"now": state.now(), "offset_seconds": state.clock.offset}


@_admin
async def plans(request: Request) -> tuple[int, Any]:
    body = await _json(request)
    items = body if isinstance(body, list) else [body]
    parsed = []
    for i, item in enumerate(items):
        where = f"plans[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where}: expected {{provider, customer, plan}}")
        provider, customer, plan = item.get("provider"), item.get("customer"), item.get("plan")
        if provider not in PROVIDERS:
            raise _bad(f"{where}.provider: expected 'stripe' or 'polar'")
        if not isinstance(customer, str) or not customer:
            raise _bad(f"{where}.customer: expected a non-empty string")
        if not isinstance(plan, str) or not plan:
            raise _bad(f"{where}.plan: expected a non-empty string")
        parsed.append((provider, customer, plan))
    state = _state(request)
    with state.lock:
        for provider, customer, plan in parsed:
            store = state.stripe if provider == "stripe" else state.polar
            store.set_plan(customer, plan)
    return 200, {"updated": len(parsed)}


def _items(body: Any, what: str) -> list[Any]:
    items = body if isinstance(body, list) else [body]
    if not items or not all(isinstance(item, dict) for item in items):
        raise _bad(f"expected a JSON object {what} or a list of them")
    return items


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"{where}.{key}: expected a non-empty string")
    return value


def _optional_text(item: dict[str, Any], key: str, where: str) -> str | None:
    return None if item.get(key) is None else _text(item, key, where)


@_admin
async def customers(request: Request) -> tuple[int, Any]:
    """Create (or update) customers with the ids given; GET lists both providers'."""
    state = _state(request)
    if request.method == "GET":
        with state.lock:
            listed = [
                {"provider": "stripe", "customer": c, "name": v["name"], "email": v["email"]}
                for c, v in state.stripe.customers.items()
            ] + [
                {
                    "provider": "polar",
                    "customer": v["external_id"],
                    "id": v["id"],
                    "name": v["name"],
                    "email": v["email"],
                }
                for v in state.polar.customers.values()
            ]
        return 200, listed
    items = _items(await _json(request), "{provider, customer, name, email}")
    parsed = []
    for i, item in enumerate(items):
        where = f"customers[{i}]"
        provider = item.get("provider")
        if provider not in PROVIDERS:
            raise _bad(f"{where}.provider: expected 'stripe' or 'polar'")
        customer = _text(item, "customer", where)
        name = _optional_text(item, "name", where)
        email = _optional_text(item, "email", where)
        parsed.append((provider, customer, name, email))
    created = 0
    with state.lock:
        for provider, customer, name, email in parsed:
            if provider == "stripe":
                created += customer not in state.stripe.customers
                state.stripe.ensure_customer(customer, name=name, email=email)
            else:
                created += state.polar.ensure_external_customer(customer, name=name, email=email)
    return 200, {"created": created, "updated": len(parsed) - created}


@_admin
async def subscriptions(request: Request) -> tuple[int, Any]:
    items = _items(
        await _json(request), "{provider, customer, plan, period_start, interval, status}"
    )
    parsed = []
    for i, item in enumerate(items):
        where = f"subscriptions[{i}]"
        provider = item.get("provider")
        if provider not in PROVIDERS:
            raise _bad(f"{where}.provider: expected 'stripe' or 'polar'")
        customer = _text(item, "customer", where)
        plan = _text(item, "plan", where)
        start = item.get("period_start")
        anchor = (
            None if start is None else int(_parse_date(start, f"{where}.period_start").timestamp())
        )
        raw_interval = item.get("interval", "month")
        try:
            interval = Interval(raw_interval)
        except ValueError:
            choices = ", ".join(i.value for i in Interval)
            raise _bad(f"{where}.interval: expected one of {choices}") from None
        status = item.get("status")
        allowed = STRIPE_STATUSES if provider == "stripe" else POLAR_STATUSES
        if status is not None and status not in allowed:
            raise _bad(f"{where}.status: expected one of {', '.join(allowed)}")
        units = item.get("unit_amounts")
        if units is not None:
            if not isinstance(units, dict) or not all(
                isinstance(v, str | int) and not isinstance(v, bool) for v in units.values()
            ):
                raise _bad(f"{where}.unit_amounts: expected {{tier: cents per second}}")
            try:
                units = {str(k): str(Decimal(str(v))) for k, v in units.items()}
            except InvalidOperation:
                raise _bad(f"{where}.unit_amounts: expected decimal amounts in cents") from None
        period = None if anchor is None else (anchor, interval)
        parsed.append((provider, customer, plan, status, period, units))
    state = _state(request)
    answers = []
    with state.lock:
        for provider, customer, plan, status, period, units in parsed:
            store = state.stripe if provider == "stripe" else state.polar
            sub = store.set_plan(customer, plan, status=status, period=period, unit_amounts=units)
            answers.append({"provider": provider, "customer": customer, "id": sub["id"]})
    return 200, answers


@_admin
async def settings(request: Request) -> tuple[int, Any]:
    state = _state(request)
    if request.method == "GET":
        with state.lock:
            return 200, state.settings.as_dict()
    body = await _json(request) or {}
    if not isinstance(body, dict):
        raise _bad('expected {"finalization_grace_s": seconds}')
    try:
        return 200, state.configure_settings(body)
    except ValueError as exc:
        raise _bad(str(exc)) from exc


@_admin
async def meter_errors(request: Request) -> tuple[int, Any]:
    """Every Stripe meter event accepted and then not counted, oldest first."""
    state = _state(request)
    with state.lock:
        return 200, list(state.stripe.errors.flat)


@_admin
async def stats(request: Request) -> tuple[int, Any]:
    state = _state(request)
    with state.lock:
        snapshot = state.stats.snapshot()
        snapshot["stripe_meter_events"] = state.stripe.event_count
        snapshot["polar_events"] = len(state.polar.events)
    return 200, snapshot


@_admin
async def stats_reset(request: Request) -> tuple[int, Any]:
    _state(request).reset_stats()
    return 200, {"reset": True}


@_admin
async def health(request: Request) -> tuple[int, Any]:
    return 200, {"ok": True}


def routes() -> list[Route]:
    return [
        Route("/_sandbox/usage", usage, methods=["GET"]),
        Route("/_sandbox/events", add_events, methods=["POST"]),
        Route("/_sandbox/faults", faults, methods=["GET", "POST"]),
        Route("/_sandbox/reset", reset, methods=["POST"]),
        Route("/_sandbox/clock", clock, methods=["GET", "POST"]),
        Route("/_sandbox/plans", plans, methods=["POST"]),
        Route("/_sandbox/customers", customers, methods=["GET", "POST"]),
        Route("/_sandbox/subscriptions", subscriptions, methods=["POST"]),
        Route("/_sandbox/settings", settings, methods=["GET", "POST"]),
        Route("/_sandbox/meter_errors", meter_errors, methods=["GET"]),
        Route("/_sandbox/stats", stats, methods=["GET"]),
        Route("/_sandbox/stats/reset", stats_reset, methods=["POST"]),
        Route("/_sandbox/health", health, methods=["GET"]),
    ]
