"""Helpers shared by the Stripe and Polar halves of the sandbox.

Nothing here knows about a provider's business rules: form decoding, JSON
responses, ids, time formatting, the token bucket and the error type that
handlers raise to answer with a provider-shaped error body.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import string
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.responses import Response

DAY = 86_400
HOUR = 3_600
MINUTE = 60

_ALPHABET = string.ascii_letters + string.digits
_KEY_RE = re.compile(r"\[([^\]]*)\]")


class ApiError(Exception):
    """Raised by a handler: answered as-is with a provider-shaped JSON body."""

    def __init__(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status}: {payload!r}")
        self.status = status
        self.payload = payload
        self.headers = headers or {}


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def iso(ts: float) -> str:
    """Epoch seconds -> RFC 3339 in UTC with a trailing Z (as both providers print)."""
    dt = datetime.fromtimestamp(ts, UTC)
    text = dt.isoformat(timespec="microseconds" if dt.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def parse_iso(value: Any) -> float | None:
    """RFC 3339 string -> epoch seconds; None when unparsable or without a timezone."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace(" ", "+")  # '+' decoded as ' ' from a raw query string
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    return dt.timestamp()


def floor_to(ts: float, step: int) -> int:
    t = math.floor(ts)
    return t - t % step


def utc_date(ts: float) -> str:
    return datetime.fromtimestamp(math.floor(ts), UTC).strftime("%Y-%m-%d")


def decode_form(body: bytes) -> dict[str, Any]:
    """Decode a Stripe v1 form body (deepObject style: a[b][c]=v, a[0]=v, a[]=v)."""
    result: dict[str, Any] = {}
    if not body:
        return result
    for raw_key, value in parse_qsl(body.decode("utf-8"), keep_blank_values=True):
        head, _, rest = raw_key.partition("[")
        parts = [head] + (_KEY_RE.findall("[" + rest) if rest else [])
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        last = parts[-1]
        if last == "":
            last = str(len(node))
        node[last] = value
    return _listify(result)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {k: _listify(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


class TokenBucket:
    """A token bucket refilled continuously in real (monotonic) time.

    Capacity is one second's worth of tokens (at least one), so a fresh bucket
    allows a burst of `rate` requests and then `rate` per second.
    """

    def __init__(self, rate: float, now: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self._now = now
        self.updated = now()

    def take(self) -> int | None:
        """Take a token; None when allowed, else the whole seconds to wait (>= 1)."""
        now = self._now()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return max(1, math.ceil((1.0 - self.tokens) / self.rate))


def as_int(value: Any) -> int | None:
    """Parse an integer given as int or decimal string (no floats, no bools)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value.strip())
    return None
