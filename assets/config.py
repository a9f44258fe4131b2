"""One policy for configuration errors: a bad setting fails the step at once, with
one line naming the setting and the fix, and is never retried (retrying cannot
fix a file). Every asset that reads the pricing configuration reads it here."""

from __future__ import annotations

from dagster import Failure

from assets.pricing import Pricing, PricingError, current_pricing


def configuration_failure(message: str) -> Failure:
    """A step failure for a setting a person must fix: no retries."""
    return Failure(description=message, allow_retries=False)


def pricing_or_fail() -> Pricing:
    """The pricing configuration, or a non-retried failure: `pricing configuration: …`."""
    try:
        return current_pricing()
    except PricingError as error:
        raise configuration_failure(f"pricing configuration: {error}") from None
