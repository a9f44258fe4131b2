"""The Dagster resource that builds a provider client from its settings. Which class
serves which provider is one table; the SDKs load only when a client is built."""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import StrEnum

from dagster import ConfigurableResource

from resources.providers.base import BillingProvider, Provider, ProviderConfigError


def _require(value: str | None, variable: str, provider: Provider) -> str:
    if not value:
        raise ProviderConfigError(
            provider,
            f"{variable} is not set; export {variable}=… (tally demo sets it for the sandbox)",
        )
    return value


class ProvidersResource(ConfigurableResource):
    """Builds the provider clients from the environment (`STRIPE_API_KEY`,
    `STRIPE_API_BASE`, `POLAR_ACCESS_TOKEN`, `POLAR_API_BASE`)."""

    stripe_api_key: str = ""
    stripe_api_base: str = ""
    polar_access_token: str = ""
    polar_api_base: str = ""
    # None: the limit of the key's mode (STRIPE_RATE_LIMITS); set to override.
    stripe_writes_per_second: float | None = None
    polar_requests_per_minute: float = 500.0
    polar_batch_size: int = 100
    stripe_concurrency: int = 16
    # Reads (reconciliation): by the key's mode unless set; Polar's 500/min covers
    # every request. Polar customers are asked for in groups of this size.
    stripe_reads_per_second: float | None = None
    stripe_read_concurrency: int = 16
    polar_group_size: int = 100

    def client(self, provider: str) -> BillingProvider:
        """A fresh client for `provider` (its own guards and counters)."""
        try:
            build = _FACTORIES[Provider(provider)]
        except ValueError:
            expected = " or ".join(repr(name.value) for name in Provider)
            raise ProviderConfigError(provider, f"unknown provider; expected {expected}") from None
        return build(self)


# provider → (its key's field, environment variable; its base URL's field, variable)
_SETTINGS = {
    Provider.STRIPE: ("stripe_api_key", "STRIPE_API_KEY", "stripe_api_base", "STRIPE_API_BASE"),
    Provider.POLAR: (
        "polar_access_token",
        "POLAR_ACCESS_TOKEN",
        "polar_api_base",
        "POLAR_API_BASE",
    ),
}


def _credentials(settings: ProvidersResource, provider: Provider) -> tuple[str, str | None]:
    """(key, base URL): the resource's setting, else the environment variable."""
    key_field, key_variable, base_field, base_variable = _SETTINGS[provider]
    key = getattr(settings, key_field) or os.environ.get(key_variable)
    base = getattr(settings, base_field) or os.environ.get(base_variable)
    return _require(key, key_variable, provider), base


class StripeKeyMode(StrEnum):
    LIVE = "live"
    TEST = "test"


# Requests per second Stripe allows (writes, reads): live mode takes 1000 meter
# events and ~100 reads a second; test mode keys are limited to 25 of each.
STRIPE_RATE_LIMITS = {StripeKeyMode.LIVE: (1000.0, 100.0), StripeKeyMode.TEST: (25.0, 25.0)}


def stripe_key_mode(key: str) -> StripeKeyMode:
    """A secret or restricted key says its mode in its prefix (sk_test_, rk_live_…)."""
    return StripeKeyMode.TEST if key.startswith(("sk_test_", "rk_test_")) else StripeKeyMode.LIVE


def stripe_rate_limits(settings: ProvidersResource, key: str) -> tuple[float, float]:
    """(writes, reads) per second: the settings where given, else the key mode's."""
    writes, reads = STRIPE_RATE_LIMITS[stripe_key_mode(key)]
    return (
        writes if settings.stripe_writes_per_second is None else settings.stripe_writes_per_second,
        reads if settings.stripe_reads_per_second is None else settings.stripe_reads_per_second,
    )


def _stripe(settings: ProvidersResource) -> BillingProvider:
    from resources.providers.stripe_provider import StripeProvider

    key, base = _credentials(settings, Provider.STRIPE)
    writes, reads = stripe_rate_limits(settings, key)
    return StripeProvider(
        key, base, writes, settings.stripe_concurrency, reads, settings.stripe_read_concurrency
    )


def _polar(settings: ProvidersResource) -> BillingProvider:
    from resources.providers.polar_provider import PolarProvider

    key, base = _credentials(settings, Provider.POLAR)
    rate = settings.polar_requests_per_minute
    return PolarProvider(key, base, rate, settings.polar_batch_size, settings.polar_group_size)


_FACTORIES: dict[Provider, Callable[[ProvidersResource], BillingProvider]] = {
    Provider.STRIPE: _stripe,
    Provider.POLAR: _polar,
}
