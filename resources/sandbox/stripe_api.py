"""Stripe half of the sandbox: billing meters, meter events, adjustments, event
summaries, customers, customer balance transactions, subscriptions, and the v2
meter event session/stream/create endpoints.

Answers follow the Stripe OpenAPI excerpt in shared/reference (tests validate
them) and are parsed by the real `stripe` SDK.

Duplicate identifiers (choice documented here): Stripe enforces identifier
uniqueness over a rolling 24 h window. On v1 ``POST /v1/billing/meter_events`` a
duplicate is refused with HTTP 400, ``type=invalid_request_error`` and the
message ``An event already exists with identifier <id>.`` and **no** ``code``
(observed against Stripe by several public integrations, which all match on
that message; Stripe also sends ``Stripe-Should-Retry: false``). The v2 APIs
(``/v2/billing/meter_events``) answer a duplicate with 400 and
``code=duplicate_meter_event`` (schema ``v2.error.duplicate_meter_event`` in
Stripe's spec). Clients should treat either as "already delivered". Other
meter-event refusals carry the codes Stripe uses in meter error reports
(``timestamp_too_far_in_past``, ``timestamp_in_future``, ``no_meter``,
``meter_event_no_customer_defined``, ``meter_event_invalid_value``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .common import (
    DAY,
    HOUR,
    MINUTE,
    ApiError,
    as_int,
    floor_to,
    iso,
    new_id,
    parse_iso,
    utc_date,
)
from .periods import Interval, period, period_at
from .routing import Ctx, ProviderRoute, ProviderSpec
from .stripe_errors import MeterErrors
from .stripe_invoices import StripeInvoices

if TYPE_CHECKING:
    from .state import SandboxState

TIER_EVENT_PREFIX = "tally_instance_seconds_"
MAX_PAST = 35 * DAY
MAX_FUTURE = 5 * MINUTE
DEDUPE_WINDOW = DAY
CANCEL_WINDOW = DAY
SESSION_TTL = 15 * MINUTE
NO_RETRY = {"Stripe-Should-Retry": "false"}


def stripe_error(
    message: str,
    *,
    status: int = 400,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> ApiError:
    error: dict[str, Any] = {"type": type, "message": message}
    if code:
        error["code"] = code
        error["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    if param:
        error["param"] = param
    headers = NO_RETRY if 400 <= status < 500 and status != 429 else None
    return ApiError(status, {"error": error}, headers)


def _tier_of(event_name: str) -> str | None:
    if event_name.startswith(TIER_EVENT_PREFIX):
        return event_name[len(TIER_EVENT_PREFIX) :]
    return None


def _missing(param: str) -> ApiError:
    return stripe_error(f"Missing required param: {param}.", code="parameter_missing", param=param)


def _no_such(kind: str, ident: str, param: str = "id") -> ApiError:
    return stripe_error(
        f"No such {kind}: '{ident}'", status=404, code="resource_missing", param=param
    )


@dataclass(slots=True)
class MeterEvent:
    identifier: str
    event_name: str
    meter_id: str
    customer: str
    value: int
    timestamp: int
    created: int
    payload: dict[str, str]
    due: float = 0.0  # when Stripe processes it (accepted + processing delay)
    cancelled: bool = False  # a cancel was accepted
    cancel_due: float | None = None  # when that cancel is processed
    accepted: bool = False  # counted in /_sandbox/usage
    processed: bool = False
    rejected: bool = False  # processed for an unknown customer: never counted
    cancel_applied: bool = False

    def as_v1(self) -> dict[str, Any]:
        return {
            "object": "billing.meter_event",
            "created": self.created,
            "event_name": self.event_name,
            "identifier": self.identifier,
            "livemode": False,
            "payload": dict(self.payload),
            "timestamp": self.timestamp,
        }

    def as_v2(self) -> dict[str, Any]:
        return {
            "object": "v2.billing.meter_event",
            "created": iso(self.created),
            "event_name": self.event_name,
            "identifier": self.identifier,
            "livemode": False,
            "payload": dict(self.payload),
            "timestamp": iso(self.timestamp),
        }


class Series:
    """Running [value, live event count] per minute, hour and UTC day."""

    __slots__ = ("minute", "hour", "day")

    def __init__(self) -> None:
        self.minute: dict[int, list[int]] = {}
        self.hour: dict[int, list[int]] = {}
        self.day: dict[int, list[int]] = {}

    def add(self, ts: int, value: int, count: int) -> None:
        for step, buckets in ((MINUTE, self.minute), (HOUR, self.hour), (DAY, self.day)):
            cell = buckets.setdefault(ts - ts % step, [0, 0])
            cell[0] += value
            cell[1] += count


class StripeStore:
    def __init__(self, state: SandboxState) -> None:
        self.state = state
        self.meters: dict[str, dict[str, Any]] = {}
        self.meter_order: list[str] = []
        self.meter_by_event: dict[str, str] = {}
        self.events: dict[str, MeterEvent] = {}  # identifier -> latest event
        self.by_customer: dict[str, list[MeterEvent]] = defaultdict(list)
        self.pending: list[tuple[float, int, bool, MeterEvent]] = []  # heap by due time
        self._seq = 0
        self.errors = MeterErrors(self)
        self.event_count = 0
        self.series: dict[tuple[str, str], Series] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.customer_order: list[str] = []
        self.balance_txns: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.subscriptions: dict[str, dict[str, Any]] = {}  # customer -> subscription
        self.subscription_order: list[str] = []
        self.periods: dict[str, tuple[int, Interval]] = {}  # subscription id -> billing
        self.sub_owner: dict[str, str] = {}  # subscription id -> customer key
        self.unit_amounts: dict[str, dict[str, str]] = {}  # subscription id -> tier -> cents
        self.plans: dict[str, str] = {}  # subscription id -> plan
        self.invoices = StripeInvoices(self)
        self.idempotency: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, float] = {}  # authentication_token -> expires_at

    # -- meters ----------------------------------------------------------------
    def create_meter(self, form: dict[str, Any]) -> dict[str, Any]:
        display_name = form.get("display_name")
        event_name = form.get("event_name")
        aggregation = form.get("default_aggregation")
        if not display_name:
            raise _missing("display_name")
        if not event_name:
            raise _missing("event_name")
        if not isinstance(aggregation, dict) or not aggregation.get("formula"):
            raise _missing("default_aggregation[formula]")
        formula = aggregation["formula"]
        if formula not in ("sum", "count"):
            raise stripe_error(
                f"Invalid default_aggregation[formula]: the sandbox supports 'sum' and "
                f"'count', not {formula!r}.",
                param="default_aggregation[formula]",
            )
        if len(event_name) > 100:
            raise stripe_error("event_name is longer than 100 characters.", param="event_name")
        if event_name in self.meter_by_event:
            raise stripe_error(
                f"A meter with event_name '{event_name}' already exists.",
                code="resource_already_exists",
                param="event_name",
            )
        mapping = form.get("customer_mapping") or {}
        if not isinstance(mapping, dict):
            raise stripe_error("Invalid customer_mapping.", param="customer_mapping")
        mapping_type = mapping.get("type", "by_id")
        if mapping_type != "by_id":
            raise stripe_error(
                "Invalid customer_mapping[type]: must be by_id.", param="customer_mapping[type]"
            )
        value_settings = form.get("value_settings") or {}
        if not isinstance(value_settings, dict):
            raise stripe_error("Invalid value_settings.", param="value_settings")
        window = form.get("event_time_window") or None
        if window not in (None, "day", "hour"):
            raise stripe_error(
                "Invalid event_time_window: must be one of day or hour.",
                param="event_time_window",
            )
        now = int(self.state.now())
        meter = {
            "id": new_id("mtr_test_"),
            "object": "billing.meter",
            "created": now,
            "customer_mapping": {
                "event_payload_key": mapping.get("event_payload_key") or "stripe_customer_id",
                "type": "by_id",
            },
            "default_aggregation": {"formula": formula},
            "display_name": display_name,
            "event_name": event_name,
            "event_time_window": window,
            "livemode": False,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": now,
            "value_settings": {
                "event_payload_key": value_settings.get("event_payload_key") or "value"
            },
        }
        self.meters[meter["id"]] = meter
        self.meter_order.append(meter["id"])
        self.meter_by_event[event_name] = meter["id"]
        return meter

    def ensure_tier_meter(self, tier: str) -> dict[str, Any]:
        event_name = TIER_EVENT_PREFIX + tier
        meter_id = self.meter_by_event.get(event_name)
        if meter_id is not None:
            return self.meters[meter_id]
        return self.create_meter(
            {
                "display_name": f"tally instance seconds ({tier})",
                "event_name": event_name,
                "default_aggregation": {"formula": "sum"},
            }
        )

    # -- customers -------------------------------------------------------------
    def ensure_customer(self, customer_id: str, **fields: Any) -> dict[str, Any]:
        customer = self.customers.get(customer_id)
        if customer is None:
            customer = {
                "id": customer_id,
                "object": "customer",
                "address": None,
                "balance": 0,
                "created": int(self.state.now()),
                "currency": None,
                "default_source": None,
                "delinquent": False,
                "description": None,
                "email": None,
                "invoice_prefix": customer_id[-8:].upper(),
                "livemode": False,
                "metadata": {},
                "name": None,
                "phone": None,
                "preferred_locales": [],
                "shipping": None,
                "tax_exempt": "none",
                "test_clock": None,
            }
            self.customers[customer_id] = customer
            self.customer_order.append(customer_id)
        customer.update({k: v for k, v in fields.items() if v is not None})
        return customer

    # -- meter events ----------------------------------------------------------
    def ingest(
        self,
        *,
        event_name: Any,
        payload: Any,
        identifier: Any,
        timestamp: int | None,
        v2: bool = False,
        check_window: bool = True,
        delay: bool = True,
    ) -> MeterEvent:
        """Validate and record one meter event (v1, v2, stream and admin paths).

        The event is accepted now and processed `processing_delay_s` later
        (`delay=False`: at once); an event whose customer does not exist when it
        is processed is never counted and goes to the meter error reports."""
        now = int(self.state.now())
        if not event_name or not isinstance(event_name, str):
            raise _missing("event_name")
        if not isinstance(payload, dict) or not payload:
            raise _missing("payload")
        if identifier is None or identifier == "":
            identifier = new_id("sbx_", 28)
        if not isinstance(identifier, str) or len(identifier) > 100:
            raise stripe_error(
                "identifier must be a string of at most 100 characters.", param="identifier"
            )
        meter_id = self.meter_by_event.get(event_name)
        if meter_id is None:
            raise stripe_error(
                f"No active meter was found for event_name '{event_name}'.",
                code="no_meter",
                param="event_name",
            )
        previous = self.events.get(identifier)
        if previous is not None and now - previous.created < DEDUPE_WINDOW:
            if v2:
                raise stripe_error(
                    "A meter event with a duplicate identifier has already been submitted.",
                    code="duplicate_meter_event",
                    param="identifier",
                )
            raise stripe_error(
                f"An event already exists with identifier {identifier}.", param="identifier"
            )
        ts = now if timestamp is None else int(timestamp)
        if check_window and ts < now - MAX_PAST:
            raise stripe_error(
                "Timestamp must be within the past 35 calendar days.",
                code="timestamp_too_far_in_past",
                param="timestamp",
            )
        if check_window and ts > now + MAX_FUTURE:
            raise stripe_error(
                "Timestamp must not be more than 5 minutes in the future.",
                code="timestamp_in_future",
                param="timestamp",
            )
        meter = self.meters[meter_id]
        customer_key = meter["customer_mapping"]["event_payload_key"]
        value_key = meter["value_settings"]["event_payload_key"]
        customer = payload.get(customer_key)
        if not isinstance(customer, str) or not customer:
            raise stripe_error(
                f"Missing required payload key '{customer_key}' identifying the customer.",
                code="meter_event_no_customer_defined",
                param=f"payload[{customer_key}]",
            )
        value = 1
        if meter["default_aggregation"]["formula"] != "count":
            given = as_int(payload.get(value_key))
            if given is None:
                raise stripe_error(
                    f"payload[{value_key}] must be a whole number, got {payload.get(value_key)!r}.",
                    code="meter_event_invalid_value",
                    param=f"payload[{value_key}]",
                )
            value = given
        event = MeterEvent(
            identifier=identifier,
            event_name=event_name,
            meter_id=meter_id,
            customer=customer,
            value=value,
            timestamp=ts,
            created=now,
            payload={str(k): str(v) for k, v in payload.items()},
            due=now + (self.state.faults.processing_delay_s if delay else 0.0),
        )
        self.events[identifier] = event
        self.by_customer[customer].append(event)
        self.event_count += 1
        if customer in self.customers:
            self._accept(event, +1)
        self._schedule(event.due, event, cancel=False)
        self.process_due(self.state.now())
        return event

    # -- asynchronous processing ---------------------------------------------------
    def _schedule(self, due: float, event: MeterEvent, *, cancel: bool) -> None:
        self._seq += 1
        heapq.heappush(self.pending, (due, self._seq, cancel, event))

    def _accept(self, event: MeterEvent, sign: int) -> None:
        """Move the accepted-usage index (``/_sandbox/usage``): what will be there."""
        event.accepted = sign > 0
        tier = _tier_of(event.event_name)
        if tier is not None:
            self.state.usage.add(
                utc_date(event.timestamp), "stripe", event.customer, tier, sign * event.value, sign
            )

    def process_due(self, now: float) -> None:
        """Process every event and cancel due by `now`. Every request settles first,
        so a customer created after an event was due does not rescue it."""
        while self.pending and self.pending[0][0] <= now:
            due, _, is_cancel, event = heapq.heappop(self.pending)
            if is_cancel:
                if event.processed and not event.rejected and not event.cancel_applied:
                    event.cancel_applied = True
                    self._apply(event, -1)
                continue
            event.processed = True
            if event.customer not in self.customers:
                event.rejected = True
                if event.accepted:
                    self._accept(event, -1)
                self.errors.record(event, due)
                continue
            if not event.accepted and not event.cancelled:
                self._accept(event, +1)
            self._apply(event, +1)

    def _apply(self, event: MeterEvent, sign: int) -> None:
        """Move what the read APIs show: summaries and the processed-usage index."""
        series = self.series.get((event.meter_id, event.customer))
        if series is None:
            series = self.series[(event.meter_id, event.customer)] = Series()
        series.add(event.timestamp, sign * event.value, sign)
        tier = _tier_of(event.event_name)
        if tier is not None:
            self.state.processed_usage.add(
                utc_date(event.timestamp),
                "stripe",
                event.customer,
                tier,
                sign * event.value,
                sign,
            )

    def counted(self, event: MeterEvent, as_of: float) -> bool:
        """Whether `event` counts in an aggregate taken at `as_of` (processed by then,
        its customer known, not cancelled by then)."""
        if event.due > as_of or not event.processed or event.rejected:
            return False
        return event.cancel_due is None or event.cancel_due > as_of

    def cancel(self, event_name: Any, identifier: Any) -> dict[str, Any]:
        if not event_name:
            raise _missing("event_name")
        if not identifier:
            raise _missing("cancel[identifier]")
        event = self.events.get(identifier)
        if event is None or event.event_name != event_name:
            raise stripe_error(
                f"No meter event with identifier '{identifier}' exists for event_name "
                f"'{event_name}'.",
                param="cancel[identifier]",
            )
        now = self.state.now()
        if now - event.created > CANCEL_WINDOW:
            raise stripe_error(
                f"The meter event with identifier '{identifier}' can no longer be cancelled: "
                "cancellations are only possible within 24 hours of the event's creation.",
                param="cancel[identifier]",
            )
        if not event.cancelled:  # cancelling twice is a no-op, as Stripe's async processing
            event.cancelled = True
            if event.accepted:
                self._accept(event, -1)
            # Applied after the processing delay, never before the event itself.
            event.cancel_due = max(now + self.state.faults.processing_delay_s, event.due)
            self._schedule(event.cancel_due, event, cancel=True)
            self.process_due(now)
        return {
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": identifier},
            "event_name": event_name,
            "livemode": False,
            "status": "pending",
            "type": "cancel",
        }

    # -- subscriptions ---------------------------------------------------------
    def set_plan(
        self,
        customer_id: str,
        plan: str,
        *,
        status: str | None = None,
        period: tuple[int, Interval] | None = None,
        unit_amounts: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The customer's subscription (created with the customer when missing: a
        subscription implies its customer). `period` = (anchor, interval) gives it
        billing periods, and so invoices; `unit_amounts` = cents per second by tier."""
        self.ensure_customer(customer_id)
        now = int(self.state.now())
        sub = self.subscriptions.get(customer_id)
        if sub is None:
            sub_id = new_id("sub_")
            sub = {
                "id": sub_id,
                "object": "subscription",
                "application": None,
                "application_fee_percent": None,
                "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
                "billing_cycle_anchor": now,
                "billing_cycle_anchor_config": None,
                "billing_mode": {"type": "classic"},
                "billing_schedules": [],
                "billing_thresholds": None,
                "cancel_at": None,
                "cancel_at_period_end": False,
                "canceled_at": None,
                "cancellation_details": None,
                "collection_method": "charge_automatically",
                "created": now,
                "currency": "usd",
                "customer": customer_id,
                "customer_account": None,
                "days_until_due": None,
                "default_payment_method": None,
                "default_source": None,
                "default_tax_rates": [],
                "description": None,
                "discounts": [],
                "ended_at": None,
                "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
                "items": {
                    "object": "list",
                    "data": [],
                    "has_more": False,
                    "url": f"/v1/subscription_items?subscription={sub_id}",
                },
                "latest_invoice": None,
                "livemode": False,
                "metadata": {},
                "next_pending_invoice_item_invoice": None,
                "on_behalf_of": None,
                "pause_collection": None,
                "payment_settings": None,
                "pending_invoice_item_interval": None,
                "pending_setup_intent": None,
                "pending_update": None,
                "schedule": None,
                "start_date": now,
                "status": "active",
                "test_clock": None,
                "transfer_data": None,
                "trial_end": None,
                "trial_start": None,
            }
            self.subscriptions[customer_id] = sub
            self.subscription_order.append(customer_id)
        sub["metadata"] = {"plan": plan}
        if status is not None:
            sub["status"] = status
            if status == "canceled" and sub["canceled_at"] is None:
                sub["canceled_at"] = sub["ended_at"] = now
            if status == "trialing" and sub["trial_start"] is None:
                sub["trial_start"], sub["trial_end"] = now, now + 14 * DAY
        if period is not None:
            anchor, interval = period
            self.periods[sub["id"]] = (anchor, interval)
            self.sub_owner[sub["id"]] = customer_id
            sub["billing_cycle_anchor"] = anchor
            sub["start_date"] = anchor
        if unit_amounts is not None:
            self.unit_amounts[sub["id"]] = dict(unit_amounts)
        sub["items"]["data"] = [
            {
                "id": "si_" + sub["id"][4:],
                "object": "subscription_item",
                "created": sub["created"],
                "current_period_end": sub["created"] + 30 * DAY,
                "current_period_start": sub["created"],
                "discounts": [],
                "metadata": {"plan": plan},
                "price": {
                    "id": f"price_{plan}",
                    "object": "price",
                    "active": True,
                    "billing_scheme": "per_unit",
                    "created": sub["created"],
                    "currency": "usd",
                    "livemode": False,
                    "lookup_key": plan,
                    "metadata": {"plan": plan},
                    "nickname": plan,
                    "product": f"prod_plan_{plan}",
                    "recurring": {
                        "interval": "month",
                        "interval_count": 1,
                        "meter": None,
                        "usage_type": "licensed",
                    },
                    "type": "recurring",
                    "unit_amount": None,
                    "unit_amount_decimal": None,
                },
                "quantity": 1,
                "subscription": sub["id"],
                "tax_rates": [],
            }
        ]
        self.plans[sub["id"]] = plan
        return self.subscription_view(sub)

    def subscription_view(self, sub: dict[str, Any]) -> dict[str, Any]:
        """Refresh what moves with the clock and the meters: the current period on
        each item, and one metered item per tally tier meter for a subscription
        with billing periods."""
        billing = self.periods.get(sub["id"])
        if billing is None:
            return sub
        anchor, interval = billing
        current = period_at(anchor, interval, self.state.now()) or period(anchor, interval, 0)
        plan_item = sub["items"]["data"][0]
        plan_item["current_period_start"] = current.start
        plan_item["current_period_end"] = current.end
        metered = [
            self.metered_item(sub, meter_id, current.start, current.end)
            for meter_id in self.meter_order
        ]
        sub["items"]["data"] = [plan_item, *metered]
        return sub

    def metered_item(
        self, sub: dict[str, Any], meter_id: str, start: int, end: int
    ) -> dict[str, Any]:
        meter = self.meters[meter_id]
        tier = _tier_of(meter["event_name"]) or meter["event_name"]
        return {
            "id": f"si_{sub['id'][4:]}_{tier}",
            "object": "subscription_item",
            "created": sub["created"],
            "current_period_end": end,
            "current_period_start": start,
            "discounts": [],
            "metadata": {"tier": tier},
            "price": self.metered_price(sub, meter_id),
            "quantity": None,
            "subscription": sub["id"],
            "tax_rates": [],
        }

    def metered_price(self, sub: dict[str, Any], meter_id: str) -> dict[str, Any]:
        meter = self.meters[meter_id]
        tier = _tier_of(meter["event_name"]) or meter["event_name"]
        billing = self.periods.get(sub["id"])
        interval = billing[1].value if billing else "month"
        return {
            "id": f"price_tally_{tier}",
            "object": "price",
            "active": True,
            "billing_scheme": "per_unit",
            "created": meter["created"],
            "currency": "usd",
            "livemode": False,
            "lookup_key": f"tally_{tier}",
            "metadata": {"tier": tier},
            "nickname": f"{tier} instance seconds",
            "product": f"prod_tally_{tier}",
            "recurring": {
                "interval": interval,
                "interval_count": 1,
                "meter": meter_id,
                "usage_type": "metered",
            },
            "type": "recurring",
            "unit_amount": None,
            "unit_amount_decimal": self.unit_amounts.get(sub["id"], {}).get(tier, "0"),
        }


# -- request helpers -------------------------------------------------------------


def _limit(ctx: Ctx) -> int:
    raw = ctx.query.get("limit")
    if raw is None or raw == "":
        return 10
    value = as_int(raw)
    if value is None:
        raise stripe_error(f"Invalid integer: {raw}", param="limit")
    if not 1 <= value <= 100:
        raise stripe_error(
            "This value must be greater than or equal to 1 and less than or equal to 100.",
            param="limit",
        )
    return value


def _page(ctx: Ctx, items: list[dict[str, Any]], url: str, kind: str) -> dict[str, Any]:
    """Stripe cursor pagination over `items`, already newest first."""
    limit = _limit(ctx)
    after = ctx.query.get("starting_after")
    before = ctx.query.get("ending_before")
    ids = [item["id"] for item in items]
    if after:
        if after not in ids:
            raise _no_such(kind, after, "starting_after")
        start = ids.index(after) + 1
        data, has_more = items[start : start + limit], start + limit < len(items)
    elif before:
        if before not in ids:
            raise _no_such(kind, before, "ending_before")
        end = ids.index(before)
        start = max(0, end - limit)
        data, has_more = items[start:end], start > 0
    else:
        data, has_more = items[:limit], len(items) > limit
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def _query_int(ctx: Ctx, name: str) -> int:
    raw = ctx.query.get(name)
    if raw is None or raw == "":
        raise _missing(name)
    value = as_int(raw)
    if value is None:
        raise stripe_error(f"Invalid integer: {raw}", param=name)
    return value


def _get_meter(state: SandboxState, meter_id: str) -> dict[str, Any]:
    meter = state.stripe.meters.get(meter_id)
    if meter is None:
        raise _no_such("billing.meter", meter_id)
    return meter


def _get_customer(state: SandboxState, customer_id: str) -> dict[str, Any]:
    customer = state.stripe.customers.get(customer_id)
    if customer is None:
        raise _no_such("customer", customer_id, "customer")
    return customer


# -- v1 handlers -------------------------------------------------------------------


def h_create_meter(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    return 200, state.stripe.create_meter(ctx.form)


def h_list_meters(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    status = ctx.query.get("status")
    if status not in (None, "active", "inactive"):
        raise stripe_error("Invalid status: must be one of active or inactive.", param="status")
    store = state.stripe
    items = [store.meters[m] for m in reversed(store.meter_order)]
    if status:
        items = [m for m in items if m["status"] == status]
    return 200, _page(ctx, items, "/v1/billing/meters", "billing.meter")


def h_get_meter(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    return 200, _get_meter(state, ctx.params["id"])


def h_create_meter_event(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    form = ctx.form
    timestamp = None
    if form.get("timestamp") not in (None, ""):
        timestamp = as_int(form["timestamp"])
        if timestamp is None:
            raise stripe_error(f"Invalid integer: {form['timestamp']}", param="timestamp")
    event = state.stripe.ingest(
        event_name=form.get("event_name"),
        payload=form.get("payload"),
        identifier=form.get("identifier"),
        timestamp=timestamp,
    )
    return 200, event.as_v1()


def h_create_adjustment(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    form = ctx.form
    if not form.get("type"):
        raise _missing("type")
    if form["type"] != "cancel":
        raise stripe_error("Invalid type: must be cancel.", param="type")
    cancel = form.get("cancel")
    identifier = cancel.get("identifier") if isinstance(cancel, dict) else None
    return 200, state.stripe.cancel(form.get("event_name"), identifier)


def _summary_id(meter_id: str, customer: str, start: int, end: int) -> str:
    digest = hashlib.sha1(f"{meter_id}|{customer}".encode()).hexdigest()[:12]
    return f"mtrusg_test_{start}_{end}_{digest}"


def _summary_start(summary_id: str, param: str) -> int:
    parts = summary_id.split("_")
    if len(parts) != 5 or not parts[2].isdigit():
        raise _no_such("billing.meter_event_summary", summary_id, param)
    return int(parts[2])


def h_event_summaries(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    meter = _get_meter(state, ctx.params["id"])
    customer = ctx.query.get("customer")
    if not customer:
        raise _missing("customer")
    start = _query_int(ctx, "start_time")
    end = _query_int(ctx, "end_time")
    window = ctx.query.get("value_grouping_window") or None
    steps = {None: MINUTE, "hour": HOUR, "day": DAY}
    if window not in steps:
        raise stripe_error(
            "Invalid value_grouping_window: must be one of day or hour.",
            param="value_grouping_window",
        )
    step = steps[window]
    boundary = {MINUTE: "minute", HOUR: "hour", DAY: "day (00:00 UTC)"}[step]
    for name, value in (("start_time", start), ("end_time", end)):
        if value % step:
            raise stripe_error(
                f"{name} must be aligned with {boundary} boundaries"
                + (f" when value_grouping_window is {window}." if window else "."),
                param=name,
            )
    if end <= start:
        raise stripe_error("end_time must be after start_time.", param="end_time")
    limit = _limit(ctx)
    series = state.stripe.series.get((meter["id"], customer))
    formula_index = 1 if meter["default_aggregation"]["formula"] == "count" else 0

    windows: list[tuple[int, int, int]] = []  # (start, end, value), newest first
    if window is None:
        total = 0
        if series is not None:
            total = sum(
                cell[formula_index] for ts, cell in series.minute.items() if start <= ts < end
            )
        windows.append((start, end, total))
    elif series is not None:
        buckets = series.day if window == "day" else series.hour
        for w in range(end - step, start - 1, -step):
            cell = buckets.get(w)
            if cell is not None and cell[1] > 0:
                windows.append((w, w + step, cell[formula_index]))

    after = ctx.query.get("starting_after")
    before = ctx.query.get("ending_before")
    if after:
        cursor = _summary_start(after, "starting_after")
        rest = [w for w in windows if w[0] < cursor]
        page, has_more = rest[:limit], len(rest) > limit
    elif before:
        cursor = _summary_start(before, "ending_before")
        rest = [w for w in windows if w[0] > cursor]
        page, has_more = rest[-limit:], len(rest) > limit
    else:
        page, has_more = windows[:limit], len(windows) > limit
    data = [
        {
            "id": _summary_id(meter["id"], customer, s, e),
            "object": "billing.meter_event_summary",
            "aggregated_value": value,
            "end_time": e,
            "livemode": False,
            "meter": meter["id"],
            "start_time": s,
        }
        for s, e, value in page
    ]
    url = f"/v1/billing/meters/{meter['id']}/event_summaries"
    return 200, {"object": "list", "data": data, "has_more": has_more, "url": url}


def h_create_customer(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    form = ctx.form
    store = state.stripe
    # `id` is a sandbox extension so tally can mirror the control plane's 'cus_…' ids.
    customer_id = form.get("id") or new_id("cus_", 14)
    if customer_id in store.customers:
        raise stripe_error(
            f"Customer already exists: '{customer_id}'.",
            code="resource_already_exists",
            param="id",
        )
    metadata = form.get("metadata") if isinstance(form.get("metadata"), dict) else None
    customer = store.ensure_customer(
        customer_id,
        email=form.get("email") or None,
        name=form.get("name") or None,
        description=form.get("description") or None,
        metadata=metadata,
    )
    return 200, customer


def h_list_customers(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    store = state.stripe
    items = [store.customers[c] for c in reversed(store.customer_order)]
    email = ctx.query.get("email")
    if email:
        items = [c for c in items if c["email"] == email]
    return 200, _page(ctx, items, "/v1/customers", "customer")


def h_get_customer(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    return 200, _get_customer(state, ctx.params["customer"])


def h_create_balance_txn(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    customer = _get_customer(state, ctx.params["customer"])
    form = ctx.form
    if form.get("amount") in (None, ""):
        raise _missing("amount")
    amount = as_int(form["amount"])
    if amount is None:
        raise stripe_error(f"Invalid integer: {form['amount']}", param="amount")
    currency = form.get("currency")
    if not currency:
        raise _missing("currency")
    currency = str(currency).lower()
    if len(currency) != 3 or not currency.isalpha():
        raise stripe_error(f"Invalid currency: {currency}.", param="currency")
    description = form.get("description") or None
    if description is not None and len(description) > 350:
        raise stripe_error("description is longer than 350 characters.", param="description")
    metadata = form.get("metadata")
    if metadata in (None, ""):
        metadata = {}
    if not isinstance(metadata, dict):
        raise stripe_error("Invalid metadata: must be a hash.", param="metadata")
    if customer["currency"] is None:
        customer["currency"] = currency
    customer["balance"] += amount
    txn = {
        "id": new_id("cbtxn_"),
        "object": "customer_balance_transaction",
        "amount": amount,
        "checkout_session": None,
        "created": int(state.now()),
        "credit_note": None,
        "currency": currency,
        "customer": customer["id"],
        "customer_account": None,
        "description": description,
        "ending_balance": customer["balance"],
        "invoice": None,
        "livemode": False,
        "metadata": {str(k): str(v) for k, v in metadata.items()},
        "type": "adjustment",
    }
    state.stripe.balance_txns[customer["id"]].append(txn)
    return 200, txn


def h_list_balance_txns(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    customer = _get_customer(state, ctx.params["customer"])
    items = list(reversed(state.stripe.balance_txns.get(customer["id"], [])))
    url = f"/v1/customers/{customer['id']}/balance_transactions"
    return 200, _page(ctx, items, url, "customer_balance_transaction")


SUBSCRIPTION_STATUSES = (
    "active",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "past_due",
    "paused",
    "trialing",
    "unpaid",
)


def h_list_subscriptions(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    """Stripe's default lists every subscription that is not canceled; `status`
    narrows to one status, `all` includes canceled ones, `ended` only those."""
    store = state.stripe
    status = ctx.query.get("status") or None
    if status not in (None, "all", "ended", *SUBSCRIPTION_STATUSES):
        raise stripe_error(f"Invalid status: {status}.", param="status")
    customer = ctx.query.get("customer")
    if customer:
        sub = store.subscriptions.get(customer)
        items = [sub] if sub is not None else []
    else:
        items = [store.subscriptions[c] for c in reversed(store.subscription_order)]
    if status is None:
        items = [s for s in items if s["status"] not in ("canceled", "incomplete_expired")]
    elif status == "ended":
        items = [s for s in items if s["status"] in ("canceled", "incomplete_expired")]
    elif status != "all":
        items = [s for s in items if s["status"] == status]
    items = [store.subscription_view(s) for s in items]
    return 200, _page(ctx, items, "/v1/subscriptions", "subscription")


def h_get_subscription(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    store = state.stripe
    wanted = ctx.params["subscription_exposed_id"]
    for sub in store.subscriptions.values():
        if sub["id"] == wanted:
            return 200, store.subscription_view(sub)
    raise _no_such("subscription", wanted, "id")


INVOICE_STATUSES = ("draft", "open", "paid", "uncollectible", "void")


def h_list_invoices(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    status = ctx.query.get("status") or None
    if status not in (None, *INVOICE_STATUSES):
        raise stripe_error(
            "Invalid status: must be one of draft, open, paid, uncollectible, or void.",
            param="status",
        )
    items = state.stripe.invoices.listed(
        customer=ctx.query.get("customer") or None,
        subscription=ctx.query.get("subscription") or None,
        status=status,
    )
    return 200, _page(ctx, items, "/v1/invoices", "invoice")


def _get_invoice(state: SandboxState, invoice_id: str) -> dict[str, Any]:
    invoice = state.stripe.invoices.view(invoice_id)
    if invoice is None:
        raise _no_such("invoice", invoice_id, "invoice")
    return invoice


def h_get_invoice(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    return 200, _get_invoice(state, ctx.params["invoice"])


def h_invoice_lines(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    invoice = _get_invoice(state, ctx.params["invoice"])
    lines = invoice["lines"]["data"]
    return 200, _page(ctx, lines, f"/v1/invoices/{invoice['id']}/lines", "line_item")


def h_create_preview(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    """The upcoming invoice: the current period's lines as Stripe has processed
    them so far (`customer` and/or `subscription`)."""
    store = state.stripe
    form = ctx.form
    customer = form.get("customer") or None
    subscription = form.get("subscription") or None
    if customer is None and subscription is None:
        raise stripe_error(
            "Must provide at least one of customer, customer_account, subscription, or schedule.",
            param="customer",
        )
    if subscription is not None:
        owner = next(
            (c for c, sub in store.subscriptions.items() if sub["id"] == subscription), None
        )
        if owner is None or (customer is not None and owner != customer):
            raise _no_such("subscription", str(subscription), "subscription")
        customer = owner
    if customer not in store.customers:
        raise _no_such("customer", str(customer), "customer")
    preview = store.invoices.upcoming(str(customer))
    if preview is None:
        raise stripe_error(
            f"No upcoming invoices for customer: {customer}",
            status=404,
            code="invoice_upcoming_none",
        )
    return 200, preview


# -- v2 handlers (JSON bodies) ----------------------------------------------------


def _v2_error(error: ApiError) -> ApiError:
    """v2 errors require `code`; reuse the v1 error with a code filled in."""
    body = dict(error.payload["error"])
    body.setdefault("code", "invalid_request")
    body.pop("doc_url", None)
    return ApiError(error.status, {"error": body}, error.headers)


def _json_body(ctx: Ctx) -> dict[str, Any]:
    try:
        body = json.loads(ctx.body or b"{}")
    except ValueError as exc:
        raise _v2_error(stripe_error("The request body is not valid JSON.")) from exc
    if not isinstance(body, dict):
        raise _v2_error(stripe_error("The request body must be a JSON object."))
    return body


def _v2_timestamp(raw: Any) -> int | None:
    if raw in (None, ""):
        return None
    parsed = parse_iso(raw)
    if parsed is None:
        raise stripe_error(f"Invalid timestamp: {raw!r}.", param="timestamp")
    return floor_to(parsed, 1)


def h_v2_session(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    now = state.now()
    token = new_id("mesat_test_", 32)
    state.stripe.sessions[token] = now + SESSION_TTL
    return 200, {
        "id": new_id("mtes_test_"),
        "object": "v2.billing.meter_event_session",
        "authentication_token": token,
        "created": iso(now),
        "expires_at": iso(now + SESSION_TTL),
        "livemode": False,
    }


def h_v2_stream(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    expires = state.stripe.sessions.get(ctx.bearer)
    if expires is not None and state.now() >= expires:
        raise ApiError(
            401,
            {
                "error": {
                    "type": "temporary_session_expired",
                    "code": "billing_meter_event_session_expired",
                    "message": "The meter event session has expired; create a new one.",
                    "doc_url": "https://docs.stripe.com/api/v2/billing/meter-event-stream",
                }
            },
        )
    body = _json_body(ctx)
    events = body.get("events")
    if not isinstance(events, list) or not 1 <= len(events) <= 100:
        raise _v2_error(stripe_error("events must be a list of 1 to 100 events.", param="events"))
    # Stream events are validated asynchronously by Stripe: invalid ones and
    # duplicates are dropped (reported later), the request itself succeeds.
    for item in events:
        try:
            if not isinstance(item, dict):
                raise stripe_error("Each event must be an object.")
            state.stripe.ingest(
                event_name=item.get("event_name"),
                payload=item.get("payload"),
                identifier=item.get("identifier"),
                timestamp=_v2_timestamp(item.get("timestamp")),
                v2=True,
            )
        except ApiError:
            state.stats.bump("stripe", "stream_rejected")
    return 200, {}


def h_v2_meter_event(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    body = _json_body(ctx)
    try:
        event = state.stripe.ingest(
            event_name=body.get("event_name"),
            payload=body.get("payload"),
            identifier=body.get("identifier"),
            timestamp=_v2_timestamp(body.get("timestamp")),
            v2=True,
        )
    except ApiError as error:
        raise _v2_error(error) from None
    return 200, event.as_v2()


def h_v2_events(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    """Thin events; the sandbox emits only meter error reports (see stripe_errors)."""
    found = state.stripe.errors.events(ctx.query.get("object_id") or None)
    types = ctx.query.getlist("types") or ctx.query.getlist("types[]")
    if types:
        found = [e for e in found if e["type"] in types]
    return 200, {"data": found, "next_page_url": None, "previous_page_url": None}


def h_v2_event(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    event = state.stripe.errors.reports.get(ctx.params["id"])
    if event is None:
        raise _v2_error(_no_such("event", ctx.params["id"]))
    return 200, event


# -- provider spec -------------------------------------------------------------------


def _unauthorized(ctx: Ctx) -> ApiError:
    return stripe_error(
        "You did not provide an API key. You need to provide your API key in the "
        "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
        status=401,
    )


def _rate_limited(retry_after: int) -> ApiError:
    error = stripe_error(
        "Too many requests hit the API too quickly. We recommend an exponential backoff "
        "of your requests.",
        status=429,
        code="rate_limit",
    )
    error.payload["error"].pop("doc_url", None)
    return error


def _server_error(message: str) -> ApiError:
    return stripe_error(message, status=500, type="api_error")


def _unknown_route(ctx: Ctx) -> ApiError:
    return stripe_error(
        f"Unrecognized request URL ({ctx.method}: {ctx.path}). Please see "
        "https://stripe.com/docs or we can help at https://support.stripe.com/.",
        status=404,
    )


ROUTES = [
    ProviderRoute("POST", "/v1/billing/meters", h_create_meter, writes=True),
    ProviderRoute("GET", "/v1/billing/meters", h_list_meters),
    ProviderRoute("GET", "/v1/billing/meters/{id}", h_get_meter),
    ProviderRoute("GET", "/v1/billing/meters/{id}/event_summaries", h_event_summaries),
    ProviderRoute("POST", "/v1/billing/meter_events", h_create_meter_event, writes=True),
    ProviderRoute("POST", "/v1/billing/meter_event_adjustments", h_create_adjustment, writes=True),
    ProviderRoute("POST", "/v1/customers", h_create_customer, writes=True),
    ProviderRoute("GET", "/v1/customers", h_list_customers),
    ProviderRoute("GET", "/v1/customers/{customer}", h_get_customer),
    ProviderRoute(
        "POST",
        "/v1/customers/{customer}/balance_transactions",
        h_create_balance_txn,
        writes=True,
    ),
    ProviderRoute("GET", "/v1/customers/{customer}/balance_transactions", h_list_balance_txns),
    ProviderRoute("GET", "/v1/subscriptions", h_list_subscriptions),
    ProviderRoute("GET", "/v1/subscriptions/{subscription_exposed_id}", h_get_subscription),
    ProviderRoute("GET", "/v1/invoices", h_list_invoices),
    ProviderRoute("POST", "/v1/invoices/create_preview", h_create_preview),
    ProviderRoute("GET", "/v1/invoices/{invoice}", h_get_invoice),
    ProviderRoute("GET", "/v1/invoices/{invoice}/lines", h_invoice_lines),
    ProviderRoute("GET", "/v2/core/events", h_v2_events),
    ProviderRoute("GET", "/v2/core/events/{id}", h_v2_event),
    ProviderRoute("POST", "/v2/billing/meter_event_session", h_v2_session, writes=True),
    ProviderRoute("POST", "/v2/billing/meter_event_stream", h_v2_stream, writes=True),
    ProviderRoute("POST", "/v2/billing/meter_events", h_v2_meter_event, writes=True),
]

SPEC = ProviderSpec(
    name="stripe",
    routes=ROUTES,
    unauthorized=_unauthorized,
    rate_limited=_rate_limited,
    server_error=_server_error,
    unknown_route=_unknown_route,
    idempotent_posts=True,
)
