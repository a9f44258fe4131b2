"""Billing providers behind one protocol, on the real SDKs.

- `base`: provider names, the event, outcomes, errors, the `BillingProvider` protocol.
- `guard`: retries, backoff, breaker and rate limiter every request goes through.
- `stripe_provider`, `polar_provider`: one class each implementing the protocol.
- `narrowing`: Polar's group-total read strategy.
- `resource`: the Dagster resource building a client from a table.

Keys never appear in messages: errors carry the provider's own message, which never
echoes the key, and `redact_secrets` scrubs anything that does."""

from resources.providers.base import (
    BillingProvider,
    CorrectionMethod,
    CreditResult,
    Provider,
    ProviderConfigError,
    ProviderError,
    ProviderInvoice,
    ProviderPlan,
    ProviderUnavailable,
    RecordedUsage,
    Rejected,
    SendOutcome,
    SendStatus,
    UsageEvent,
    provider_error_metric_key,
    redact_secrets,
    usable_customer_id,
)
from resources.providers.narrowing import narrow_down
from resources.providers.resource import ProvidersResource

__all__ = [
    "BillingProvider",
    "CorrectionMethod",
    "CreditResult",
    "Provider",
    "ProviderConfigError",
    "ProviderError",
    "ProviderInvoice",
    "ProviderPlan",
    "ProviderUnavailable",
    "ProvidersResource",
    "RecordedUsage",
    "Rejected",
    "SendOutcome",
    "SendStatus",
    "UsageEvent",
    "narrow_down",
    "provider_error_metric_key",
    "redact_secrets",
    "usable_customer_id",
]
