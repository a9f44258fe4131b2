"""Outbound notifications: e-mail over SMTP and alert webhooks (httpx).

Settings come from the environment (DESIGN §9) unless set on the resource.
Unset SMTP: `configured()` is False and callers record the message as not mailed.
The password never appears in errors or logs.

Webhooks post tally's own JSON (`ALERT_WEBHOOK_FORMAT=json`, the default) or speak
PagerDuty Events v2 (`ALERT_WEBHOOK_FORMAT=pagerduty` with `PAGERDUTY_ROUTING_KEY`;
the URL defaults to PagerDuty's enqueue endpoint). Every alert payload tally posts
carries `alert`, `status` (firing / resolved) and `summary`, which is what the
PagerDuty translation reads."""

from __future__ import annotations

import os
import smtplib
import ssl
from email.message import EmailMessage
from enum import StrEnum
from typing import Any

import httpx
from dagster import ConfigurableResource


class NotifyError(RuntimeError):
    """Delivery failed; the message names the server, never the credentials."""


def _setting(value: str, variable: str, default: str = "") -> str:
    return value or os.environ.get(variable, default)


class SmtpResource(ConfigurableResource):
    host: str = ""
    port: int = 0
    username: str = ""
    password: str = ""
    from_address: str = ""
    timeout_s: float = 10.0

    def _host(self) -> str:
        return _setting(self.host, "SMTP_HOST")

    def _port(self) -> int:
        return self.port or int(os.environ.get("SMTP_PORT") or 25)

    def configured(self) -> bool:
        return bool(self._host())

    def sender(self) -> str:
        return _setting(self.from_address, "EMAIL_FROM_ADDRESS", "tally@localhost")

    def send(self, to: str, subject: str, text: str, html: str | None = None) -> None:
        """Send one message; raises NotifyError when the server cannot take it."""
        message = EmailMessage()
        message["From"] = self.sender()
        message["To"] = to
        message["Subject"] = subject
        message.set_content(text)
        if html:
            message.add_alternative(html, subtype="html")
        host, port = self._host(), self._port()
        username = _setting(self.username, "SMTP_USERNAME")
        password = _setting(self.password, "SMTP_PASSWORD")
        try:
            with smtplib.SMTP(host, port, timeout=self.timeout_s) as server:
                server.ehlo()
                if server.has_extn("starttls"):
                    server.starttls(context=ssl.create_default_context())
                    server.ehlo()
                if username:
                    server.login(username, password)
                server.send_message(message)
        except (OSError, smtplib.SMTPException) as error:
            reason = str(error).replace(password, "[redacted]") if password else str(error)
            raise NotifyError(f"SMTP {host}:{port} did not take the message: {reason}") from None


class WebhookFormat(StrEnum):
    """ALERT_WEBHOOK_FORMAT: what the alert webhook speaks."""

    JSON = "json"  # tally's own payload, posted as is
    PAGERDUTY = "pagerduty"  # PagerDuty Events API v2


PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")


def pagerduty_event(payload: dict[str, Any], routing_key: str) -> dict[str, Any]:
    """tally's alert payload as a PagerDuty Events v2 event: `status` firing →
    trigger, resolved → resolve, both under `dedup_key` (default: the alert's name),
    so a recovery resolves the incident its failure opened."""
    dedup_key = str(payload.get("dedup_key") or payload.get("alert") or "tally")
    if payload.get("status") == "resolved":
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup_key}
    severity = payload.get("severity")
    details = {
        key: value
        for key, value in payload.items()
        if key not in ("summary", "dedup_key", "severity", "source")
    }
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "payload": {
            "summary": str(payload.get("summary") or dedup_key)[:1024],  # PagerDuty's limit
            "source": str(payload.get("source") or "tally"),
            "severity": severity if severity in PAGERDUTY_SEVERITIES else "critical",
            "custom_details": details,
        },
    }


class WebhookResource(ConfigurableResource):
    url: str = ""
    timeout_s: float = 10.0
    format: str = ""  # ALERT_WEBHOOK_FORMAT: json (default) or pagerduty
    routing_key: str = ""  # PAGERDUTY_ROUTING_KEY

    def _format(self) -> WebhookFormat:
        value = _setting(self.format, "ALERT_WEBHOOK_FORMAT", WebhookFormat.JSON).strip().lower()
        try:
            return WebhookFormat(value)
        except ValueError:
            raise NotifyError(
                f"ALERT_WEBHOOK_FORMAT={value!r} is not a webhook format; "
                f"use {' or '.join(WebhookFormat)}"
            ) from None

    def _routing_key(self) -> str:
        return _setting(self.routing_key, "PAGERDUTY_ROUTING_KEY").strip()

    def _pagerduty(self) -> bool:
        try:
            return self._format() == WebhookFormat.PAGERDUTY
        except NotifyError:
            return False

    def _url(self) -> str:
        url = _setting(self.url, "ALERT_WEBHOOK_URL")
        return url or (PAGERDUTY_EVENTS_URL if self._pagerduty() else "")

    def problem(self) -> str | None:
        """A webhook setting that cannot work, with the fix; None when usable or unset."""
        try:
            kind = self._format()
        except NotifyError as error:
            return str(error)
        if kind == WebhookFormat.PAGERDUTY and not self._routing_key():
            return (
                "ALERT_WEBHOOK_FORMAT=pagerduty needs PAGERDUTY_ROUTING_KEY (the integration "
                "key of the PagerDuty service's Events API v2 integration)"
            )
        return None

    def configured(self) -> bool:
        """A webhook was asked for. A broken setting still counts: `post` then fails
        with the fix, so the failed delivery is recorded instead of silently skipped."""
        return bool(self._url())

    def post(self, payload: dict) -> None:
        """Post one alert; in PagerDuty format, translated by `pagerduty_event`.
        Raises NotifyError naming the host only (URL paths and keys are secrets)."""
        problem = self.problem()
        if problem:
            raise NotifyError(problem)
        url = self._url()
        body = pagerduty_event(payload, self._routing_key()) if self._pagerduty() else payload
        try:
            httpx.post(url, json=body, timeout=self.timeout_s).raise_for_status()
        except httpx.HTTPError as error:
            host = httpx.URL(url).host
            raise NotifyError(f"alert webhook at {host} failed: {type(error).__name__}") from None
