"""What every billing provider is to tally: the names, the event tally sends, the
answers it gets back, the errors, and the one protocol each provider implements.

Leaf module (standard library only): stages, metrics and the CLI import provider
facts from here without loading an SDK."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from resources.calendar import usage_noon


class Provider(StrEnum):
    """organizations.provider: who invoices the org."""

    STRIPE = "stripe"
    POLAR = "polar"

    @property
    def processes_asynchronously(self) -> bool:
        """Accepted usage and cancels reach the provider's summaries only later
        (Stripe: "eventually consistent"); Polar counts an event once ingested."""
        return self is Provider.STRIPE


class SendStatus(StrEnum):
    SENT = "sent"
    DUPLICATE = "duplicate"  # the identifier was already stored: delivered once
    REJECTED = "rejected"  # the provider said no: nothing stored
    UNANSWERED = "unanswered"  # retries exhausted or circuit open: delivery unknown


class CorrectionMethod(StrEnum):
    """billing.billing_corrections.method: how a credit was handed back."""

    STRIPE_BALANCE_TRANSACTION = "stripe_balance_transaction"
    MANUAL = "manual"
    INCLUDED_HOURS = "included_hours"  # $0: inside included hours, nothing sent


def usable_customer_id(value: object) -> str | None:
    """The org's provider customer id when there is one to bill (not NULL, NaN or
    empty), else None."""
    return value if isinstance(value, str) and value != "" else None


def provider_error_metric_key(provider: str) -> str:
    """The usage_push metadata key counting a provider's failed requests; the
    metrics server sums it into tally_provider_errors_total."""
    return f"{provider}_errors"


_SECRET_PATTERN = re.compile(r"(sk|rk|pk)_(test|live)_[A-Za-z0-9]+|polar_[A-Za-z0-9_]+")


def redact_secrets(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _SECRET_PATTERN.sub("[redacted]", text)


class ProviderError(Exception):
    """Base: `provider` names Stripe or Polar in every message."""

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider


class ProviderConfigError(ProviderError):
    """Missing key or base URL: the message names the environment variable."""


class Rejected(ProviderError):
    """The provider answered definitively that it did not store the request (4xx)."""


class ProviderUnavailable(ProviderError):
    """Retries exhausted or circuit open: the outcome of the last call is unknown."""


@dataclass
class UsageEvent:
    identifier: str
    customer_id: str
    tier: str
    seconds: int
    usage_date: dt.date

    @property
    def timestamp(self) -> int:
        """Usage is stamped at noon UTC of its day (DESIGN §6)."""
        return int(usage_noon(self.usage_date).timestamp())


@dataclass
class SendOutcome:
    identifier: str
    status: SendStatus
    detail: str = ""


@dataclass
class RecordedUsage:
    """What one provider holds for one usage day.

    seconds: (customer_id, tier) → seconds, non-zero only. exact: the keys read for
    that customer alone (the rest were inferred from a group total equal to the
    ledger). unread_tiers: tiers that could not be read (Polar meter missing in
    report-only). unattributed: seconds the provider holds for customers tally does
    not know (Polar root total minus the groups' totals), when measured."""

    seconds: dict[tuple[str, str], int] = field(default_factory=dict)
    exact: set[tuple[str, str]] = field(default_factory=set)
    unread_tiers: list[str] = field(default_factory=list)
    unattributed: int = 0
    calls: int = 0


@dataclass(frozen=True)
class ProviderPlan:
    customer_id: str
    plan: str | None
    status: str


@dataclass(frozen=True)
class CreditResult:
    method: CorrectionMethod
    reference: str | None
    note: str = ""


@dataclass(frozen=True)
class ProviderInvoice:
    """A finalized invoice of one customer's billing period, with its metered
    quantity (seconds) per tier: what the customer is actually billed."""

    customer_id: str
    invoice_id: str
    period_start: dt.datetime
    period_end: dt.datetime
    finalized_at: dt.datetime
    seconds_by_tier: dict[str, int]


class BillingProvider(Protocol):
    """One provider, as push, read-back and credits use it. Every call goes through
    the provider's call guard (retries, backoff, breaker, rate limit)."""

    name: Provider

    def ensure_meters(self, tiers: Iterable[str]) -> None:
        """Create the per-tier meters events need (where the provider needs them)."""
        ...

    def send(self, events: list[UsageEvent]) -> list[SendOutcome]:
        """Deliver events; one outcome per event, whatever happens to the others (an
        event whose answer never came is UNANSWERED, not an exception)."""
        ...

    def cancel(self, event: UsageEvent) -> str:
        """'cancelled', else why not ('expired: …', 'unsupported: …')."""
        ...

    def recorded_usage(
        self,
        usage_date: dt.date,
        customers: Iterable[str],
        tiers: Iterable[str],
        expected: dict[tuple[str, str], int],
        *,
        create_meters: bool = ...,
    ) -> RecordedUsage:
        """What the provider holds for the day, per (customer, tier); `create_meters`
        makes missing per-tier meters where the provider reads through them."""
        ...

    def plans(self, customers: Iterable[str]) -> dict[str, ProviderPlan]:
        """The plan of each customer's live subscription."""
        ...

    def existing_customers(self, customers: Iterable[str]) -> set[str]:
        """Which of `customers` the provider has, from its bulk customer list (not
        one call per customer)."""
        ...

    def finalized_invoices(
        self, customers: Iterable[str], tiers: Iterable[str]
    ) -> list[ProviderInvoice]:
        """The customers' finalized invoices with metered lines per tier; [] where
        the provider bills metered usage otherwise (Polar: by ingestion time)."""
        ...

    def apply_credit(
        self, customer_id: str, amount_cents: int, currency: str, description: str, proposal_id: int
    ) -> CreditResult:
        """Hand an over-charge back, idempotently per proposal."""
        ...

    def ping(self) -> None:
        """One read-only call that needs the key (list meters): returns when the
        provider accepted it; Rejected (the provider said no, e.g. 401) or
        ProviderUnavailable (no answer) otherwise. `tally doctor` calls it."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters of the write calls (requests, retried, rate_limited, errors)."""
        ...

    def read_stats(self) -> dict[str, int]:
        """Counters of the read calls."""
        ...
