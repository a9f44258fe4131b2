"""Stripe meter error reports: meter events Stripe accepted and then could not count.

Stripe validates meter events asynchronously. An event whose customer does not
exist when it is processed is dropped (never in summaries or invoices) and
reported as a thin event ``v1.billing.meter.error_report_triggered`` about the
meter, readable with ``GET /v2/core/events`` (``object_id`` = the meter id) and
``GET /v2/core/events/{id}``. Neither excerpt in shared/reference defines that
shape (its README says so); it follows the Stripe SDK's generated class
``V1BillingMeterErrorReportTriggeredEvent``: ``data.reason.error_count``,
``data.reason.error_types[].{code, error_count, sample_errors[].{error_message,
request.identifier}}``, ``data.validation_start``/``validation_end``.

The sandbox opens one report per meter and UTC hour of processing time (the
validation window); later errors in that window are added to it, up to ten
samples per code. ``GET /_sandbox/meter_errors`` lists every error flat.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from .common import HOUR, floor_to, iso

if TYPE_CHECKING:
    from .stripe_api import MeterEvent, StripeStore

CUSTOMER_NOT_FOUND = "meter_event_customer_not_found"
REPORT_TYPE = "v1.billing.meter.error_report_triggered"
MAX_SAMPLES = 10


class MeterErrors:
    def __init__(self, store: StripeStore) -> None:
        self.store = store
        self.flat: list[dict[str, Any]] = []
        self.reports: dict[str, dict[str, Any]] = {}  # event id -> v2 event
        self.order: list[str] = []

    def record(self, event: MeterEvent, processed_at: float) -> None:
        message = f"No customer with id '{event.customer}' exists."
        self.flat.append(
            {
                "code": CUSTOMER_NOT_FOUND,
                "error_message": message,
                "meter": event.meter_id,
                "event_name": event.event_name,
                "customer": event.customer,
                "identifier": event.identifier,
                "value": event.value,
                "timestamp": event.timestamp,
                "accepted_at": event.created,
                "processed_at": processed_at,
            }
        )
        window = floor_to(processed_at, HOUR)
        digest = hashlib.sha1(f"{event.meter_id}|{window}".encode()).hexdigest()[:24]
        report_id = f"evt_test_{digest}"
        report = self.reports.get(report_id)
        if report is None:
            report = {
                "id": report_id,
                "object": "v2.core.event",
                "type": REPORT_TYPE,
                "created": iso(processed_at),
                "livemode": False,
                "context": None,
                "reason": None,
                "changes": None,
                "snapshot_event": None,
                "related_object": {
                    "id": event.meter_id,
                    "type": "billing.meter",
                    "url": f"/v1/billing/meters/{event.meter_id}",
                },
                "data": {
                    "developer_message_summary": "",
                    "reason": {"error_count": 0, "error_types": []},
                    "validation_start": iso(window),
                    "validation_end": iso(window + HOUR),
                },
            }
            self.reports[report_id] = report
            self.order.append(report_id)
        reason = report["data"]["reason"]
        reason["error_count"] += 1
        kinds = {kind["code"]: kind for kind in reason["error_types"]}
        kind = kinds.get(CUSTOMER_NOT_FOUND)
        if kind is None:
            kind = {"code": CUSTOMER_NOT_FOUND, "error_count": 0, "sample_errors": []}
            reason["error_types"].append(kind)
        kind["error_count"] += 1
        if len(kind["sample_errors"]) < MAX_SAMPLES:
            kind["sample_errors"].append(
                {"error_message": message, "request": {"identifier": event.identifier}}
            )
        count = reason["error_count"]
        report["data"]["developer_message_summary"] = (
            f"There {'is' if count == 1 else 'are'} {count} invalid event"
            f"{'' if count == 1 else 's'} for meter {event.meter_id}: "
            "the customer does not exist."
        )

    def events(self, object_id: str | None = None) -> list[dict[str, Any]]:
        """v2 events, newest first, optionally about one meter."""
        found = [self.reports[i] for i in reversed(self.order)]
        if object_id:
            found = [r for r in found if r["related_object"]["id"] == object_id]
        return found
