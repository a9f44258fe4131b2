"""The Dagster resource that builds a provider client from its settings. Which class
serves which provider is one table; the SDKs load only when a client is built."""

from __future__ import annotations

import os
from collections.abc import Callable

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
    stripe_writes_per_second: float = 1000.0
    polar_requests_per_minute: float = 500.0
    polar_batch_size: int = 100
    stripe_concurrency: int = 16
    # Reads (reconciliation): Stripe's live read limit is ~100/s; Polar's 500/min
    # covers every request. Polar customers are asked for in groups of this size.
    stripe_reads_per_second: float = 100.0
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


def _stripe(settings: ProvidersResource) -> BillingProvider:
    from resources.providers.stripe_provider import StripeProvider

    return StripeProvider(
        _require(
            settings.stripe_api_key or os.environ.get("STRIPE_API_KEY"),
            "STRIPE_API_KEY",
            Provider.STRIPE,
        ),
        settings.stripe_api_base or os.environ.get("STRIPE_API_BASE"),
        settings.stripe_writes_per_second,
        settings.stripe_concurrency,
        settings.stripe_reads_per_second,
        settings.stripe_read_concurrency,
    )


def _polar(settings: ProvidersResource) -> BillingProvider:
    from resources.providers.polar_provider import PolarProvider

    return PolarProvider(
        _require(
            settings.polar_access_token or os.environ.get("POLAR_ACCESS_TOKEN"),
            "POLAR_ACCESS_TOKEN",
            Provider.POLAR,
        ),
        settings.polar_api_base or os.environ.get("POLAR_API_BASE"),
        settings.polar_requests_per_minute,
        settings.polar_batch_size,
        settings.polar_group_size,
    )


_FACTORIES: dict[Provider, Callable[[ProvidersResource], BillingProvider]] = {
    Provider.STRIPE: _stripe,
    Provider.POLAR: _polar,
}
