"""The sandbox's whole state: clock, faults, rate limits, counters, both providers.

One `SandboxState` per app (``app.state.sandbox``). Handlers run on the server's
event loop without awaiting while they mutate, and take ``state.lock`` so that
a test thread poking at the state directly (clock, faults) stays consistent.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .common import TokenBucket

PROVIDERS = ("stripe", "polar")


class Clock:
    """Injectable wall clock plus an offset that tests and /_sandbox/clock move."""

    def __init__(self, base: Callable[[], float] | None = None) -> None:
        self._base = base or time.time
        self.offset = 0.0

    def now(self) -> float:
        return self._base() + self.offset

    def set_now(self, epoch: float) -> None:
        self.offset = float(epoch) - self._base()

    def advance(self, seconds: float) -> None:
        self.offset += float(seconds)


@dataclass
class Faults:
    """Fault injection and rate limits; applied to provider APIs, never /_sandbox."""

    error_rate: float = 0.0
    drop_after_store_rate: float = 0.0
    latency_ms: float = 0.0
    # Stripe processes meter events and cancels asynchronously: they reach summaries
    # and invoices this many sandbox seconds after they were accepted.
    processing_delay_s: float = 0.0
    rate_limits: dict[str, float | None] = field(
        default_factory=lambda: {p: None for p in PROVIDERS}
    )
    seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "error_rate": self.error_rate,
            "drop_after_store_rate": self.drop_after_store_rate,
            "latency_ms": self.latency_ms,
            "processing_delay_s": self.processing_delay_s,
            "stripe_rate_limit_per_s": self.rate_limits["stripe"],
            "polar_rate_limit_per_s": self.rate_limits["polar"],
            "seed": self.seed,
        }


@dataclass
class Settings:
    """Account settings (``/_sandbox/settings``): survive nothing but a reset."""

    # Stripe finalizes a subscription invoice this long after its period ends
    # (Stripe's default is one hour, configurable up to 72 h).
    finalization_grace_s: float = 3600.0

    def as_dict(self) -> dict[str, Any]:
        return {"finalization_grace_s": self.finalization_grace_s}


class Stats:
    """Request counters per provider and endpoint, for benchmarks and tests."""

    def __init__(self) -> None:
        self.providers: dict[str, dict[str, Any]] = {p: self._empty() for p in PROVIDERS}

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {
            "requests": 0,
            "rate_limited": 0,
            "server_errors": 0,
            "client_errors": 0,
            "injected_errors": 0,
            "dropped_after_store": 0,
            "endpoints": defaultdict(int),
        }

    def record_request(self, provider: str, endpoint: str) -> None:
        entry = self.providers[provider]
        entry["requests"] += 1
        entry["endpoints"][endpoint] += 1

    def record_status(self, provider: str, status: int) -> None:
        entry = self.providers[provider]
        if status == 429:
            entry["rate_limited"] += 1
        elif status >= 500:
            entry["server_errors"] += 1
        elif status >= 400:
            entry["client_errors"] += 1

    def bump(self, provider: str, counter: str) -> None:
        entry = self.providers[provider]
        entry[counter] = entry.get(counter, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        providers = {
            name: {**entry, "endpoints": dict(sorted(entry["endpoints"].items()))}
            for name, entry in self.providers.items()
        }
        return {
            "requests_total": sum(p["requests"] for p in providers.values()),
            "rate_limited_total": sum(p["rate_limited"] for p in providers.values()),
            "server_errors_total": sum(p["server_errors"] for p in providers.values()),
            "providers": providers,
        }


class UsageIndex:
    """Running (seconds, live event count) per usage day and (provider, customer, tier)."""

    def __init__(self) -> None:
        self._days: dict[str, dict[tuple[str, str, str], list[int]]] = defaultdict(dict)

    def add(
        self, date: str, provider: str, customer: str, tier: str, seconds: int, count: int
    ) -> None:
        cell = self._days[date].setdefault((provider, customer, tier), [0, 0])
        cell[0] += seconds
        cell[1] += count

    def for_date(self, date: str) -> list[dict[str, Any]]:
        rows = [
            {"provider": p, "customer": c, "tier": t, "seconds": cell[0]}
            for (p, c, t), cell in self._days.get(date, {}).items()
            if cell[1] > 0
        ]
        rows.sort(key=lambda r: (r["provider"], r["customer"], r["tier"]))
        return rows


class SandboxState:
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.lock = threading.RLock()
        self.clock = Clock(clock)
        self._init_data()

    def _init_data(self) -> None:
        # Imported here: the provider modules import this one for type hints only.
        from .polar_api import PolarStore
        from .stripe_api import StripeStore

        self.faults = Faults()
        self.rng = random.Random()
        self.limiters: dict[str, TokenBucket | None] = {p: None for p in PROVIDERS}
        self.stats = Stats()
        self.settings = Settings()
        # What each provider accepted (what will be there) and what it has processed
        # (what its read APIs show). Polar processes at once: both move together.
        self.usage = UsageIndex()
        self.processed_usage = UsageIndex()
        self.stripe = StripeStore(self)
        self.polar = PolarStore(self)

    # -- clock ---------------------------------------------------------------
    def now(self) -> float:
        return self.clock.now()

    def settle(self) -> None:
        """Bring the providers' asynchronous work up to the clock: process the
        Stripe events and cancels that are due, then create and finalize the
        invoices (and Polar orders) whose periods ended. Lazy but exact: every
        outcome is computed as of the moment it was due, not as of this call."""
        with self.lock:
            now = self.clock.now()
            self.stripe.process_due(now)
            self.stripe.invoices.settle(now)
            self.polar.orders.settle(now)

    def set_clock_offset(self, seconds: float) -> None:
        with self.lock:
            self.clock.offset = float(seconds)

    def advance_clock(self, seconds: float) -> None:
        with self.lock:
            self.clock.advance(seconds)

    def set_now(self, epoch: float) -> None:
        with self.lock:
            self.clock.set_now(epoch)

    # -- lifecycle -----------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: data, faults, rate limits, counters, clock offset."""
        with self.lock:
            self.clock.offset = 0.0
            self._init_data()

    def reset_stats(self) -> None:
        with self.lock:
            self.stats = Stats()

    # -- faults --------------------------------------------------------------
    def configure_faults(self, config: dict[str, Any]) -> dict[str, Any]:
        """Merge `config` into the current faults (omitted keys keep their value).

        Rate limits: `rate_limit_per_s` sets both providers, `stripe_rate_limit_per_s`
        / `polar_rate_limit_per_s` one each (these win); null or <= 0 disables.
        Raises ValueError naming the bad key.
        """
        with self.lock:
            faults = self.faults
            for key in ("error_rate", "drop_after_store_rate"):
                if key in config:
                    value = _number(config[key], key)
                    if not 0.0 <= value <= 1.0:
                        raise ValueError(f"{key} must be between 0 and 1")
                    setattr(faults, key, value)
            for key in ("latency_ms", "processing_delay_s"):
                if key in config:
                    value = _number(config[key], key)
                    if value < 0:
                        raise ValueError(f"{key} must be >= 0")
                    setattr(faults, key, value)
            limits: dict[str, Any] = {}
            if "rate_limit_per_s" in config:
                limits = {p: config["rate_limit_per_s"] for p in PROVIDERS}
            for provider in PROVIDERS:
                key = f"{provider}_rate_limit_per_s"
                if key in config:
                    limits[provider] = config[key]
            for provider, raw in limits.items():
                rate = None if raw is None else _number(raw, f"{provider}_rate_limit_per_s")
                if rate is not None and rate <= 0:
                    rate = None
                faults.rate_limits[provider] = rate
                self.limiters[provider] = TokenBucket(rate) if rate else None
            if "seed" in config:
                seed = config["seed"]
                if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                    raise ValueError("seed must be an integer")
                faults.seed = seed
                self.rng = random.Random(seed)
            return faults.as_dict()

    def configure_settings(self, config: dict[str, Any]) -> dict[str, Any]:
        """Merge `config` into the account settings; ValueError names the bad key."""
        with self.lock:
            self.settle()  # invoices already due keep the grace they were created with
            unknown = sorted(set(config) - {"finalization_grace_s"})
            if unknown:
                raise ValueError(f"unknown setting {unknown[0]!r}; expected finalization_grace_s")
            if "finalization_grace_s" in config:
                value = _number(config["finalization_grace_s"], "finalization_grace_s")
                if not 0 <= value <= 72 * 3600:
                    raise ValueError("finalization_grace_s must be between 0 and 259200 (72 h)")
                self.settings.finalization_grace_s = value
            return self.settings.as_dict()


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    return float(value)
