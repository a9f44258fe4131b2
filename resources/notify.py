"""Outbound notifications: e-mail over SMTP and alert webhooks (httpx).

Settings come from the environment (DESIGN §9) unless set on the resource.
Unset SMTP: `configured()` is False and callers record the message as not mailed.
The password never appears in errors or logs."""

from __future__ import annotations

import os
import smtplib
import ssl
from email.message import EmailMessage

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


class WebhookResource(ConfigurableResource):
    url: str = ""
    timeout_s: float = 10.0

    def _url(self) -> str:
        return _setting(self.url, "ALERT_WEBHOOK_URL")

    def configured(self) -> bool:
        return bool(self._url())

    def post(self, payload: dict) -> None:
        url = self._url()
        try:
            httpx.post(url, json=payload, timeout=self.timeout_s).raise_for_status()
        except httpx.HTTPError as error:
            host = httpx.URL(url).host
            raise NotifyError(f"alert webhook at {host} failed: {type(error).__name__}") from None
