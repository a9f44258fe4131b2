"""Finance presentation of one reconciled day: totals per tier in seconds and list
dollars, the largest discrepancies as a table, the billed-vs-recorded chart, and the
metadata the `reconciliation` asset shows finance. Pure: frames in, values out."""

from __future__ import annotations

import base64
import datetime as dt
import io
from decimal import Decimal
from typing import Any

import pandas as pd
from dagster import MetadataValue

from assets.discrepancy import (
    KINDS,
    ReconcileInputs,
    as_int,
    as_text,
    list_dollars,
    missing,
)
from assets.markdown import markdown_table
from assets.pricing import Pricing, to_cents


def finance_totals(inputs: ReconcileInputs, pricing: Pricing) -> dict[str, dict[str, int]]:
    """Seconds per tier: billable (ours), sent (ledger), recorded (providers)."""
    totals: dict[str, dict[str, int]] = {}

    def add(tier: str, column: str, seconds) -> None:
        entry = totals.setdefault(tier, {"billed": 0, "sent": 0, "recorded": 0})
        entry[column] += int(seconds)

    for row in inputs.get("billed").itertuples(index=False):
        add(row.tier, "billed", row.billable_seconds)
    for row in inputs.get("ledger").itertuples(index=False):
        add(row.tier, "sent", row.sent_seconds or 0)
    for row in inputs.get("provider_usage").itertuples(index=False):
        add(row.tier, "recorded", row.seconds)
    order = {tier: position for position, tier in enumerate(pricing.tiers_by_price()[::-1])}
    return dict(sorted(totals.items(), key=lambda item: (order.get(item[0], 99), item[0])))


def dollars_of(totals: dict[str, dict[str, int]], column: str, pricing: Pricing) -> Decimal:
    amount = Decimal(0)
    for tier, entry in totals.items():
        dollars = list_dollars(pricing, entry[column], tier)
        amount += dollars if dollars is not None else Decimal(0)
    return to_cents(amount)


def top_discrepancies_markdown(
    discrepancies: pd.DataFrame, credits: pd.DataFrame, limit: int = 20
) -> str:
    """The `limit` largest discrepancies by |dollar impact| with the proposed credit."""
    if discrepancies.empty:
        return "_no discrepancies on this day_"
    frame = discrepancies.copy()
    frame["_abs"] = [
        abs(v) if v is not None and not pd.isna(v) else -1 for v in frame["dollar_impact"]
    ]
    frame["_abs_seconds"] = frame["delta_seconds"].abs()
    frame = frame.sort_values(["_abs", "_abs_seconds"], ascending=False).head(limit)
    credit_by_key = {}
    for row in credits.itertuples(index=False):
        if row.kind == "provider_over":
            credit_by_key[("provider_over", row.org_id, row.tier)] = row.amount
        else:
            for tier in str(row.tier).split("+"):
                credit_by_key[("tier_mismatch", row.org_id, tier)] = row.amount

    def seconds(value: object) -> str:
        number = as_int(value)
        return "–" if number is None else f"{number:,} s"

    rows = []
    for row in frame.itertuples(index=False):
        where = as_text(row.tier) or ""
        if as_text(row.instance_id):
            where = f"{where} / {row.instance_id}"
        credit = credit_by_key.get((row.kind, row.org_id, as_text(row.tier)))
        impact = row.dollar_impact
        rows.append(
            [
                row.kind,
                row.org_id,
                where or "–",
                seconds(row.billable_seconds),
                seconds(row.sent_seconds),
                seconds(row.provider_seconds),
                seconds(row.counter_seconds),
                f"{int(row.delta_seconds):+,} s",
                "–" if missing(impact) else f"${impact}",
                "–" if credit is None else f"${credit}",
                "yes" if row.explained else "no",
            ]
        )
    return markdown_table(
        [
            "kind",
            "org",
            "tier / instance",
            "billable",
            "sent",
            "provider",
            "counter",
            "delta",
            "$ impact",
            "proposed credit",
            "explained",
        ],
        rows,
        numeric={"billable", "sent", "provider", "counter", "delta", "$ impact", "proposed credit"},
    )


def billed_vs_recorded_png(totals: dict[str, dict[str, int]], usage_date: dt.date) -> bytes:
    """A grouped bar chart (hours per tier: billable, sent, recorded) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tiers = list(totals) or ["(none)"]
    series = [
        ("billable", "billed", "#4c72b0"),
        ("sent", "sent", "#8c8c8c"),
        ("recorded", "recorded", "#dd8452"),
    ]
    figure = Figure(figsize=(6.4, 3.2), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.27
    for position, (label, column, colour) in enumerate(series):
        values = [totals.get(tier, {}).get(column, 0) / 3600 for tier in tiers]
        offsets = [index + (position - 1) * width for index in range(len(tiers))]
        axes.bar(offsets, values, width, label=label, color=colour)
    axes.set_xticks(range(len(tiers)), tiers)
    axes.set_ylabel("hours")
    axes.set_title(f"Billed vs recorded per tier, {usage_date}")
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _png_markdown(png: bytes) -> str:
    encoded = base64.b64encode(png).decode()
    return f"![billed vs recorded per tier](data:image/png;base64,{encoded})"


def reconciliation_metadata(
    inputs: ReconcileInputs,
    discrepancies: pd.DataFrame,
    credits: pd.DataFrame,
    pricing: Pricing,
) -> dict[str, Any]:
    """What finance reads on a `reconciliation` materialization: hours and list dollars
    billed / sent / recorded, counts by kind, proposed credits, the largest
    discrepancies and the chart."""
    usage_date = inputs.usage_date
    totals = finance_totals(inputs, pricing)
    counts = discrepancies["kind"].value_counts().to_dict() if not discrepancies.empty else {}
    unexplained = discrepancies[~discrepancies["explained"].astype(bool)]
    money = unexplained[unexplained["money_moving"].astype(bool)]
    impact = sum(
        (abs(value) for value in discrepancies["dollar_impact"] if not missing(value)),
        Decimal(0),
    )
    billed_s = sum(entry["billed"] for entry in totals.values())
    recorded_s = sum(entry["recorded"] for entry in totals.values())
    sent_s = sum(entry["sent"] for entry in totals.values())
    metadata: dict[str, Any] = {
        "usage_date": usage_date.isoformat(),
        "discrepancies": len(discrepancies),
        "unexplained": len(unexplained),
        "unexplained_money_moving": len(money),
        "billed_hours": MetadataValue.float(round(billed_s / 3600, 3)),
        "sent_hours": MetadataValue.float(round(sent_s / 3600, 3)),
        "recorded_hours": MetadataValue.float(round(recorded_s / 3600, 3)),
        "billed_dollars": MetadataValue.float(float(dollars_of(totals, "billed", pricing))),
        "sent_dollars": MetadataValue.float(float(dollars_of(totals, "sent", pricing))),
        "recorded_dollars": MetadataValue.float(float(dollars_of(totals, "recorded", pricing))),
        "absolute_impact_dollars": MetadataValue.float(float(to_cents(impact))),
        "proposed_credits": len(credits),
        "proposed_credit_dollars": MetadataValue.float(
            float(sum(credits["amount"], Decimal(0))) if not credits.empty else 0.0
        ),
    }
    for kind in KINDS:
        metadata[f"count_{kind}"] = int(counts.get(kind, 0))
    metadata["largest_discrepancies"] = MetadataValue.md(
        top_discrepancies_markdown(discrepancies, credits)
    )
    metadata["billed_vs_recorded_chart"] = MetadataValue.md(
        _png_markdown(billed_vs_recorded_png(totals, usage_date))
    )
    return metadata
