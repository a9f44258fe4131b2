"""Pytest fixtures for the provider sandbox, plus the OpenAPI reference validator.

Registered from tests/conftest.py with ``pytest_plugins = ["sandbox_fixture"]`` (or
imported into a test module with ``from sandbox_fixture import *``).

* ``sandbox`` (session): a real sandbox server on 127.0.0.1:<free port>
  (`resources.sandbox.testing.RunningSandbox`: ``.base_url``, ``.app``, ``.state``).
* ``sandbox_clean`` (function): the same server after ``POST /_sandbox/reset``.
* ``stripe_client`` / ``polar_client``: the real SDKs pointed at ``sandbox_clean``.
* ``stripe_spec`` / ``polar_spec`` (session): `SpecValidator` over the OpenAPI
  excerpts in shared/reference (``TALLY_REFERENCE_DIR`` overrides the location).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from resources.sandbox.testing import RunningSandbox, running_sandbox

__all__ = [
    "SpecValidator",
    "create_customers",
    "polar_client",
    "polar_spec",
    "reference_dir",
    "sandbox",
    "sandbox_clean",
    "stripe_client",
    "stripe_spec",
    "stripe_invoices_spec",
    "polar_orders_spec",
]


def reference_dir() -> Path:
    """shared/reference beside the clone (the source of truth), else the copy vendored
    in tests/reference so a clone anywhere can run the suite; TALLY_REFERENCE_DIR wins."""
    override = os.environ.get("TALLY_REFERENCE_DIR")
    if override:
        return Path(override)
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
    if (shared / "stripe-billing-meters.json").exists():
        return shared
    return Path(__file__).resolve().parent / "reference"


def _allow_null(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` -> JSON Schema `anyOf [..., null]`.

    Stripe marks fields nullable beside `enum`/`anyOf`, where a plain
    `type: [.., "null"]` rewrite would not be enough.
    """
    if isinstance(node, list):
        return [_allow_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _allow_null(value) for key, value in node.items()}
    if converted.pop("nullable", False):
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


class SpecValidator:
    """Validates JSON answers against one provider's OpenAPI excerpt."""

    def __init__(self, path: Path) -> None:
        self.document = json.loads(path.read_text())
        self.components = _allow_null(copy.deepcopy(self.document.get("components", {})))

    def _validator(self, schema: dict[str, Any]) -> Draft202012Validator:
        root = {**_allow_null(schema), "components": self.components}
        return Draft202012Validator(root)

    def schema(self, name: str, instance: Any) -> None:
        """Validate against components/schemas/<name>; raises ValidationError."""
        assert name in self.components["schemas"], f"no schema {name!r} in the excerpt"
        self._validator({"$ref": f"#/components/schemas/{name}"}).validate(instance)

    def response(self, path: str, method: str, status: int | str, instance: Any) -> None:
        """Validate against the documented response of an operation."""
        responses = self.document["paths"][path][method.lower()]["responses"]
        entry = responses.get(str(status)) or responses["default"]
        self._validator(entry["content"]["application/json"]["schema"]).validate(instance)


def create_customers(sandbox: RunningSandbox, provider: str, *customers: str) -> None:
    """Create customers in the sandbox (POST /_sandbox/customers): Stripe counts meter
    events only for customers that exist, as the real Stripe does."""
    rows = [{"provider": provider, "customer": customer} for customer in customers]
    sandbox.post("/_sandbox/customers", json=rows).raise_for_status()


@pytest.fixture(scope="session")
def sandbox() -> Iterator[RunningSandbox]:
    with running_sandbox() as running:
        yield running


@pytest.fixture
def sandbox_clean(sandbox: RunningSandbox) -> RunningSandbox:
    sandbox.reset()
    return sandbox


@pytest.fixture
def stripe_client(sandbox_clean: RunningSandbox) -> Any:
    import stripe

    return stripe.StripeClient(
        "sk_test_sandbox", base_addresses=sandbox_clean.stripe_base_addresses
    )


@pytest.fixture
def polar_client(sandbox_clean: RunningSandbox) -> Any:
    from polar.v2026_10 import Polar

    return Polar("polar_oat_sandbox", base_url=sandbox_clean.base_url)


@pytest.fixture(scope="session")
def stripe_spec() -> SpecValidator:
    return SpecValidator(reference_dir() / "stripe-billing-meters.json")


@pytest.fixture(scope="session")
def polar_spec() -> SpecValidator:
    return SpecValidator(reference_dir() / "polar-events-meters.json")


@pytest.fixture(scope="session")
def stripe_invoices_spec() -> SpecValidator:
    """Invoices, customers and subscriptions (stripe-invoices-customers.json)."""
    return SpecValidator(reference_dir() / "stripe-invoices-customers.json")


@pytest.fixture(scope="session")
def polar_orders_spec() -> SpecValidator:
    """Orders, customers and subscriptions (polar-orders-customers.json)."""
    return SpecValidator(reference_dir() / "polar-orders-customers.json")
