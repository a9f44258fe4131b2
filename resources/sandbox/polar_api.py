"""Polar half of the sandbox (API version 2026-10): events ingest and list,
meters (list, create, get, quantities), customers, subscriptions.

Answers follow the Polar OpenAPI excerpt in shared/reference and are parsed by
the real `polar-sdk`. Behaviour mirrors Polar's server code:

* ``POST /v1/events/ingest`` validates the whole batch first (any invalid
  event -> 422 ``{"error": "RequestValidationError", "detail": [...]}`` and
  nothing is stored): a timestamp in the future (beyond FUTURE_TOLERANCE, Polar
  itself allows none) or an unknown ``customer_id``. Then events whose
  ``external_id`` was ever seen (also earlier in the same batch) are skipped
  and counted: ``{"inserted": n, "duplicates": m}``, permanently.
* A meter is a filter over events (``name``, ``source`` or metadata keys;
  a ``metadata.`` prefix is stripped as Polar does) and an aggregation;
  ``sum``/``max``/``min``/``avg`` only count events whose property is a number.
* Quantities buckets run from trunc(start) to trunc(end) **inclusive** (Postgres
  ``generate_series``), each bucket holds events with trunc(timestamp) equal to
  it, and ``total`` aggregates all of them. Several ``customer_id`` /
  ``external_customer_id`` values are aggregated together.

Sums are kept per (meter, customer, hour) and (meter, customer, day) as events
arrive, so quantities never scan events.
"""

from __future__ import annotations

import json
import math
import uuid
from calendar import monthrange
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .common import DAY, HOUR, ApiError, as_int, floor_to, iso, parse_iso, utc_date
from .periods import Interval, period, period_at
from .polar_orders import PolarOrders
from .routing import Ctx, ProviderRoute, ProviderSpec

if TYPE_CHECKING:
    from .state import SandboxState

TALLY_EVENT_NAME = "tally.instance_usage"
FUTURE_TOLERANCE = 5.0  # seconds of clock skew accepted on ingest
ALL = "*"  # key of the all-customers series
INTERVALS = ("year", "month", "week", "day", "hour")
FILTER_OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "like", "not_like")
PROPERTY_FUNCS = ("sum", "max", "min", "avg")
EVENT_FIELDS = ("name", "source")
PLAN_AMOUNTS = {"base-plus-usage": 2000}
MAX_BUCKETS = 50_000


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    return ApiError(422, {"error": "RequestValidationError", "detail": errors})


def _verr(loc: list[Any], msg: str, type_: str = "value_error", input_: Any = None) -> dict:
    return {"type": type_, "loc": loc, "msg": msg, "input": input_}


def not_found(detail: str = "Not found") -> ApiError:
    return ApiError(404, {"error": "ResourceNotFound", "detail": detail})


def _strip_metadata_prefix(value: str) -> str:
    return value[len("metadata.") :] if value.startswith("metadata.") else value


@dataclass(slots=True)
class PolarEvent:
    id: str
    name: str
    key: str  # external customer id, or "id:<customer uuid>" when there is none
    customer_id: str | None
    external_customer_id: str | None
    external_id: str | None
    timestamp: float
    metadata: dict[str, Any]
    ingested_at: float = 0.0  # sandbox clock when Polar received it: bills the period


class Cells:
    """[sum, count, max, min] per hour and per UTC day for one (meter, customer)."""

    __slots__ = ("hour", "day")

    def __init__(self) -> None:
        self.hour: dict[int, list[float]] = {}
        self.day: dict[int, list[float]] = {}

    def add(self, ts: float, value: float) -> None:
        for step, buckets in ((HOUR, self.hour), (DAY, self.day)):
            start = floor_to(ts, step)
            cell = buckets.get(start)
            if cell is None:
                buckets[start] = [value, 1, value, value]
            else:
                cell[0] += value
                cell[1] += 1
                cell[2] = max(cell[2], value)
                cell[3] = min(cell[3], value)


def _merge(a: list[float] | None, b: list[float] | None) -> list[float] | None:
    if a is None:
        return list(b) if b is not None else None
    if b is None:
        return a
    return [a[0] + b[0], a[1] + b[1], max(a[2], b[2]), min(a[3], b[3])]


def _finish(cell: list[float] | None, func: str) -> float:
    if cell is None or cell[1] == 0:
        return 0.0
    if func == "count":
        return float(cell[1])
    if func == "max":
        return float(cell[2])
    if func == "min":
        return float(cell[3])
    if func == "avg":
        return float(cell[0]) / cell[1]
    return float(cell[0])


# -- filters ----------------------------------------------------------------------


def _str_value(value: Any) -> str:
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "eq":
        return left == right
    if op == "ne":
        return left != right
    if op == "gt":
        return left > right
    if op == "gte":
        return left >= right
    if op == "lt":
        return left < right
    if op == "lte":
        return left <= right
    if op == "like":
        return str(right) in str(left)
    return str(right) not in str(left)  # not_like


def _clause_matches(clause: dict[str, Any], event: PolarEvent) -> bool:
    prop, op, value = clause["property"], clause["operator"], clause["value"]
    if prop in EVENT_FIELDS:
        attr: Any = event.name if prop == "name" else "user"
        if op in ("like", "not_like"):
            return _compare(op, attr, _str_value(value))
        return isinstance(value, str) and _compare(op, attr, value)
    if prop not in event.metadata:
        return False  # SQL NULL: no comparison holds
    attr = event.metadata[prop]
    if op in ("like", "not_like"):
        return _compare(op, _str_value(attr), _str_value(value))
    if isinstance(attr, str):
        return _compare(op, attr, _str_value(value))
    if isinstance(attr, bool):
        return isinstance(value, bool) and _compare(op, attr, value)
    if isinstance(attr, int | float):
        if isinstance(value, str):
            return False
        return _compare(op, float(attr), float(value))
    return False


def filter_matches(flt: dict[str, Any], event: PolarEvent) -> bool:
    results = (
        filter_matches(c, event) if "conjunction" in c else _clause_matches(c, event)
        for c in flt["clauses"]
    )
    if not flt["clauses"]:
        return True
    return all(results) if flt["conjunction"] == "and" else any(results)


def aggregation_value(aggregation: dict[str, Any], event: PolarEvent) -> float | None:
    """The event's contribution to a meter, or None when the meter ignores it."""
    if aggregation["func"] == "count":
        return 1.0
    raw = event.metadata.get(aggregation["property"])
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    return float(raw)


def _validate_filter(raw: Any, loc: list[Any], errors: list[dict]) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        errors.append(_verr(loc, "Input should be a valid dictionary", "dict_type", raw))
        return None
    conjunction = raw.get("conjunction")
    if conjunction not in ("and", "or"):
        errors.append(
            _verr(loc + ["conjunction"], "Input should be 'and' or 'or'", "enum", conjunction)
        )
    clauses = raw.get("clauses")
    if not isinstance(clauses, list):
        errors.append(
            _verr(loc + ["clauses"], "Input should be a valid list", "list_type", clauses)
        )
        return None
    out: list[dict[str, Any]] = []
    for i, clause in enumerate(clauses):
        cloc = loc + ["clauses", i]
        if isinstance(clause, dict) and "conjunction" in clause:
            nested = _validate_filter(clause, cloc, errors)
            if nested is not None:
                out.append(nested)
            continue
        if not isinstance(clause, dict):
            errors.append(_verr(cloc, "Input should be a valid dictionary", "dict_type", clause))
            continue
        prop, op, value = clause.get("property"), clause.get("operator"), clause.get("value")
        if not isinstance(prop, str):
            errors.append(_verr(cloc + ["property"], "Field required", "missing", prop))
            continue
        if op not in FILTER_OPERATORS:
            errors.append(
                _verr(cloc + ["operator"], "Input should be a valid operator", "enum", op)
            )
            continue
        if not isinstance(value, str | int | bool) or isinstance(value, float):
            errors.append(
                _verr(
                    cloc + ["value"],
                    "Input should be a string, integer or boolean",
                    "union_type",
                    value,
                )
            )
            continue
        out.append({"property": _strip_metadata_prefix(prop), "operator": op, "value": value})
    return {"conjunction": conjunction, "clauses": out}


# -- time buckets -------------------------------------------------------------------


def trunc(ts: float, interval: str) -> datetime:
    dt = datetime.fromtimestamp(math.floor(ts), UTC)
    if interval == "hour":
        return dt.replace(minute=0, second=0, microsecond=0)
    day = dt.replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "day":
        return day
    if interval == "week":
        return day - timedelta(days=day.weekday())
    if interval == "month":
        return day.replace(day=1)
    return day.replace(month=1, day=1)


def next_bucket(dt: datetime, interval: str) -> datetime:
    if interval == "hour":
        return dt + timedelta(hours=1)
    if interval == "day":
        return dt + timedelta(days=1)
    if interval == "week":
        return dt + timedelta(days=7)
    if interval == "month":
        return dt + timedelta(days=monthrange(dt.year, dt.month)[1])
    return dt.replace(year=dt.year + 1)


class PolarStore:
    def __init__(self, state: SandboxState) -> None:
        self.state = state
        self.organization_id = str(uuid.uuid4())
        self.customers: dict[str, dict[str, Any]] = {}
        self.customer_order: list[str] = []
        self.by_external: dict[str, str] = {}
        self.by_email: dict[str, str] = {}
        self.events: list[PolarEvent] = []
        self.by_external_id: dict[str, PolarEvent] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.meter_order: list[str] = []
        self.cells: dict[str, dict[str, Cells]] = {}  # meter id -> key -> cells
        self.subscriptions: dict[str, dict[str, Any]] = {}  # customer id -> subscription
        self.subscription_order: list[str] = []
        self.periods: dict[str, tuple[int, Interval]] = {}  # subscription id -> billing
        self.sub_owner: dict[str, str] = {}  # subscription id -> customer key
        self.unit_amounts: dict[str, dict[str, str]] = {}  # subscription id -> tier -> cents
        self.orders = PolarOrders(self)

    # -- customers ---------------------------------------------------------------
    def create_customer(
        self,
        *,
        email: str | None,
        external_id: str | None = None,
        name: str | None = None,
        type_: str = "individual",
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        now = iso(self.state.now())
        customer_id = str(uuid.uuid4())
        customer: dict[str, Any] = {
            "id": customer_id,
            "created_at": now,
            "modified_at": None,
            "metadata": metadata or {},
            "external_id": external_id,
            "email": email,
            "email_verified": False,
            "type": type_,
            "name": name,
            "billing_name": name,
            "billing_address": None,
            "tax_id": None,
            "locale": None,
            "organization_id": self.organization_id,
            "default_payment_method_id": None,
            "deleted_at": None,
            "first_user_event_at": None,
            "avatar_url": None,
        }
        self.customers[customer_id] = customer
        self.customer_order.append(customer_id)
        if external_id is not None:
            self.by_external[external_id] = customer_id
        if email is not None:
            self.by_email[email.lower()] = customer_id
        return customer

    def ensure_external_customer(
        self, external_id: str, *, name: str | None = None, email: str | None = None
    ) -> bool:
        """Create (or update) the customer with this external id; True when created.
        An email another customer already has is kept off the index, not refused:
        several orgs may share one billing address."""
        cid = self.by_external.get(external_id)
        if cid is not None:
            customer = self.customers[cid]
            customer.update({k: v for k, v in (("name", name), ("email", email)) if v})
            if name:
                customer["billing_name"] = name
            return False
        address = email or f"{external_id}@sandbox.invalid"
        taken = address.lower() in self.by_email
        customer = self.create_customer(email=None, external_id=external_id, name=name)
        customer["email"] = address
        if not taken:
            self.by_email[address.lower()] = customer["id"]
        return True

    def customer_for_key(self, key: str) -> dict[str, Any] | None:
        if key.startswith("id:"):
            return self.customers.get(key[3:])
        cid = self.by_external.get(key)
        return self.customers.get(cid) if cid else None

    # -- events ------------------------------------------------------------------
    def store_event(
        self,
        *,
        name: str,
        key: str,
        customer_id: str | None,
        external_customer_id: str | None,
        external_id: str | None,
        timestamp: float,
        metadata: dict[str, Any],
    ) -> PolarEvent:
        event = PolarEvent(
            id=str(uuid.uuid4()),
            name=name,
            key=key,
            customer_id=customer_id,
            external_customer_id=external_customer_id,
            external_id=external_id,
            timestamp=timestamp,
            metadata=metadata,
            ingested_at=self.state.now(),
        )
        self.events.append(event)
        if external_id is not None:
            self.by_external_id[external_id] = event
        for meter_id, meter in self.meters.items():
            self._count(meter_id, meter, event)
        customer = self.customer_for_key(key)
        if customer is not None and customer["first_user_event_at"] is None:
            customer["first_user_event_at"] = iso(timestamp)
        if name == TALLY_EVENT_NAME:
            tier, seconds = metadata.get("tier"), metadata.get("seconds")
            if isinstance(seconds, float) and seconds.is_integer():
                seconds = int(seconds)
            if isinstance(tier, str) and isinstance(seconds, int) and not isinstance(seconds, bool):
                who = key[3:] if key.startswith("id:") else key
                for index in (self.state.usage, self.state.processed_usage):
                    index.add(utc_date(timestamp), "polar", who, tier, int(seconds), 1)
        return event

    def _count(self, meter_id: str, meter: dict[str, Any], event: PolarEvent) -> None:
        if not filter_matches(meter["filter"], event):
            return
        value = aggregation_value(meter["aggregation"], event)
        if value is None:
            return
        per_key = self.cells[meter_id]
        for key in (event.key, ALL):
            cells = per_key.get(key)
            if cells is None:
                cells = per_key[key] = Cells()
            cells.add(event.timestamp, value)

    # -- meters ------------------------------------------------------------------
    def create_meter(self, body: dict[str, Any]) -> dict[str, Any]:
        errors: list[dict[str, Any]] = []
        name = body.get("name")
        if not isinstance(name, str):
            errors.append(_verr(["body", "name"], "Field required", "missing", name))
        elif len(name) < 3:
            errors.append(
                _verr(
                    ["body", "name"],
                    "String should have at least 3 characters",
                    "string_too_short",
                    name,
                )
            )
        flt = _validate_filter(body.get("filter"), ["body", "filter"], errors)
        aggregation = body.get("aggregation")
        agg_out: dict[str, Any] | None = None
        if not isinstance(aggregation, dict):
            errors.append(_verr(["body", "aggregation"], "Field required", "missing", aggregation))
        else:
            func = aggregation.get("func", "count")
            if func == "count":
                agg_out = {"func": "count"}
            elif func in PROPERTY_FUNCS:
                prop = aggregation.get("property")
                if not isinstance(prop, str) or not prop:
                    errors.append(
                        _verr(
                            ["body", "aggregation", func, "property"],
                            "Field required",
                            "missing",
                            prop,
                        )
                    )
                else:
                    agg_out = {"func": func, "property": _strip_metadata_prefix(prop)}
            else:
                errors.append(
                    _verr(
                        ["body", "aggregation", "func"],
                        "The sandbox supports count, sum, max, min and avg meters.",
                        "enum",
                        func,
                    )
                )
        unit = body.get("unit", "scalar")
        if unit not in ("scalar", "token", "custom"):
            errors.append(
                _verr(
                    ["body", "unit"], "Input should be 'scalar', 'token' or 'custom'", "enum", unit
                )
            )
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            errors.append(
                _verr(
                    ["body", "metadata"],
                    "Input should be a valid dictionary",
                    "dict_type",
                    metadata,
                )
            )
        if errors:
            raise validation_error(errors)
        assert flt is not None and agg_out is not None
        meter = {
            "metadata": metadata,
            "created_at": iso(self.state.now()),
            "modified_at": None,
            "id": str(uuid.uuid4()),
            "name": name,
            "unit": unit,
            "custom_label": body.get("custom_label"),
            "custom_multiplier": body.get("custom_multiplier"),
            "filter": flt,
            "aggregation": agg_out,
            "organization_id": self.organization_id,
            "archived_at": None,
        }
        self.meters[meter["id"]] = meter
        self.meter_order.append(meter["id"])
        self.cells[meter["id"]] = {}
        for event in self.events:  # a new meter also counts the events already ingested
            self._count(meter["id"], meter, event)
        return meter

    def ensure_tier_meter(self, tier: str) -> dict[str, Any]:
        for meter in self.meters.values():
            clauses = meter["filter"]["clauses"]
            if {"property": "tier", "operator": "eq", "value": tier} in clauses and any(
                c.get("property") == "name" and c.get("value") == TALLY_EVENT_NAME for c in clauses
            ):
                return meter
        return self.create_meter(
            {
                "name": f"tally instance seconds ({tier})",
                "filter": {
                    "conjunction": "and",
                    "clauses": [
                        {"property": "name", "operator": "eq", "value": TALLY_EVENT_NAME},
                        {"property": "metadata.tier", "operator": "eq", "value": tier},
                    ],
                },
                "aggregation": {"func": "sum", "property": "metadata.seconds"},
            }
        )

    def quantities(
        self,
        meter: dict[str, Any],
        start: float,
        end: float,
        interval: str,
        keys: list[str],
        customer_func: str | None,
    ) -> dict[str, Any]:
        func = meter["aggregation"]["func"]
        per_key = self.cells[meter["id"]]
        buckets: list[datetime] = []
        cursor, last = trunc(start, interval), trunc(end, interval)
        while cursor <= last:
            buckets.append(cursor)
            cursor = next_bucket(cursor, interval)
            if len(buckets) > MAX_BUCKETS:
                raise validation_error(
                    [
                        _verr(
                            ["query", "interval"],
                            f"The period holds more than {MAX_BUCKETS} {interval} buckets.",
                            "value_error",
                            interval,
                        )
                    ]
                )
        stamps = [int(b.timestamp()) for b in buckets]

        def key_cells(key: str) -> list[list[float] | None]:
            cells = per_key.get(key)
            if cells is None:
                return [None] * len(stamps)
            if interval in ("hour", "day"):
                source = cells.hour if interval == "hour" else cells.day
                return [source.get(s) for s in stamps]
            index = {s: i for i, s in enumerate(stamps)}
            out: list[list[float] | None] = [None] * len(stamps)
            for day_start, cell in cells.day.items():
                i = index.get(int(trunc(day_start, interval).timestamp()))
                if i is not None:
                    out[i] = _merge(out[i], cell)
            return out

        if customer_func is None:
            merged: list[list[float] | None] = [None] * len(stamps)
            for key in keys:
                for i, cell in enumerate(key_cells(key)):
                    merged[i] = _merge(merged[i], cell)
            values = [_finish(cell, func) for cell in merged]
            total_cell = None
            for cell in merged:
                total_cell = _merge(total_cell, cell)
            total = _finish(total_cell, func)
        else:
            per_customer = [
                (cells, _merge_all(cells)) for cells in (key_cells(k) for k in keys if k != ALL)
            ]
            values = [
                _combine(
                    [_finish(cells[i], func) for cells, _ in per_customer if cells[i]],
                    customer_func,
                )
                for i in range(len(stamps))
            ]
            total = _combine(
                [_finish(whole, func) for _, whole in per_customer if whole], customer_func
            )
        return {
            "quantities": [
                {"timestamp": iso(s), "quantity": v} for s, v in zip(stamps, values, strict=True)
            ],
            "total": total,
        }

    # -- subscriptions -------------------------------------------------------------
    def set_plan(
        self,
        external_id: str,
        plan: str,
        *,
        status: str | None = None,
        period: tuple[int, Interval] | None = None,
        unit_amounts: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The customer's subscription (the customer is created when missing: a
        subscription implies its customer); `period` = (anchor, interval) makes
        Polar cycle it and create orders."""
        cid = self.by_external.get(external_id)
        if cid is None and external_id in self.customers:
            cid = external_id
        if cid is None:
            email = f"{external_id}@sandbox.invalid"
            cid = self.create_customer(email=email, external_id=external_id)["id"]
        customer = self.customers[cid]
        now = self.state.now()
        sub = self.subscriptions.get(cid)
        if sub is None:
            start = trunc(now, "month")
            period_end = next_bucket(start, "month")
            sub = {
                "created_at": iso(now),
                "modified_at": None,
                "id": str(uuid.uuid4()),
                "status": "active",
                "current_period_start": iso(start.timestamp()),
                "current_period_end": iso(period_end.timestamp()),
                "current_meter_period_start": None,
                "current_meter_period_end": None,
                "trial_start": None,
                "trial_end": None,
                "cancel_at_period_end": False,
                "canceled_at": None,
                "started_at": iso(now),
                "ends_at": None,
                "ended_at": None,
                "past_due_at": None,
                "pause_at_period_end": False,
                "paused_at": None,
                "resumes_at": None,
                "customer_id": cid,
                "discount_id": None,
                "checkout_id": None,
                "seats": None,
                "units": None,  # polar-sdk 1.0.2 requires it (newer than the excerpt)
                "customer_cancellation_reason": None,
                "customer_cancellation_comment": None,
                "custom_field_data": {},
                "discount": None,
                "prices": [],
                "meters": [],
                "pending_update": None,
            }
            self.subscriptions[cid] = sub
            self.subscription_order.append(cid)
        customer_view = {k: v for k, v in customer.items()}
        product_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox-plan:{plan}"))
        sub.update(
            {
                "amount": PLAN_AMOUNTS.get(plan, 0),
                "currency": "usd",
                "recurring_interval": "month",
                "recurring_interval_count": 1,
                "product_id": product_id,
                "metadata": {"plan": plan},
                "customer": customer_view,
                "product": {
                    "id": product_id,
                    "created_at": sub["created_at"],
                    "modified_at": None,
                    "trial_interval": None,
                    "trial_interval_count": None,
                    "name": plan,
                    "description": None,
                    "visibility": "private",
                    "recurring_interval": "month",
                    "recurring_interval_count": 1,
                    "meter_interval": None,
                    "meter_interval_count": None,
                    "is_recurring": True,
                    "is_archived": False,
                    "organization_id": self.organization_id,
                    "metadata": {"plan": plan},
                    "is_deletable": False,  # required by polar-sdk 1.0.2
                    "prices": [],
                    "benefits": [],
                    "medias": [],
                    "attached_custom_fields": [],
                },
            }
        )
        if status is not None:
            sub["status"] = status
            if status == "canceled" and sub["canceled_at"] is None:
                sub["canceled_at"] = sub["ended_at"] = iso(now)
        if period is not None:
            anchor, interval = period
            self.periods[sub["id"]] = (anchor, interval)
            self.sub_owner[sub["id"]] = cid
            sub["started_at"] = iso(anchor)
            sub["recurring_interval"] = interval.value
            sub["product"]["recurring_interval"] = interval.value
        if unit_amounts is not None:
            self.unit_amounts[sub["id"]] = dict(unit_amounts)
        return self.subscription_view(sub)

    def subscription_view(self, sub: dict[str, Any]) -> dict[str, Any]:
        """Keep the current period in step with the clock."""
        billing = self.periods.get(sub["id"])
        if billing is not None:
            anchor, interval = billing
            current = period_at(anchor, interval, self.state.now()) or period(anchor, interval, 0)
            sub["current_period_start"] = iso(current.start)
            sub["current_period_end"] = iso(current.end)
        return sub


def _merge_all(cells: list[list[float] | None]) -> list[float] | None:
    out = None
    for cell in cells:
        out = _merge(out, cell)
    return out


def _combine(values: list[float], func: str) -> float:
    if not values:
        return 0.0
    if func == "max":
        return max(values)
    if func == "min":
        return min(values)
    if func == "avg":
        return sum(values) / len(values)
    if func in ("count", "unique"):
        return float(len(values))
    return float(sum(values))


# -- request helpers ------------------------------------------------------------------


def _json(ctx: Ctx) -> Any:
    try:
        return json.loads(ctx.body or b"null")
    except ValueError as exc:
        raise validation_error(
            [_verr(["body"], "JSON decode error", "json_invalid", None)]
        ) from exc


def _page_params(ctx: Ctx) -> tuple[int, int]:
    errors = []
    values = []
    for name, default in (("page", 1), ("limit", 10)):
        raw = ctx.query.get(name)
        value = default if raw in (None, "") else as_int(raw)
        if value is None or value <= 0:
            errors.append(
                _verr(["query", name], "Input should be greater than 0", "greater_than", raw)
            )
        elif name == "limit" and value > 100:
            value = 100
        values.append(value or 1)
    if errors:
        raise validation_error(errors)
    return values[0], values[1]


def _list_resource(ctx: Ctx, items: list[Any]) -> dict[str, Any]:
    page, limit = _page_params(ctx)
    total = len(items)
    return {
        "items": items[(page - 1) * limit : page * limit],
        "pagination": {"total_count": total, "max_page": math.ceil(total / limit)},
    }


def _metadata_errors(metadata: Any, loc: list[Any]) -> list[dict[str, Any]]:
    if not isinstance(metadata, dict):
        return [_verr(loc, "Input should be a valid dictionary", "dict_type", metadata)]
    errors = []
    if len(metadata) > 50:
        errors.append(_verr(loc, "Dictionary should have at most 50 items", "too_long", None))
    for key, value in metadata.items():
        if key in ("_cost", "_llm") and isinstance(value, dict):
            continue
        if len(key) > 40:
            errors.append(
                _verr(loc + [key], "Keys should have at most 40 characters", "string_too_long", key)
            )
        if isinstance(value, str):
            if not 1 <= len(value) <= 500:
                errors.append(
                    _verr(
                        loc + [key],
                        "String should have 1 to 500 characters",
                        "string_too_long",
                        value,
                    )
                )
        elif not isinstance(value, int | float | bool):
            errors.append(
                _verr(
                    loc + [key], "Input should be a string, number or boolean", "union_type", value
                )
            )
    return errors


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


# -- handlers -------------------------------------------------------------------------------


def h_ingest(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    store = state.polar
    body = _json(ctx)
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        raise validation_error([_verr(["body", "events"], "Field required", "missing", body)])
    now = state.now()
    errors: list[dict[str, Any]] = []
    parsed: list[dict[str, Any]] = []
    for i, raw in enumerate(body["events"]):
        if not isinstance(raw, dict):
            errors.append(
                _verr(["body", "events", i], "Input should be a valid dictionary", "dict_type", raw)
            )
            continue
        by_id = "customer_id" in raw
        loc = [
            "body",
            "events",
            i,
            "EventCreateCustomer" if by_id else "EventCreateExternalCustomer",
        ]
        name = raw.get("name")
        if name is None:
            errors.append(_verr(loc + ["name"], "Field required", "missing", name))
        elif not isinstance(name, str) or not name or len(name) > 128:
            message = "Input should be a string of 1 to 128 characters"
            errors.append(_verr(loc + ["name"], message, "string_type", name))
        timestamp = now
        if raw.get("timestamp") is not None:
            parsed_ts = parse_iso(raw["timestamp"])
            if parsed_ts is None:
                errors.append(
                    _verr(
                        loc + ["timestamp"],
                        "Input should have timezone info",
                        "timezone_aware",
                        raw["timestamp"],
                    )
                )
            elif parsed_ts > now + FUTURE_TOLERANCE:
                errors.append(
                    _verr(
                        loc + ["timestamp"],
                        "Value error, Timestamp must be in the past.",
                        "value_error",
                        raw["timestamp"],
                    )
                )
            else:
                timestamp = parsed_ts
        customer_id = external_customer_id = None
        key = ""
        if by_id:
            customer_id = raw["customer_id"]
            customer = store.customers.get(str(customer_id)) if _is_uuid(customer_id) else None
            if customer is None:
                errors.append(
                    {
                        "type": "customer_id",
                        "loc": ["body", "events", i, "customer_id"],
                        "msg": "Customer not found.",
                        "input": customer_id,
                    }
                )
            else:
                external_customer_id = customer["external_id"]
                key = external_customer_id or f"id:{customer['id']}"
        else:
            external_customer_id = raw.get("external_customer_id")
            if not isinstance(external_customer_id, str) or not external_customer_id:
                errors.append(
                    _verr(
                        loc + ["external_customer_id"],
                        "Field required",
                        "missing",
                        external_customer_id,
                    )
                )
            key = external_customer_id or ""
        external_id = raw.get("external_id")
        if external_id is not None and not isinstance(external_id, str):
            errors.append(
                _verr(
                    loc + ["external_id"],
                    "Input should be a valid string",
                    "string_type",
                    external_id,
                )
            )
        metadata = raw.get("metadata") or {}
        errors.extend(_metadata_errors(metadata, loc + ["metadata"]))
        parsed.append(
            {
                "name": name,
                "key": key,
                "customer_id": str(customer_id) if customer_id is not None else None,
                "external_customer_id": external_customer_id,
                "external_id": external_id,
                "timestamp": timestamp,
                "metadata": metadata,
            }
        )
    if errors:
        raise validation_error(errors)
    inserted = duplicates = 0
    for event in parsed:
        if event["external_id"] is not None and event["external_id"] in store.by_external_id:
            duplicates += 1
            continue
        store.store_event(**event)
        inserted += 1
    return 200, {"inserted": inserted, "duplicates": duplicates}


def _event_view(store: PolarStore, event: PolarEvent) -> dict[str, Any]:
    customer = store.customer_for_key(event.key)
    return {
        "id": event.id,
        "timestamp": iso(event.timestamp),
        "organization_id": store.organization_id,
        "customer_id": customer["id"] if customer else event.customer_id,
        "customer": customer,
        "external_customer_id": event.external_customer_id,
        "member_id": None,
        "external_member_id": None,
        "child_count": 0,
        "parent_id": None,
        "label": event.name,
        "name": event.name,
        "source": "user",
        "metadata": event.metadata,
    }


def h_list_events(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    store = state.polar
    names = set(ctx.query.getlist("name"))
    externals = set(ctx.query.getlist("external_customer_id"))
    customer_ids = set(ctx.query.getlist("customer_id"))
    start = (
        parse_iso(ctx.query.get("start_timestamp")) if ctx.query.get("start_timestamp") else None
    )
    end = parse_iso(ctx.query.get("end_timestamp")) if ctx.query.get("end_timestamp") else None
    selected = []
    for event in store.events:
        if names and event.name not in names:
            continue
        if externals and event.external_customer_id not in externals:
            continue
        if customer_ids:
            customer = store.customer_for_key(event.key)
            if customer is None or customer["id"] not in customer_ids:
                continue
        if start is not None and event.timestamp < start:
            continue
        if end is not None and event.timestamp > end:
            continue
        selected.append(event)
    sorting = ctx.query.getlist("sorting") or ["-timestamp"]
    selected.sort(key=lambda e: e.timestamp, reverse=sorting[0].startswith("-"))
    page, limit = _page_params(ctx)
    window = selected[(page - 1) * limit : page * limit]
    return 200, {
        "items": [_event_view(store, e) for e in window],
        "pagination": {"total_count": len(selected), "max_page": math.ceil(len(selected) / limit)},
    }


def h_create_meter(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    body = _json(ctx)
    if not isinstance(body, dict):
        raise validation_error(
            [_verr(["body"], "Input should be a valid dictionary", "dict_type", body)]
        )
    return 201, state.polar.create_meter(body)


def h_list_meters(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    store = state.polar
    items = [store.meters[m] for m in store.meter_order]
    query = ctx.query.get("query")
    if query:
        items = [m for m in items if query.lower() in m["name"].lower()]
    archived = ctx.query.get("is_archived")
    if archived in ("true", "false"):
        items = [m for m in items if (m["archived_at"] is not None) == (archived == "true")]
    sorting = ctx.query.getlist("sorting") or ["name"]
    field = sorting[0].lstrip("-")
    sort_key = "created_at" if field == "created_at" else "name"
    items.sort(key=lambda m: m[sort_key], reverse=sorting[0].startswith("-"))
    return 200, _list_resource(ctx, items)


def _get_meter(state: SandboxState, meter_id: str) -> dict[str, Any]:
    meter = state.polar.meters.get(meter_id)
    if meter is None:
        raise not_found()
    return meter


def h_get_meter(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    return 200, _get_meter(state, ctx.params["id"])


def h_quantities(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    store = state.polar
    meter = _get_meter(state, ctx.params["id"])
    q = ctx.query
    errors: list[dict[str, Any]] = []
    bounds: dict[str, float] = {}
    for name in ("start_timestamp", "end_timestamp"):
        raw = q.get(name)
        value = parse_iso(raw) if raw else None
        if raw is None:
            errors.append(_verr(["query", name], "Field required", "missing", None))
        elif value is None:
            errors.append(
                _verr(["query", name], "Input should be a valid datetime", "datetime_parsing", raw)
            )
        else:
            bounds[name] = value
    interval = q.get("interval")
    if interval not in INTERVALS:
        errors.append(
            _verr(
                ["query", "interval"],
                "Input should be 'year', 'month', 'week', 'day' or 'hour'",
                "enum" if interval else "missing",
                interval,
            )
        )
    timezone = q.get("timezone", "UTC")
    if timezone not in ("UTC", "Etc/UTC", "Etc/Universal", "Universal", "Zulu", "Etc/Zulu"):
        errors.append(
            _verr(["query", "timezone"], "The sandbox only supports UTC.", "enum", timezone)
        )
    customer_func = q.get("customer_aggregation_function") or None
    if customer_func not in (None, "count", "sum", "max", "min", "avg", "unique"):
        errors.append(
            _verr(
                ["query", "customer_aggregation_function"],
                "Input should be a valid aggregation function",
                "enum",
                customer_func,
            )
        )
    if any(k.startswith("metadata[") for k in q.keys()):
        errors.append(
            _verr(
                ["query", "metadata"],
                "The sandbox does not filter quantities by metadata; use a meter filter instead.",
                "value_error",
                None,
            )
        )
    if errors:
        raise validation_error(errors)

    id_filter = q.getlist("customer_id")
    ext_filter = q.getlist("external_customer_id")
    if not id_filter and not ext_filter:
        keys = [ALL] if customer_func is None else list(store.cells[meter["id"]])
    else:
        selections: list[set[str]] = []
        if id_filter:
            chosen: set[str] = set()
            for cid in id_filter:
                customer = store.customers.get(cid)
                chosen.add(f"id:{cid}")
                if customer is not None and customer["external_id"]:
                    chosen.add(customer["external_id"])
            selections.append(chosen)
        if ext_filter:
            selections.append(set(ext_filter))
        keys = sorted(set.intersection(*selections))
    return 200, store.quantities(
        meter,
        bounds["start_timestamp"],
        bounds["end_timestamp"],
        str(interval),  # validated against INTERVALS above
        keys,
        customer_func,
    )


def h_create_customer(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    store = state.polar
    body = _json(ctx)
    if not isinstance(body, dict):
        raise validation_error(
            [_verr(["body"], "Input should be a valid dictionary", "dict_type", body)]
        )
    errors: list[dict[str, Any]] = []
    type_ = body.get("type", "individual")
    if type_ not in ("individual", "team"):
        errors.append(
            _verr(["body", "type"], "Input should be 'individual' or 'team'", "enum", type_)
        )
    email = body.get("email")
    if email is None and type_ == "individual":
        errors.append(_verr(["body", "email"], "Field required", "missing", None))
    elif email is not None and (not isinstance(email, str) or "@" not in email):
        errors.append(
            _verr(["body", "email"], "value is not a valid email address", "value_error", email)
        )
    elif email is not None and email.lower() in store.by_email:
        errors.append(
            _verr(
                ["body", "email"],
                "A customer with this email address already exists.",
                "value_error",
                email,
            )
        )
    external_id = body.get("external_id")
    if external_id is not None and not isinstance(external_id, str):
        errors.append(
            _verr(
                ["body", "external_id"],
                "Input should be a valid string",
                "string_type",
                external_id,
            )
        )
    elif external_id is not None and external_id in store.by_external:
        errors.append(
            _verr(
                ["body", "external_id"],
                "A customer with this external ID already exists.",
                "value_error",
                external_id,
            )
        )
    metadata = body.get("metadata") or {}
    errors.extend(_metadata_errors(metadata, ["body", "metadata"]))
    name = body.get("name")
    if errors:
        raise validation_error(errors)
    customer = store.create_customer(
        email=email, external_id=external_id, name=name, type_=type_, metadata=metadata
    )
    return 201, customer


CUSTOMER_SORTS = ("created_at", "email", "name")


def h_list_customers(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    """Filters `email`, `query` (name, email or external id) and `active` (a
    trialing, active or past_due subscription); `sorting` (default -created_at)."""
    store = state.polar
    items = [store.customers[c] for c in store.customer_order]  # oldest first
    sorting = ctx.query.getlist("sorting") or ["-created_at"]
    for criterion in reversed(sorting):  # stable sorts: the first criterion wins
        field = criterion.lstrip("-")
        if field not in CUSTOMER_SORTS:
            raise validation_error(
                [
                    _verr(
                        ["query", "sorting", 0],
                        "Input should be 'created_at', '-created_at', 'email', '-email', "
                        "'name' or '-name'",
                        "enum",
                        criterion,
                    )
                ]
            )
        if field == "created_at":  # ties (same instant) keep creation order
            ranked = {cid: i for i, cid in enumerate(store.customer_order)}
            items.sort(key=lambda c: ranked[c["id"]], reverse=criterion.startswith("-"))
        else:
            items.sort(key=lambda c: c[field] or "", reverse=criterion.startswith("-"))
    active = ctx.query.get("active")
    if active in ("true", "false"):
        live = {
            cid
            for cid, sub in store.subscriptions.items()
            if sub["status"] in ("trialing", "active", "past_due")
        }
        items = [c for c in items if (c["id"] in live) == (active == "true")]
    email = ctx.query.get("email")
    if email:
        items = [c for c in items if (c["email"] or "").lower() == email.lower()]
    query = (ctx.query.get("query") or "").lower()
    if query:
        items = [
            c
            for c in items
            if any(query in (c[f] or "").lower() for f in ("name", "email", "external_id"))
        ]
    return 200, _list_resource(ctx, items)


def h_get_customer(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    customer = state.polar.customers.get(ctx.params["id"])
    if customer is None:
        raise not_found()
    return 200, customer


def h_get_customer_external(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    store = state.polar
    cid = store.by_external.get(ctx.params["external_id"])
    if cid is None:
        raise not_found()
    return 200, store.customers[cid]


def h_list_subscriptions(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    store = state.polar
    items = [store.subscriptions[c] for c in reversed(store.subscription_order)]
    ids = set(ctx.query.getlist("customer_id"))
    externals = set(ctx.query.getlist("external_customer_id"))
    if ids:
        items = [s for s in items if s["customer_id"] in ids]
    if externals:
        items = [s for s in items if s["customer"]["external_id"] in externals]
    statuses = set(ctx.query.getlist("status"))
    if statuses:
        items = [s for s in items if s["status"] in statuses]
    return 200, _list_resource(ctx, [store.subscription_view(s) for s in items])


def h_get_subscription(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    store = state.polar
    for sub in store.subscriptions.values():
        if sub["id"] == ctx.params["id"]:
            return 200, store.subscription_view(sub)
    raise not_found()


ORDER_SORTS = ("created_at", "-created_at")


def h_list_orders(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    """Filters `customer_id`, `external_customer_id`, `subscription_id`, `status`
    (orders here are all `paid`); sorting by `created_at` (default newest first)."""
    store = state.polar
    customer_ids = set(ctx.query.getlist("customer_id"))
    for external in ctx.query.getlist("external_customer_id"):
        cid = store.by_external.get(external)
        customer_ids.add(cid or f"unknown:{external}")
    sorting = ctx.query.getlist("sorting") or ["-created_at"]
    if sorting[0] not in ORDER_SORTS:
        raise validation_error(
            [
                _verr(
                    ["query", "sorting", 0],
                    "The sandbox sorts orders by created_at or -created_at.",
                    "enum",
                    sorting[0],
                )
            ]
        )
    items = store.orders.listed(
        customer_ids=customer_ids,
        subscription_ids=set(ctx.query.getlist("subscription_id")),
        descending=sorting[0].startswith("-"),
    )
    statuses = set(ctx.query.getlist("status"))
    if statuses:
        items = [o for o in items if o["status"] in statuses]
    return 200, _list_resource(ctx, items)


def h_get_order(state: SandboxState, ctx: Ctx) -> tuple[int, Any]:
    order = state.polar.orders.view(ctx.params["id"])
    if order is None:
        raise not_found()
    return 200, order


# -- provider spec ---------------------------------------------------------------------


def _unauthorized(ctx: Ctx) -> ApiError:
    return ApiError(401, {"error": "Unauthorized", "detail": "Missing or invalid access token."})


def _rate_limited(retry_after: int) -> ApiError:
    # Polar's rate limiter answers 429 with an empty body (only Retry-After).
    return ApiError(429, None)


def _server_error(message: str) -> ApiError:
    return ApiError(500, {"error": "InternalServerError", "detail": message})


def _unknown_route(ctx: Ctx) -> ApiError:
    return ApiError(404, {"detail": "Not Found"})


ROUTES = [
    ProviderRoute("POST", "/v1/events/ingest", h_ingest, writes=True),
    ProviderRoute("GET", "/v1/events/", h_list_events),
    ProviderRoute("GET", "/v1/meters/", h_list_meters),
    ProviderRoute("POST", "/v1/meters/", h_create_meter, writes=True),
    ProviderRoute("GET", "/v1/meters/{id}/quantities", h_quantities),
    ProviderRoute("GET", "/v1/meters/{id}", h_get_meter),
    ProviderRoute("GET", "/v1/customers/", h_list_customers),
    ProviderRoute("POST", "/v1/customers/", h_create_customer, writes=True),
    ProviderRoute("GET", "/v1/customers/external/{external_id}", h_get_customer_external),
    ProviderRoute("GET", "/v1/customers/{id}", h_get_customer),
    ProviderRoute("GET", "/v1/subscriptions/", h_list_subscriptions),
    ProviderRoute("GET", "/v1/subscriptions/{id}", h_get_subscription),
    ProviderRoute("GET", "/v1/orders/", h_list_orders),
    ProviderRoute("GET", "/v1/orders/{id}", h_get_order),
]

SPEC = ProviderSpec(
    name="polar",
    routes=ROUTES,
    unauthorized=_unauthorized,
    rate_limited=_rate_limited,
    server_error=_server_error,
    unknown_route=_unknown_route,
)
