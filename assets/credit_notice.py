"""The customer's "Credit Applied" e-mail (the support runbook's template), plain
text and HTML. Pure: the ledger and the sending are in assets/credits.py."""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass
from decimal import Decimal

from assets.quota import hours


@dataclass(frozen=True)
class CreditNotice:
    org_name: str
    ticket_id: str
    amount: Decimal  # what was handed back (net of included hours)
    currency: str
    usage_date: dt.date
    tier: str
    seconds: int
    manual: bool  # recorded for a person to apply (Polar): "will be applied"


@dataclass(frozen=True)
class NoticeMessage:
    subject: str
    text: str
    html: str


def _money(notice: CreditNotice) -> str:
    symbol = "$" if notice.currency.lower() == "usd" else f"{notice.currency.upper()} "
    return f"{symbol}{notice.amount:,.2f}"


def credit_notice_message(notice: CreditNotice) -> NoticeMessage:
    money = _money(notice)
    verb = "are applying" if notice.manual else "have applied"
    issue = (
        f"{hours(notice.seconds)} h of {notice.tier} usage on {notice.usage_date} "
        "was recorded more than once or at the wrong rate"
    )
    resolution = "the over-charge is credited back in full, net of your included hours"
    paragraphs = [
        f"Hello {notice.org_name},",
        f"We've investigated the billing issue (Ticket #{notice.ticket_id}) and {verb} "
        f"a credit of {money} to your account.",
        f"Issue: {issue}\nResolution: {resolution}\nCredit Amount: {money}",
        "This credit will appear on your next invoice. The underlying issue has been "
        "addressed to prevent recurrence.",
        "If you have any questions, please don't hesitate to reach out.",
        "Best regards,\nOrzbob Cloud Support Team",
    ]
    text = "\n\n".join(paragraphs) + "\n"
    body = "".join(
        "<p>" + html.escape(paragraph).replace("\n", "<br>\n") + "</p>\n"
        for paragraph in paragraphs
    )
    markup = (
        f'<!DOCTYPE html>\n<html><body style="font-family: sans-serif">\n{body}</body></html>\n'
    )
    return NoticeMessage("Credit Applied - Billing Issue Resolved", text, markup)
